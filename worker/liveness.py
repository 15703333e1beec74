"""A worker's liveness file, for container health checks: touched every `worker_alive_interval_s`
by a thread of the worker's main process while that process can reach the broker.

A health check then needs no Python, broker client or node name: the file's age says it all
(docker-compose.yml: the file modified within the last minute). Off unless
`SPARSESHOT_WORKER_ALIVE_FILE` is set; the API container keeps its own HTTP check (/healthz).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from app.runtime import Runtime

log = logging.getLogger(__name__)


def touch_if_ready(runtime: Runtime, path: Path) -> bool:
    """Touch `path` when the broker accepts a connection now; whether it did."""
    if not runtime.queue.ready():
        log.warning("broker unreachable: liveness file %s not refreshed", path)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return True


class Liveness:
    """The daemon thread refreshing the liveness file."""

    def __init__(self, runtime: Runtime, path: Path) -> None:
        self.runtime, self.path = runtime, path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-liveness", daemon=True)

    def start(self) -> Liveness:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            try:
                touch_if_ready(self.runtime, self.path)
            except OSError as e:
                log.error("cannot write liveness file %s: %s", self.path, e)
            if self._stop.wait(self.runtime.settings.worker_alive_interval_s):
                return


def start_liveness(runtime: Runtime) -> Liveness | None:
    """Start the liveness thread when a file is configured."""
    path = runtime.settings.worker_alive_file
    return Liveness(runtime, path).start() if path is not None else None
