"""Server-sent events of one job: its state each time the row changes, then a final event.

The stream reads the job row every `events_poll_s` (in a worker thread, never on the event loop)
and sends `event: progress` with the job's public JSON when anything in it changed, a comment line
(`: keep-alive`) after `events_heartbeat_s` without a change (so proxies keep the connection open),
and `event: end` with the final JSON once the job is succeeded, failed or cancelled; then it closes.
A stream also closes after `events_max_s` (the client reconnects and gets the current state first).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.models import Tenant
from app.services.jobs import get_job, to_public

TERMINAL = ("succeeded", "failed", "cancelled")


def _read(engine: Engine, tenant: Tenant, job_id: str) -> tuple[str, str]:
    """(status, public JSON) of the job, read in a fresh session."""
    with Session(bind=engine) as session:
        job = to_public(get_job(session=session, tenant=tenant, job_id=job_id))
    return job.status, job.model_dump_json()


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


async def job_events(
    *, engine: Engine, settings: Settings, tenant: Tenant, job_id: str
) -> AsyncIterator[str]:
    """The SSE text of the job's stream (the caller checked the job exists for this tenant)."""
    last, last_sent = "", time.monotonic()
    deadline = last_sent + settings.events_max_s
    yield f"retry: {int(settings.events_poll_s * 2000)}\n\n"
    while True:
        status, data = await run_in_threadpool(_read, engine, tenant, job_id)
        now = time.monotonic()
        if status in TERMINAL:
            yield _event("end", data)
            return
        if data != last:
            yield _event("progress", data)
            last, last_sent = data, now
        elif now - last_sent >= settings.events_heartbeat_s:
            yield ": keep-alive\n\n"
            last_sent = now
        if now >= deadline:
            return
        await asyncio.sleep(settings.events_poll_s)

