"""Claiming a job for one delivery of a training message (the transitions: app.jobs.lifecycle).

A message is a work token: it starts the fairest queued job (lifecycle.claim_next: tenants with
fewer running jobs first, then the one that started a job longest ago; tenants at their running
limit wait), not necessarily the job it names. Every submit, re-queue and re-send sends one
message, so there are as many tokens as queued jobs; one taken for another job leaves that job's
own token for this one. The job the message names (the hint) still matters when it is:
- running with a stale heartbeat (a redelivery after its worker died): taken over, and it resumes
  from its checkpoint;
- queued with a cancel requested, or out of attempts: ended unrun.
A message that finds nothing to start is dropped. A tenant's job held back by its running limit
gets a token again when one of its trainings ends (`wake_waiting`), and from the recovery sweep.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import select

from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import Claim, JobStatus
from app.models import Job, utcnow
from app.quotas import running_limit
from app.runtime import Runtime

log = logging.getLogger(__name__)

CLAIM_TRIES = 32  # fair picks lost to other workers before giving the message up (the sweep re-sends)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_job(runtime: Runtime, job_id: str, worker: str) -> Claim | None:
    """Start a job for the message naming `job_id`: a take-over of that job when its worker died,
    else the fairest queued job. None: nothing to run (the message is dropped)."""
    now = utcnow()
    taken = _from_hint(runtime, job_id, worker, now)
    if taken is not None:
        return taken if isinstance(taken, Claim) else None
    for _ in range(CLAIM_TRIES):
        with session_scope(runtime.engine) as s:
            won, contended = lifecycle.claim_next(
                s, worker=worker, now=now, running_limit=running_limit(runtime.settings),
                max_attempts=runtime.settings.job_max_attempts)
        if won is not None:
            return _claim_of(runtime, won, worker)
        if not contended:
            break
    log.info("message for job %s: no queued job can start now; dropped", job_id)
    return None


def _from_hint(runtime: Runtime, job_id: str, worker: str, now: datetime) -> Claim | bool | None:
    """The hinted job's own cases: a Claim (taken over), False (stale running job ended unrun),
    None (go on to the fair pick)."""
    settings = runtime.settings
    stale_before = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    with session_scope(runtime.engine) as s:
        row = s.execute(select(Job.status, Job.attempts, Job.heartbeat_at, Job.cancel_requested)
                        .where(Job.id == job_id)).first()
    if row is None:
        log.warning("job %s does not exist; message used for the next queued job", job_id)
        return None
    status, attempts, beat, cancel = row
    stale = status == JobStatus.RUNNING and (beat is None or beat < stale_before)
    if not stale and not (status == JobStatus.QUEUED and (cancel or attempts >= settings.job_max_attempts)):
        return None
    with session_scope(runtime.engine) as s:
        if cancel:
            lifecycle.give_up(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                              status=JobStatus.CANCELLED, now=now)
            return False if stale else None
        if attempts >= settings.job_max_attempts:
            lifecycle.give_up(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                              status=JobStatus.FAILED, now=now,
                              error=f"gave up after {attempts} attempts (the worker stopped each time)")
            return False if stale else None
        if not lifecycle.claim(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                               worker=worker, now=now):
            log.info("job %s was taken over concurrently; message dropped", job_id)
            return False
    return _claim_of(runtime, job_id, worker)


def _claim_of(runtime: Runtime, job_id: str, worker: str) -> Claim:
    # The row as claimed (the attempt just counted); read after the claim's commit.
    with session_scope(runtime.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return Claim(job.id, worker, job.attempts, job.tenant_id, job.dataset_id, job.method,
                     job.base_model, dict(job.params or {}), job.validation)


def wake_waiting(runtime: Runtime, claim: Claim) -> None:
    """After a training of the claim's tenant ended: a token for its oldest queued job, which its
    running limit may have held back while its own token went unused (extra tokens are dropped)."""
    try:
        with session_scope(runtime.engine) as s:
            waiting = s.scalar(select(Job.id).where(Job.tenant_id == claim.tenant_id,
                                                    Job.status == JobStatus.QUEUED)
                               .order_by(Job.created_at, Job.id).limit(1))
        if waiting is not None:
            runtime.queue.enqueue_training(waiting)
    except Exception as e:  # the recovery sweep re-sends it
        log.warning("could not wake queued jobs of tenant %s: %s", claim.tenant_id, e)
