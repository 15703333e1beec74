"""Every change of a job row's status, each one conditional UPDATE (the only writer of `Job.status`).

Functions take the caller's session and do not commit: the caller decides the transaction (a
success commits the model row and the job's new status together). Each returns True when its
row matched, i.e. when this caller won the transition; a False means another process moved the
job first (a cancel, a recovery sweep, a second delivery of the same message).

Conditions, by who calls:
- the API (create, enqueue_failed, cancel): on the status alone;
- a worker before training (claim, give_up): on the status and attempt count it read, so two
  deliveries of one message racing cannot both claim it; claim_next (the fair pick of any queued
  job, see its docstring): on the status and attempts read, and on the tenant's running count
  still being under its limit, with the tenant row locked;
- the owner while training (heartbeat, report_progress, succeed, finish): on `owned(claim)`
  (running, same worker, same attempt), so a worker declared dead that comes back writes nothing;
- the recovery sweep (requeue_stale, fail_stale, cancel_stale, mark_resent): on the attempt count
  and heartbeat it read, so several sweepers, or a worker beating just in time, are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.jobs.status import ACTIVE, FINISHED, JobStatus
from app.models import Job
from app.quotas import lock_tenant

__all__ = ["ACTIVE", "FINISHED", "Claim", "JobStatus"]

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value


@dataclass(frozen=True)
class Claim:
    """A job as one worker claimed it: what it trains, and the ownership every later write checks."""

    job_id: str
    worker: str
    attempt: int
    tenant_id: str
    dataset_id: str | None
    method: str
    base_model: str
    params: dict[str, Any]
    validation: dict[str, Any] | None = None  # the job's validation split option


def _changed(session: Session, *where: Any, **values: Any) -> bool:
    # One conditional UPDATE; True when it matched the (single) row.
    res = session.execute(update(Job).where(*where).values(**values))
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def owned(claim: Claim) -> ColumnElement[bool]:
    """WHERE clause: the job is still running under this claim."""
    return (
        (Job.id == claim.job_id)
        & (Job.status == RUNNING)
        & (Job.worker == claim.worker)
        & (Job.attempts == claim.attempt)
    )


def _as_read(job_id: str, status: str, attempts: int, beat: datetime | None) -> tuple[Any, ...]:
    # WHERE clauses: the row is still as the sweeper read it.
    beat_cond = Job.heartbeat_at.is_(None) if beat is None else Job.heartbeat_at == beat
    return (Job.id == job_id, Job.status == status, Job.attempts == attempts, beat_cond)


# ---------------------------------------------------------------- the API


def create(session: Session, *, tenant_id: str, dataset_id: str, method: str, base_model: str,
           params: dict[str, Any]) -> Job:
    """(none) → queued: a new job row, added to the session (the caller commits, then enqueues)."""
    job = Job(tenant_id=tenant_id, dataset_id=dataset_id, method=method, base_model=base_model,
              params=params, status=QUEUED)
    session.add(job)
    return job


def enqueue_failed(session: Session, *, job_id: str, error: str, now: datetime) -> bool:
    """queued → failed: the queue refused the message, so no worker will ever see the job."""
    return _changed(session, Job.id == job_id, Job.status == QUEUED,
                    status=JobStatus.FAILED.value, error=error, finished_at=now)


def withdraw(session: Session, *, job_id: str) -> bool:
    """queued → (no job): the queue refused the message right after the row was committed; the
    row is deleted so that no job stays visible as accepted (the client gets 503 and retries)."""
    return session.execute(delete(Job).where(Job.id == job_id, Job.status == QUEUED)).rowcount > 0  # type: ignore[attr-defined]


def cancel(session: Session, *, job_id: str, now: datetime) -> None:
    """queued → cancelled at once; running → running with `cancel_requested` (its worker stops).

    Both conditional on the status: a worker claiming the job concurrently either sees
    `cancelled` (and skips it) or sees `cancel_requested` (and stops). Finished jobs are untouched.
    """
    _changed(session, Job.id == job_id, Job.status == QUEUED,
             status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now)
    _changed(session, Job.id == job_id, Job.status == RUNNING, cancel_requested=True)


# ---------------------------------------------------------------- a worker, before training


def claim(session: Session, *, job_id: str, seen_status: str, seen_attempts: int, worker: str,
          now: datetime) -> bool:
    """queued (or running with a stale heartbeat) → running under `worker`, attempts + 1.

    Conditional on the status and attempts as read: of two deliveries racing, one wins.
    """
    return _changed(session, Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts,
                    status=RUNNING, attempts=seen_attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=now, finished_at=None, error=None)


def give_up(session: Session, *, job_id: str, seen_status: str, seen_attempts: int, status: JobStatus,
            now: datetime, error: str | None = None) -> bool:
    """queued / stale running → cancelled (cancel requested) or failed (out of attempts), unrun."""
    if status not in (JobStatus.CANCELLED, JobStatus.FAILED):
        raise ValueError(f"give_up ends a job cancelled or failed, not {status}")
    values: dict[str, Any] = dict(status=status.value, finished_at=now)
    if error is not None:
        values["error"] = error
    return _changed(session, Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts,
                    **values)


def _running_of(tenant_id: Any) -> ColumnElement[int]:
    # SQL: how many jobs of the tenant `tenant_id` (a column of the outer row) are running.
    other = aliased(Job)
    return (select(func.count()).select_from(other)
            .where(other.tenant_id == tenant_id, other.status == RUNNING).scalar_subquery())


def _last_start_of(tenant_id: Any) -> ColumnElement[datetime | None]:
    # SQL: when the tenant `tenant_id` last started a job (NULL: never); ix_jobs_tenant_started.
    other = aliased(Job)
    return select(func.max(other.started_at)).where(other.tenant_id == tenant_id).scalar_subquery()


def fair_order(session: Session, *, running_limit: ColumnElement[int], max_attempts: int,
               limit: int = 1) -> list[Any]:
    """Queued jobs in the order fair scheduling starts them: (id, tenant_id, attempts) rows.

    Jobs of tenants at their running limit (`running_limit`: SQL over `Job.tenant_id`, from
    app.quotas) are left out; then fewest running jobs of the tenant first, then the tenant that
    started a job longest ago (never: first), then the oldest job. So a tenant with nothing running
    goes before the next job of one that is training, and tenants with queued jobs take turns.
    Jobs that are cancel-requested or out of attempts are left out: the message naming them ends
    them (worker.claims), and the recovery sweep re-sends it.
    """
    running = _running_of(Job.tenant_id)
    return list(session.execute(
        select(Job.id, Job.tenant_id, Job.attempts)
        .where(Job.status == QUEUED, Job.cancel_requested.is_(False), Job.attempts < max_attempts,
               running < running_limit)
        .order_by(running, _last_start_of(Job.tenant_id).asc().nulls_first(), Job.created_at, Job.id)
        .limit(limit)
    ).all())


def claim_next(session: Session, *, worker: str, now: datetime, running_limit: ColumnElement[int],
               max_attempts: int) -> tuple[str | None, bool]:
    """queued → running under `worker`, attempts + 1: the first job of `fair_order`.

    The tenant row is locked (app.quotas.lock_tenant), then one conditional UPDATE re-checks the
    status and attempts read and that the tenant is still under its running limit, so concurrent
    claims never take one job twice nor exceed a tenant's limit. Returns (job id or None, whether
    there was a candidate): (None, True) = another worker won it; the caller retries in a new
    transaction (one tenant lock per transaction: no lock-order deadlocks).
    """
    rows = fair_order(session, running_limit=running_limit, max_attempts=max_attempts, limit=1)
    if not rows:
        return None, False
    job_id, tenant_id, attempts = rows[0]
    lock_tenant(session, tenant_id)
    won = _changed(session, Job.id == job_id, Job.status == QUEUED, Job.attempts == attempts,
                   Job.cancel_requested.is_(False), _running_of(Job.tenant_id) < running_limit,
                   status=RUNNING, attempts=attempts + 1, worker=worker, heartbeat_at=now,
                   started_at=now, finished_at=None, error=None)
    return (job_id if won else None), True


# ---------------------------------------------------------------- the owner, while training


def heartbeat(session: Session, *, claim: Claim, now: datetime) -> bool:
    """running → running: the owner is alive. False: ownership lost (the worker should stop)."""
    return _changed(session, owned(claim), heartbeat_at=now)


def cancel_requested(session: Session, *, job_id: str) -> bool:
    """Whether a cancel was asked for (read by the owner about once a second)."""
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def report_progress(session: Session, *, claim: Claim, step: int, total_steps: int | None,
                    loss: float | None, train_accuracy: float | None, eta_seconds: float | None,
                    now: datetime) -> bool:
    """running → running: progress figures (and a heartbeat), if still owned."""
    return _changed(session, owned(claim), step=step, total_steps=total_steps, loss=loss,
                    train_accuracy=train_accuracy, eta_seconds=eta_seconds, heartbeat_at=now)


def succeed(session: Session, *, claim: Claim, model_id: str, now: datetime, step: int | None = None,
            loss: float | None = None, train_accuracy: float | None = None) -> bool:
    """running → succeeded with `model_id`, if still owned (same transaction as the model row)."""
    values: dict[str, Any] = dict(status=JobStatus.SUCCEEDED.value, model_id=model_id, finished_at=now,
                                  heartbeat_at=now, eta_seconds=0.0)
    final = {"step": step, "loss": loss, "train_accuracy": train_accuracy}
    values.update({k: v for k, v in final.items() if v is not None})
    return _changed(session, owned(claim), **values)


def finish(session: Session, *, claim: Claim, status: JobStatus, now: datetime,
           error: str | None = None) -> bool:
    """running → failed (with `error`) or cancelled, if still owned."""
    if status not in (JobStatus.CANCELLED, JobStatus.FAILED):
        raise ValueError(f"finish ends a job cancelled or failed, not {status}")
    return _changed(session, owned(claim), status=status.value, error=error, finished_at=now,
                    eta_seconds=None)


# ---------------------------------------------------------------- the recovery sweep


def stale_running(session: Session, *, cutoff: datetime) -> list[Any]:
    """Running jobs whose owner has not beaten since `cutoff`: (id, attempts, heartbeat_at,
    cancel_requested, worker) rows."""
    return list(session.execute(
        select(Job.id, Job.attempts, Job.heartbeat_at, Job.cancel_requested, Job.worker)
        .where(Job.status == RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
    ).all())


def lost_queued(session: Session, *, cutoff: datetime) -> list[Any]:
    """Queued jobs neither created nor re-sent since `cutoff`: (id, attempts, heartbeat_at) rows."""
    return list(session.execute(
        select(Job.id, Job.attempts, Job.heartbeat_at)
        .where(Job.status == QUEUED,
               or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None) & (Job.created_at < cutoff)))
    ).all())


def requeue_stale(session: Session, *, job_id: str, seen_attempts: int, seen_beat: datetime | None,
                  now: datetime) -> bool:
    """running (stale, as read) → queued, unowned; heartbeat_at = when it was re-queued."""
    return _changed(session, *_as_read(job_id, RUNNING, seen_attempts, seen_beat),
                    status=QUEUED, worker=None, heartbeat_at=now)


def fail_stale(session: Session, *, job_id: str, seen_attempts: int, seen_beat: datetime | None,
               error: str, now: datetime) -> bool:
    """running (stale, as read, out of attempts) → failed with `error`."""
    return _changed(session, *_as_read(job_id, RUNNING, seen_attempts, seen_beat),
                    status=JobStatus.FAILED.value, error=error, finished_at=now)


def cancel_stale(session: Session, *, job_id: str, seen_attempts: int, seen_beat: datetime | None,
                 now: datetime) -> bool:
    """running (stale, as read, cancel requested) → cancelled."""
    return _changed(session, *_as_read(job_id, RUNNING, seen_attempts, seen_beat),
                    status=JobStatus.CANCELLED.value, finished_at=now)


def mark_resent(session: Session, *, job_id: str, seen_attempts: int, seen_beat: datetime | None,
                now: datetime) -> bool:
    """queued → queued: its message is re-sent now (heartbeat_at of a queued job = last sent)."""
    return _changed(session, *_as_read(job_id, QUEUED, seen_attempts, seen_beat), heartbeat_at=now)
