"""/v1/jobs: start a training, poll it, list, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from app.api.deps import PageDep, SessionDep, SettingsDep, TenantDep
from app.api.responses import problem_responses
from app.schemas import JobCreate, JobPublic, JobStatus
from app.services import jobs as svc

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses())


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_job(
    body: JobCreate, response: Response, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> JobPublic:
    job = svc.create_job(session=session, settings=settings, tenant=tenant, body=body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return svc.to_public(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    status: JobStatus | None = None,
) -> list[JobPublic]:
    rows = svc.list_jobs(session=session, tenant=tenant, status=status, limit=page.limit, offset=page.offset)
    return [svc.to_public(j) for j in rows]


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return svc.to_public(svc.get_job(session=session, tenant=tenant, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return svc.to_public(svc.cancel_job(session=session, tenant=tenant, job_id=job_id))
