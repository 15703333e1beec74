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
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, select, update

from app.core.config import Settings, get_settings
from app.db import session_scope
from app.models import Job

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _default_enqueue(job_id: str) -> None:
    from worker.dispatch import enqueue_training

    enqueue_training(job_id)


def _default_depth() -> int | None:
    from worker.dispatch import queue_depth

    return queue_depth()


def _set(job_id: str, seen_status: str, seen_attempts: int, seen_beat: datetime | None,
         **values: object) -> bool:
    """Conditional update on the row as read; True when this sweeper won."""
    beat_cond = Job.heartbeat_at.is_(None) if seen_beat is None else Job.heartbeat_at == seen_beat
    with session_scope() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts, beat_cond)
            .values(**values)
        )
        return res.rowcount == 1  # type: ignore[attr-defined]


def _stale_running(settings: Settings, now: datetime, enqueue: Callable[[str], None]) -> dict[str, int]:
    cutoff = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0}
    with session_scope() as s:
        rows = s.execute(
            select(Job.id, Job.attempts, Job.heartbeat_at, Job.cancel_requested, Job.worker)
            .where(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
        ).all()
    for job_id, attempts, beat, cancel, worker in rows:
        if cancel:
            if _set(job_id, "running", attempts, beat, status="cancelled", finished_at=now):
                counts["cancelled"] += 1
        elif attempts < settings.job_max_attempts:
            if _set(job_id, "running", attempts, beat, status="queued", worker=None, heartbeat_at=now):
                log.warning("job %s: worker %s stopped beating; re-queued (attempt %d done)",
                            job_id, worker, attempts)
                counts["requeued"] += 1
                _safe_enqueue(enqueue, job_id)
        else:
            reason = (f"worker lost: no heartbeat for {settings.job_heartbeat_timeout_s:g}s "
                      f"(worker {worker}, attempt {attempts} of {settings.job_max_attempts})")
            if _set(job_id, "running", attempts, beat, status="failed", error=reason, finished_at=now):
                counts["failed"] += 1
    return counts


def _lost_queued(settings: Settings, now: datetime, enqueue: Callable[[str], None],
                 depth: Callable[[], int | None]) -> int:
    cutoff = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    with session_scope() as s:
        rows = s.execute(
            select(Job.id, Job.attempts, Job.heartbeat_at)
            .where(Job.status == "queued",
                   or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & (Job.created_at < cutoff)))
        ).all()
    if not rows or depth() != 0:
        # Messages still waiting (or an unknown depth): these jobs are most likely behind them.
        return 0
    n = 0
    for job_id, attempts, beat in rows:
        # heartbeat_at of a queued job = when it was last re-sent, so it is re-sent once per timeout.
        if _set(job_id, "queued", attempts, beat, heartbeat_at=now):
            log.warning("job %s: queued with no message in the broker; re-sent", job_id)
            _safe_enqueue(enqueue, job_id)
            n += 1
    return n


def _safe_enqueue(enqueue: Callable[[str], None], job_id: str) -> None:
    try:
        enqueue(job_id)
    except Exception as e:  # the job stays queued; the next sweep tries again
        log.error("job %s: could not enqueue: %s", job_id, e)


def sweep(settings: Settings | None = None, *, now: datetime | None = None,
          enqueue: Callable[[str], None] | None = None,
          depth: Callable[[], int | None] | None = None) -> dict[str, int]:
    """One recovery pass; returns counts of requeued / failed / cancelled / resent jobs."""
    settings = settings or get_settings()
    now = now or utcnow()
    enqueue = enqueue or _default_enqueue
    counts = _stale_running(settings, now, enqueue)
    counts["resent"] = _lost_queued(settings, now, enqueue, depth or _default_depth)
    return counts


class Sweeper:
    """A daemon thread running sweep() now and then every `recovery_interval_s`."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-recovery", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                counts = sweep(self.settings)
                if any(counts.values()):
                    log.warning("recovery sweep: %s", counts)
            except Exception as e:  # database or broker down: try again next interval
                log.error("recovery sweep failed: %s", e)
            if self._stop.wait(self.settings.recovery_interval_s):
                return


_sweeper: Sweeper | None = None


def start_sweeper() -> Sweeper:
    """Start the process's sweeper thread once."""
    global _sweeper
    if _sweeper is None:
        _sweeper = Sweeper().start()
    return _sweeper
