"""While a job trains: the heartbeat + cancel watcher thread, and the progress writer.

Both write only through app.jobs.lifecycle, conditional on still owning the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import Claim
from app.models import utcnow
from app.runtime import Runtime
from app.services import history

if TYPE_CHECKING:
    from sparseshot.train import Progress

log = logging.getLogger(__name__)


class Watcher:
    """Background thread: beats heartbeat_at and polls cancel_requested about once a second.

    `should_stop()` is then a cheap flag read for the training loop.
    """

    def __init__(self, claim: Claim, runtime: Runtime) -> None:
        self.claim = claim
        self.runtime = runtime
        timeout = runtime.settings.job_heartbeat_timeout_s
        self.poll_s = min(1.0, timeout / 4)
        self.beat_s = max(self.poll_s, min(5.0, timeout / 4))
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watch-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.poll_s):
            try:
                if time.monotonic() - last_beat >= self.beat_s:
                    self._beat()
                    last_beat = time.monotonic()
                with session_scope(self.runtime.engine) as s:
                    if lifecycle.cancel_requested(s, job_id=self.claim.job_id):
                        self.cancelled.set()
            except Exception as e:  # a database hiccup must not kill the training
                log.warning("job %s watcher: %s", self.claim.job_id, e)

    def _beat(self) -> None:
        with session_scope(self.runtime.engine) as s:
            if not lifecycle.heartbeat(s, claim=self.claim, now=utcnow()):
                self.lost.set()


def optional_float(x: Any) -> float | None:
    """A tensor/numpy/Python number as a float, None kept (for nullable columns)."""
    return None if x is None else float(x)


def progress_writer(claim: Claim, runtime: Runtime, *,
                    with_history: bool = True) -> Callable[[Progress], None]:
    """on_progress callback: writes step/total/loss/acc/eta at most every progress_interval_s
    (always the final step), and the training history unless `with_history` is False (the
    cross-validation folds: the history is the curve of the model's own training)."""
    last = [0.0]
    record_history = history.progress_recorder(
        claim=claim, every_steps=runtime.settings.history_every_steps, engine=runtime.engine,
    ) if with_history else None

    def on_progress(p: Progress) -> None:
        if record_history is not None:
            record_history(p)  # every few steps, its own rule
        now = time.monotonic()
        final = p.total_steps is not None and p.step >= p.total_steps
        if not final and now - last[0] < runtime.settings.progress_interval_s:
            return
        last[0] = now
        try:
            with session_scope(runtime.engine) as s:
                lifecycle.report_progress(
                    s, claim=claim, step=int(p.step), total_steps=int(p.total_steps),
                    loss=optional_float(p.loss), train_accuracy=optional_float(p.train_accuracy),
                    eta_seconds=optional_float(p.eta_seconds), now=utcnow(),
                )
        except Exception as e:
            log.warning("job %s progress write failed: %s", claim.job_id, e)

    return on_progress

