"""A real Celery worker process started next to `sparseshot serve` when no broker is configured."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def worker_argv(queue: str, *, loglevel: str = "INFO", hostname: str | None = None) -> list[str]:
    """Arguments after `celery` for one worker: one training at a time, on the given queue."""
    hostname = hostname or f"sparseshot-{uuid.uuid4().hex[:8]}@%h"
    return ["-A", "worker.main", "worker", "-Q", queue, "-c", "1", "-P", "prefork",
            "-n", hostname, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def _die_with_parent() -> None:
    # Linux: the worker gets SIGTERM if the serving process dies without cleaning up.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedWorker:
    """`python -m celery ... worker` as a child process in its own process group, restarted if it dies.

    A worker that was killed mid-training is replaced; the replacement's recovery sweep re-queues
    the job once its heartbeat is stale, and training resumes from its checkpoint.
    """

    def __init__(self, queue: str, env: dict[str, str] | None = None, check_every_s: float = 1.0) -> None:
        self.queue = queue
        self.env = env
        self.check_every_s = check_every_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "celery", *worker_argv(self.queue)]
        log.info("starting embedded worker: %s", " ".join(cmd))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(cmd, env=self.env or os.environ.copy(), start_new_session=True,
                                     preexec_fn=preexec)

    def start(self) -> EmbeddedWorker:
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="embedded-worker", daemon=True)
        self._monitor.start()
        return self

    def _watch(self) -> None:
        backoff = self.check_every_s
        while not self._stopping.wait(backoff):
            proc = self.proc
            if proc is None or proc.poll() is None:
                backoff = self.check_every_s
                continue
            log.warning("embedded worker exited with code %s; starting a new one", proc.returncode)
            self._spawn()
            self.restarts += 1
            backoff = min(30.0, backoff * 2)  # a worker that cannot start is not respawned in a loop

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole group after `timeout` seconds.

        A training cut short this way is re-queued by the recovery sweep of the next worker
        and resumes from its checkpoint.
        """
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        pgid = os.getpgid(proc.pid)
        try:
            proc.send_signal(signal.SIGTERM)  # the main process; it stops its pool itself
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded worker did not stop in %.0fs; killing it", timeout)
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
