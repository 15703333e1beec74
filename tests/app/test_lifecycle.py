"""app.jobs.lifecycle on SQLite and PostgreSQL: each transition moves a job only from its allowed
statuses, and the owner's writes only while it still owns the job."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.jobs import lifecycle
from app.jobs.lifecycle import Claim, JobStatus
from app.models import Dataset, Job, Tenant, WebhookDelivery, utcnow

NOW = utcnow()
BEAT = NOW - timedelta(seconds=120)


def _job(engine: Engine, status: JobStatus, *, attempts: int = 1, worker: str | None = "w1",
         beat: datetime | None = BEAT, webhook_url: str | None = None) -> str:
    """A job row in `status`, as if claimed by `worker` for attempt `attempts`."""
    with Session(engine) as s:
        tenant = Tenant(name=f"t-{utcnow().timestamp()}-{status.value}")
        s.add(tenant)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="d", classes=["a", "b"])
        s.add(ds)
        s.flush()
        job = lifecycle.create(s, tenant_id=tenant.id, dataset_id=ds.id, method="so",
                               base_model="sparseshot-tiny:random", params={"n_iters": 1},
                               webhook_url=webhook_url)
        s.flush()
        job.status, job.attempts, job.worker, job.heartbeat_at = status.value, attempts, worker, beat
        s.commit()
        return job.id


def _claim(job_id: str, *, worker: str = "w1", attempt: int = 1) -> Claim:
    return Claim(job_id, worker, attempt, "t", None, "so", "sparseshot-tiny:random", {})


def _row(engine: Engine, job_id: str) -> Job:
    with Session(engine, expire_on_commit=False) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _apply(engine: Engine, fn: Callable[..., bool], **kwargs: Any) -> bool:
    with Session(engine) as s:
        won = fn(s, **kwargs)
        s.commit()
        return bool(won)


# (transition, kwargs given the job id, statuses it moves from, status it moves to)
TRANSITIONS: list[tuple[str, Callable[[str], dict[str, Any]], set[JobStatus], JobStatus]] = [
    ("enqueue_failed", lambda j: dict(job_id=j, error="broker down", now=NOW),
     {JobStatus.QUEUED}, JobStatus.FAILED),
    ("claim", lambda j: dict(job_id=j, seen_status="queued", seen_attempts=1, worker="w2", now=NOW),
     {JobStatus.QUEUED}, JobStatus.RUNNING),
    ("give_up", lambda j: dict(job_id=j, seen_status="queued", seen_attempts=1,
                               status=JobStatus.CANCELLED, now=NOW),
     {JobStatus.QUEUED}, JobStatus.CANCELLED),
    ("succeed", lambda j: dict(claim=_claim(j), model_id=None, now=NOW, step=3),
     {JobStatus.RUNNING}, JobStatus.SUCCEEDED),
    ("finish", lambda j: dict(claim=_claim(j), status=JobStatus.FAILED, error="boom", now=NOW),
     {JobStatus.RUNNING}, JobStatus.FAILED),
    ("requeue_stale", lambda j: dict(job_id=j, seen_attempts=1, seen_beat=BEAT, now=NOW),
     {JobStatus.RUNNING}, JobStatus.QUEUED),
    ("fail_stale", lambda j: dict(job_id=j, seen_attempts=1, seen_beat=BEAT, error="lost", now=NOW),
     {JobStatus.RUNNING}, JobStatus.FAILED),
    ("cancel_stale", lambda j: dict(job_id=j, seen_attempts=1, seen_beat=BEAT, now=NOW),
     {JobStatus.RUNNING}, JobStatus.CANCELLED),
    ("heartbeat", lambda j: dict(claim=_claim(j), now=NOW), {JobStatus.RUNNING}, JobStatus.RUNNING),
    ("mark_resent", lambda j: dict(job_id=j, seen_attempts=1, seen_beat=BEAT, now=NOW),
     {JobStatus.QUEUED}, JobStatus.QUEUED),
]


@pytest.mark.parametrize("name,kwargs,allowed,target", TRANSITIONS, ids=[t[0] for t in TRANSITIONS])
def test_each_transition_moves_only_from_its_allowed_statuses(
    engine: Engine, name: str, kwargs: Callable[[str], dict[str, Any]], allowed: set[JobStatus],
    target: JobStatus,
) -> None:
    fn = getattr(lifecycle, name)
    for start in JobStatus:
        job_id = _job(engine, start)
        won = _apply(engine, fn, **kwargs(job_id))
        assert won == (start in allowed), (name, start)
        assert _row(engine, job_id).status == (target if won else start).value, (name, start)


def _deliveries(engine: Engine, job_id: str) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(WebhookDelivery.event).where(WebhookDelivery.job_id == job_id)))


CANCEL = ("cancel", lambda j: dict(job_id=j, now=NOW), {JobStatus.QUEUED}, JobStatus.CANCELLED)


@pytest.mark.parametrize("name,kwargs,allowed,target", [*TRANSITIONS, CANCEL],
                         ids=[t[0] for t in [*TRANSITIONS, CANCEL]])
def test_a_won_transition_into_a_finished_status_writes_the_webhook_outbox(
    engine: Engine, name: str, kwargs: Callable[[str], dict[str, Any]], allowed: set[JobStatus],
    target: JobStatus,
) -> None:
    fn = getattr(lifecycle, name)
    for start in JobStatus:
        hooked = _job(engine, start, webhook_url="https://example.com/hook")
        plain = _job(engine, start)
        _apply(engine, fn, **kwargs(hooked))
        _apply(engine, fn, **kwargs(plain))
        ends = start in allowed and target in lifecycle.FINISHED
        assert _deliveries(engine, hooked) == ([f"job.{target.value}"] if ends else []), (name, start)
        assert _deliveries(engine, plain) == [], (name, start)


def test_a_rolled_back_transition_leaves_no_webhook(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.QUEUED, webhook_url="https://example.com/hook")
    with Session(engine) as s:
        assert lifecycle.enqueue_failed(s, job_id=job_id, error="x", now=NOW)
        s.rollback()
    assert _deliveries(engine, job_id) == []


def test_create_is_queued_and_claim_counts_the_attempt(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.QUEUED, attempts=0, worker=None, beat=None)
    seen = dict(job_id=job_id, seen_status="queued", seen_attempts=0, now=NOW)
    assert _apply(engine, lifecycle.claim, worker="w1", **seen)
    assert not _apply(engine, lifecycle.claim, worker="w2", **seen)  # a second delivery loses the race
    job = _row(engine, job_id)
    assert (job.status, job.attempts, job.worker, job.started_at) == ("running", 1, "w1", NOW)


def test_a_stale_running_job_can_be_claimed_again(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.RUNNING, attempts=1, worker="dead")
    assert _apply(engine, lifecycle.claim, job_id=job_id, seen_status="running", seen_attempts=1,
                  worker="w2", now=NOW)
    assert not _apply(engine, lifecycle.heartbeat, claim=_claim(job_id, worker="dead"), now=NOW)
    assert _apply(engine, lifecycle.heartbeat, claim=_claim(job_id, worker="w2", attempt=2), now=NOW)


@pytest.mark.parametrize("claim_kw", [{"worker": "other"}, {"attempt": 2}], ids=["worker", "attempt"])
def test_owner_writes_need_the_same_worker_and_attempt(engine: Engine, claim_kw: dict[str, Any]) -> None:
    job_id = _job(engine, JobStatus.RUNNING)
    stranger = _claim(job_id, **claim_kw)
    progress = dict(step=1, total_steps=2, loss=0.5, train_accuracy=None, eta_seconds=1.0, now=NOW)
    assert not _apply(engine, lifecycle.heartbeat, claim=stranger, now=NOW)
    assert not _apply(engine, lifecycle.report_progress, claim=stranger, **progress)
    assert not _apply(engine, lifecycle.succeed, claim=stranger, model_id=None, now=NOW)
    assert not _apply(engine, lifecycle.finish, claim=stranger, status=JobStatus.CANCELLED, now=NOW)
    assert _row(engine, job_id).step == 0
    assert _apply(engine, lifecycle.report_progress, claim=_claim(job_id), **progress)
    job = _row(engine, job_id)
    assert (job.status, job.step, job.loss, job.heartbeat_at) == ("running", 1, 0.5, NOW)


def test_succeed_keeps_figures_it_is_not_given(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.RUNNING)
    with Session(engine) as s:
        s.get(Job, job_id).loss = 0.7  # type: ignore[union-attr]
        s.commit()
    assert _apply(engine, lifecycle.succeed, claim=_claim(job_id), model_id=None, now=NOW, step=5)
    job = _row(engine, job_id)
    assert (job.status, job.step, job.loss, job.eta_seconds) == ("succeeded", 5, 0.7, 0.0)
    assert job.finished_at == NOW


def test_cancel_ends_queued_flags_running_leaves_finished(engine: Engine) -> None:
    ids = {status: _job(engine, status) for status in JobStatus}
    for job_id in ids.values():
        with Session(engine) as s:
            lifecycle.cancel(s, job_id=job_id, now=NOW)
            s.commit()
    after = {status: _row(engine, job_id) for status, job_id in ids.items()}
    assert after[JobStatus.QUEUED].status == "cancelled" and after[JobStatus.QUEUED].finished_at == NOW
    assert after[JobStatus.RUNNING].status == "running" and after[JobStatus.RUNNING].cancel_requested
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert after[status].status == status.value and not after[status].cancel_requested


def test_sweeper_transitions_need_the_heartbeat_as_read(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.RUNNING)
    moved_on = dict(job_id=job_id, seen_attempts=1, seen_beat=BEAT - timedelta(seconds=1), now=NOW)
    assert not _apply(engine, lifecycle.requeue_stale, **moved_on)  # the worker beat in between
    assert not _apply(engine, lifecycle.cancel_stale, **moved_on)
    assert not _apply(engine, lifecycle.fail_stale, error="lost", **moved_on)
    assert not _apply(engine, lifecycle.requeue_stale, **{**moved_on, "seen_beat": BEAT, "seen_attempts": 2})
    assert _row(engine, job_id).status == "running"


def test_stale_and_lost_queries(engine: Engine) -> None:
    stale = _job(engine, JobStatus.RUNNING, beat=BEAT)
    fresh = _job(engine, JobStatus.RUNNING, beat=NOW)
    resent_long_ago = _job(engine, JobStatus.QUEUED, beat=BEAT)
    cutoff = NOW - timedelta(seconds=60)
    with Session(engine) as s:
        assert {r[0] for r in lifecycle.stale_running(s, cutoff=cutoff)} == {stale}
        assert fresh not in {r[0] for r in lifecycle.stale_running(s, cutoff=cutoff)}
        assert {r[0] for r in lifecycle.lost_queued(s, cutoff=cutoff)} == {resent_long_ago}


def test_terminal_transitions_refuse_non_terminal_targets(engine: Engine) -> None:
    job_id = _job(engine, JobStatus.RUNNING)
    with Session(engine) as s, pytest.raises(ValueError):
        lifecycle.finish(s, claim=_claim(job_id), status=JobStatus.SUCCEEDED, now=NOW)
    with Session(engine) as s, pytest.raises(ValueError):
        lifecycle.give_up(s, job_id=job_id, seen_status="running", seen_attempts=1,
                          status=JobStatus.QUEUED, now=NOW)
