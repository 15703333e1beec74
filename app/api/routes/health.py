"""/healthz (process up), /readyz (database, broker, base model), /metrics (Prometheus)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from app import db
from app.api.deps import RuntimeDep
from app.jobs.status import JobStatus
from app.metrics import JOBS, QUEUE_DEPTH
from app.models import Job
from app.queue import Queue
from app.schemas import Readiness
from app.services.bases import BaseRegistry

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


def _broker_ready(queue: Queue) -> bool:
    try:
        return bool(queue.ready())
    except Exception:
        log.exception("broker check failed")
        return False


def _base_ready(bases: BaseRegistry, spec: str) -> bool:
    try:
        return bases.ready(spec)
    except Exception:
        log.exception("base model check failed")
        return False


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness.

    `{"status": "ok"}` while the process answers.
    """
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Readiness.

    200 when the database, the broker and the base model are usable, else 503 with each check
    and, in `reasons`, why each failing one failed.
    """
    db_error = db.check(runtime.engine)
    checks = {"database": db_error is None, "broker": _broker_ready(runtime.queue),
              "base_model": _base_ready(runtime.bases, runtime.settings.base_model)}
    reasons = {"database": db_error} if db_error else {}
    if not checks["base_model"]:
        reasons["base_model"] = runtime.bases.error(runtime.settings.base_model) or "not ready"
    reasons.update({k: "not ready" for k, ok in checks.items() if not ok and k not in reasons})
    ok = all(checks.values())
    body = Readiness(status="ready" if ok else "not ready", checks=checks, reasons=reasons)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _refresh_gauges(runtime: RuntimeDep) -> None:
    # Computed at scrape time from the database and the broker.
    try:
        with runtime.engine.connect() as conn:
            counts = dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for s in JobStatus:
            JOBS.labels(s.value).set(counts.get(s.value, 0))
    except Exception:
        log.exception("job counts unavailable")
    try:
        depth = runtime.queue.queue_depth()
    except Exception:
        depth = None
    QUEUE_DEPTH.set(-1 if depth is None else depth)


@router.get("/metrics", include_in_schema=False)
def metrics(runtime: RuntimeDep) -> Response:
    _refresh_gauges(runtime)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
