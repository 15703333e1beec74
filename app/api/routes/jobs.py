"""/v1/jobs: start a training, poll it, list, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from app.api.deps import PageDep, QueueDep, SessionDep, SettingsDep, TenantDep
from app.jobs.status import JobStatus
from app.schemas import JobCreate, JobPublic
from app.services import jobs as svc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_job(
    body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    queue: QueueDep,
) -> JobPublic:
    """Start a training job.

    Adapts the base model to the dataset with `method` (`so`: sparse optimization, `lora`) and
    the recipe's hyper-parameters, overridden by `params` (unknown keys are refused). Answers 202
    with the queued job and its `Location`; poll it until `status` is `succeeded` (then
    `model_id` is set), `failed` or `cancelled`.
    """
    job = svc.create_job(session=session, settings=settings, queue=queue, tenant=tenant, body=body)
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
