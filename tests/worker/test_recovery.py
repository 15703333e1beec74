"""The recovery sweep: dead workers' jobs are re-queued or failed; lost messages are re-sent."""

from __future__ import annotations

from datetime import timedelta

from app.db import session_scope
from app.models import Job, utcnow
from tests.fakes import RecordingQueue
from worker import recovery
from worker.claims import claim_job

from .test_tasks import get_job, make_job  # noqa: F401  (fixtures live in conftest)


def _age(job_id: str, seconds: float, **values) -> None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        job.heartbeat_at = utcnow() - timedelta(seconds=seconds)
        for k, v in values.items():
            setattr(job, k, v)


def test_dead_worker_job_is_requeued_then_failed_after_max_attempts(settings, runtime, queue):
    sent = queue.sent
    job_id = make_job()
    assert claim_job(runtime, job_id, "dead-1") is not None
    assert recovery.sweep(runtime)["requeued"] == 0  # fresh heartbeat
    _age(job_id, 60)
    counts = recovery.sweep(runtime)
    assert counts["requeued"] == 1 and sent == [job_id]
    job = get_job(job_id)
    assert job.status == "queued" and job.worker is None and job.attempts == 1
    # A second sweeper racing on the same rows changes nothing more.
    assert recovery.sweep(runtime)["requeued"] == 0 and sent == [job_id]

    _age(job_id, 0, status="running", attempts=settings.job_max_attempts, worker="dead-n")
    _age(job_id, 60)
    counts = recovery.sweep(runtime)
    assert counts["failed"] == 1
    job = get_job(job_id)
    assert job.status == "failed" and "worker lost" in (job.error or "") and job.finished_at is not None


def test_dead_worker_job_with_cancel_request_ends_cancelled(settings, runtime):
    job_id = make_job()
    assert claim_job(runtime, job_id, "dead") is not None
    _age(job_id, 60, cancel_requested=True)
    assert recovery.sweep(runtime)["cancelled"] == 1
    assert get_job(job_id).status == "cancelled"


def test_queued_job_without_message_is_resent_once_per_timeout(settings, runtime, queue: RecordingQueue):
    sent = queue.sent
    job_id = make_job()
    with session_scope() as s:
        s.get(Job, job_id).created_at = utcnow() - timedelta(seconds=60)
    # Messages still waiting in the broker: the job is probably behind them.
    queue.depth = 3
    assert recovery.sweep(runtime)["resent"] == 0
    queue.depth = None  # the broker cannot be asked
    assert recovery.sweep(runtime)["resent"] == 0
    queue.depth = 0
    assert recovery.sweep(runtime)["resent"] == 1 and sent == [job_id]
    assert recovery.sweep(runtime)["resent"] == 0  # heartbeat_at = re-sent at
    assert get_job(job_id).status == "queued"


def test_fresh_queued_job_is_left_alone(settings, runtime, queue):
    sent = queue.sent
    make_job()
    assert recovery.sweep(runtime)["resent"] == 0 and sent == []


def test_enqueue_failure_keeps_job_queued(settings, runtime, queue):
    queue.fail = ConnectionError("broker down")
    job_id = make_job()
    assert claim_job(runtime, job_id, "dead") is not None
    _age(job_id, 60)
    assert recovery.sweep(runtime)["requeued"] == 1
    assert get_job(job_id).status == "queued"
