"""Claiming a job for one delivery of its message (the transitions themselves: app.jobs.lifecycle).

A duplicate message for a job that is finished, cancelled or running elsewhere (fresh heartbeat)
is dropped; a job whose cancel was requested, or that used up its attempts, is ended unrun.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import Claim, JobStatus
from app.models import Job, utcnow
from app.runtime import Runtime

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_job(runtime: Runtime, job_id: str, worker: str) -> Claim | None:
    """Move a queued job (or a running one whose worker stopped beating) to running under `worker`.

    Read, then a conditional UPDATE on the status and attempts read (lifecycle.claim), in separate
    transactions, so two deliveries racing on any backend cannot both win. None: nothing to run.
    """
    settings = runtime.settings
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    with session_scope(runtime.engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        status, attempts, beat = job.status, job.attempts, job.heartbeat_at
        stale = status == JobStatus.RUNNING and (beat is None or beat < stale_before)
        if status != JobStatus.QUEUED and not stale:
            log.info("job %s is %s; duplicate or late message dropped", job_id, status)
            return None
        claim = Claim(job_id, worker, attempts + 1, job.tenant_id, job.dataset_id, job.method,
                      job.base_model, dict(job.params or {}))
        cancel = job.cancel_requested
    with session_scope(runtime.engine) as s:
        if cancel:
            lifecycle.give_up(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                              status=JobStatus.CANCELLED, now=now)
            return None
        if attempts >= settings.job_max_attempts:
            lifecycle.give_up(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                              status=JobStatus.FAILED, now=now,
                              error=f"gave up after {attempts} attempts (the worker stopped each time)")
            return None
        if not lifecycle.claim(s, job_id=job_id, seen_status=status, seen_attempts=attempts,
                               worker=worker, now=now):
            log.info("job %s was claimed concurrently; message dropped", job_id)
            return None
    return claim
