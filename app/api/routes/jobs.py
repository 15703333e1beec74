"""/v1/jobs: start a training, poll it, list, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import StreamingResponse

from app.api.deps import BasesDep, PageDep, QueueDep, RuntimeDep, SessionDep, SettingsDep, TenantDep
from app.api.responses import QUOTA_RESPONSES, problem_responses
from app.jobs.status import JobStatus
from app.schemas import JobCreate, JobHistoryPublic, JobPublic, WebhookDeliveryPublic
from app.services import history, job_events, webhooks
from app.services import jobs as svc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses())


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=QUOTA_RESPONSES)
def create_job(
    body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    queue: QueueDep, bases: BasesDep,
) -> JobPublic:
    """Start a training job.

    Adapts the base model to the dataset with `method` (`so`: sparse optimization, `lora`) and
    the `preset`'s hyper-parameters (`quick`, `standard` = the paper's recipe, `thorough`),
    overridden by `params` (unknown keys are refused). Answers 202 with the queued job, its
    `estimated_seconds` and its `Location`; poll it (or stream `/events`) until `status` is
    `succeeded` (then `model_id` is set), `failed` or `cancelled`, or give a `webhook_url` to be
    notified (see `/v1/webhook-secret`). 503 with `Retry-After` while the base model cannot be
    loaded (the error says which setting to change); no job is created then.
    """
    job = svc.create_job(session=session, settings=settings, queue=queue, bases=bases, tenant=tenant,
                         body=body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return svc.to_public(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    status: JobStatus | None = None,
) -> list[JobPublic]:
    """List your jobs.

    Newest first, optionally of one `status`, `limit` per page from `offset`.
    """
    rows = svc.list_jobs(session=session, tenant=tenant, status=status, limit=page.limit, offset=page.offset)
    return [svc.to_public(j) for j in rows]


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Get a job.

    Status, progress (step, loss, train accuracy, ETA) and, once it succeeded, its `model_id`.
    """
    return svc.to_public(svc.get_job(session=session, tenant=tenant, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Cancel a job.

    A queued job is cancelled at once; a running one stops at its next step
    (`cancel_requested` is set until then). Finished jobs answer 409.
    """
    return svc.to_public(svc.cancel_job(session=session, tenant=tenant, job_id=job_id))


@router.get("/{job_id}/history")
def get_history(job_id: str, session: SessionDep, tenant: TenantDep) -> JobHistoryPublic:
    """Get a job's training history.

    The training curve, by step: loss, train accuracy, learning rate, validation accuracy (when
    the job has a validation split) and elapsed seconds, recorded every few steps.
    """
    return history.list_history(session=session, tenant=tenant, job_id=job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`event: progress` (job JSON) on each change, `event: end` at the end."}},
)
def stream_events(
    job_id: str, session: SessionDep, tenant: TenantDep, runtime: RuntimeDep
) -> StreamingResponse:
    """Stream a job's progress.

    Server-sent events: `event: progress` with the job JSON each time it changes, `: keep-alive`
    comments while nothing does, then `event: end` with the final job, and the stream closes.
    """
    svc.get_job(session=session, tenant=tenant, job_id=job_id)  # 404 before the stream starts
    stream = job_events.job_events(engine=runtime.engine, settings=runtime.settings, tenant=tenant,
                                   job_id=job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


@router.get("/{job_id}/deliveries")
def list_deliveries(job_id: str, session: SessionDep, tenant: TenantDep) -> list[WebhookDeliveryPublic]:
    """List a job's webhook deliveries.

    The notification of the job's end to its `webhook_url` (none while it runs, or without a
    URL): `state` (`pending`, `delivered`, `failed` after the last attempt) and each attempt's
    time, HTTP status or error, and duration.
    """
    return webhooks.list_deliveries(session=session, tenant=tenant, job_id=job_id)
