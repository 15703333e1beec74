"""A real Celery worker process started next to `sparseshot serve` when no broker is configured."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import uuid

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def worker_argv(queue: str, *, loglevel: str = "INFO", hostname: str | None = None) -> list[str]:
    """Arguments after `celery` for one worker: one training at a time, on the given queue."""
    hostname = hostname or f"sparseshot-{uuid.uuid4().hex[:8]}@%h"
    return ["-A", "worker.celery_app", "worker", "-Q", queue, "-c", "1", "-P", "prefork",
            "-n", hostname, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def _die_with_parent() -> None:
    # Linux: the worker gets SIGTERM if the serving process dies without cleaning up.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedWorker:
    """`python -m celery ... worker` as a child process, in its own process group."""

    def __init__(self, queue: str, env: dict[str, str] | None = None) -> None:
        self.queue = queue
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedWorker:
        cmd = [sys.executable, "-m", "celery", *worker_argv(self.queue)]
        log.info("starting embedded worker: %s", " ".join(cmd))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(cmd, env=self.env or os.environ.copy(), start_new_session=True,
                                     preexec_fn=preexec)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole group after `timeout` seconds.

        A training cut short this way is re-queued by the recovery sweep of the next worker
        and resumes from its checkpoint.
        """
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
