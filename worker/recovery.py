"""Jobs whose worker died are not left running; jobs whose message was lost are sent again.

Each worker runs `sweep()` at startup and every `recovery_interval_s` in a thread of its main
process, so recovery does not depend on the broker redelivering an unacknowledged message
(Redis hides one for its whole visibility timeout; the embedded transport never redelivers).

- running, heartbeat older than `job_heartbeat_timeout_s`: back to queued and re-sent while
  attempts < job_max_attempts (training resumes from its checkpoint), else failed with a reason;
  cancelled if a cancel was requested.
- queued for longer than the timeout while the broker queue is empty: the message was lost
  (or its worker died before claiming it): re-sent.

Every change is a conditional UPDATE on the values read, so several workers sweeping at once
(or a worker that beats just in time) are safe; a re-sent message whose job is already being
run is dropped by the task.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db import session_scope
from app.jobs import lifecycle
from app.models import utcnow
from app.queue import Queue
from app.runtime import Runtime

log = logging.getLogger(__name__)


def _stale_running(runtime: Runtime, now: datetime) -> dict[str, int]:
    cutoff = now - timedelta(seconds=runtime.settings.job_heartbeat_timeout_s)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0}
    with session_scope(runtime.engine) as s:
        rows = lifecycle.stale_running(s, cutoff=cutoff)
    for job_id, attempts, beat, cancel, worker in rows:
        with session_scope(runtime.engine) as s:
            outcome = _end_or_requeue(s, runtime.settings, job_id, attempts, beat, cancel, worker, now)
        if outcome is None:
            continue  # another sweeper, or the worker's own heartbeat, got there first
        counts[outcome] += 1
        if outcome == "requeued":  # sent after the commit: its worker must see the queued row
            log.warning("job %s: worker %s stopped beating; re-queued (attempt %d done)",
                        job_id, worker, attempts)
            _safe_enqueue(runtime.queue, job_id)
    return counts


def _end_or_requeue(s: Session, settings: Settings, job_id: str, attempts: int, beat: datetime | None,
                    cancel: bool, worker: str | None, now: datetime) -> str | None:
    """One stale running job: cancelled (cancel requested), re-queued (attempts left) or failed."""
    if cancel:
        won = lifecycle.cancel_stale(s, job_id=job_id, seen_attempts=attempts, seen_beat=beat, now=now)
        return "cancelled" if won else None
    if attempts < settings.job_max_attempts:
        won = lifecycle.requeue_stale(s, job_id=job_id, seen_attempts=attempts, seen_beat=beat, now=now)
        return "requeued" if won else None
    reason = (f"worker lost: no heartbeat for {settings.job_heartbeat_timeout_s:g}s "
              f"(worker {worker}, attempt {attempts} of {settings.job_max_attempts})")
    won = lifecycle.fail_stale(s, job_id=job_id, seen_attempts=attempts, seen_beat=beat, error=reason,
                               now=now)
    return "failed" if won else None


def _lost_queued(runtime: Runtime, now: datetime) -> int:
    cutoff = now - timedelta(seconds=runtime.settings.job_heartbeat_timeout_s)
    with session_scope(runtime.engine) as s:
        rows = lifecycle.lost_queued(s, cutoff=cutoff)
    if not rows or runtime.queue.queue_depth() != 0:
        # Messages still waiting (or an unknown depth): these jobs are most likely behind them.
        return 0
    n = 0
    for job_id, attempts, beat in rows:
        with session_scope(runtime.engine) as s:
            resent = lifecycle.mark_resent(s, job_id=job_id, seen_attempts=attempts, seen_beat=beat, now=now)
        if resent:  # re-sent once per timeout
            log.warning("job %s: queued with no message in the broker; re-sent", job_id)
            _safe_enqueue(runtime.queue, job_id)
            n += 1
    return n


def _safe_enqueue(queue: Queue, job_id: str) -> None:
    try:
        queue.enqueue_training(job_id)
    except Exception as e:  # the job stays queued; the next sweep tries again
        log.error("job %s: could not enqueue: %s", job_id, e)


def sweep(runtime: Runtime, *, now: datetime | None = None) -> dict[str, int]:
    """One recovery pass; returns counts of requeued / failed / cancelled / resent jobs."""
    now = now or utcnow()
    counts = _stale_running(runtime, now)
    counts["resent"] = _lost_queued(runtime, now)
    return counts


class Sweeper:
    """A daemon thread running sweep() now and then every `recovery_interval_s`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-recovery", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                counts = sweep(self.runtime)
                if any(counts.values()):
                    log.warning("recovery sweep: %s", counts)
            except Exception as e:  # database or broker down: try again next interval
                log.error("recovery sweep failed: %s", e)
            if self._stop.wait(self.runtime.settings.recovery_interval_s):
                return


_sweeper: Sweeper | None = None


def start_sweeper(runtime: Runtime) -> Sweeper:
    """Start the process's sweeper thread once."""
    global _sweeper
    if _sweeper is None:
        _sweeper = Sweeper(runtime).start()
    return _sweeper
