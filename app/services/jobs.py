"""Training jobs: create (validate, commit, enqueue), read, list, cancel."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import quotas
from app.core.config import Settings
from app.errors import Conflict, InvalidInput, NotFound, Unavailable
from app.jobs import lifecycle
from app.jobs.status import FINISHED, JobStatus
from app.models import Job, Tenant, utcnow
from app.queue import Queue
from app.schemas import JobCreate, JobProgress, JobPublic
from app.services import webhooks
from app.services.bases import BaseRegistry
from app.services.datasets import get_dataset, image_counts

log = logging.getLogger(__name__)


def resolve_base_model(requested: str | None, settings: Settings) -> str:
    """The base model spec to use; only the configured ones are accepted (specs can name files)."""
    if requested is None or requested == settings.base_model:
        return settings.base_model
    if requested in settings.allowed_base_models:
        return requested
    allowed = [settings.base_model, *settings.allowed_base_models]
    raise InvalidInput(f"base_model {requested!r} is not served here; use one of {allowed}")


def validate_params(method: str, params: dict, preset: str = "standard",
                    base_model: str | None = None) -> dict:
    """The preset's hyper-parameters with `params` on top and the recipe defaults merged;
    InvalidInput on unknown keys or bad values (with `base_model`, also on block positions beyond
    its towers' depth when its config tells)."""
    from sparseshot.base import tower_depths
    from sparseshot.presets import preset_params

    try:
        depths = tower_depths(base_model) if base_model else None
        return preset_params(preset, method, params, depths=depths)
    except ValueError as e:
        raise InvalidInput(f"invalid params for method {method!r}: {e}") from e


def training_device(settings: Settings) -> str:
    """The device a worker of this deployment trains on (SPARSESHOT_DEVICE, else CUDA when present)."""
    if settings.device:
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def estimate_seconds(*, settings: Settings, base_model: str, method: str, params: dict,
                     counts: list[int], validation: dict | None = None) -> float | None:
    """Planned steps x the measured step time (sparseshot.presets), the k-fold trainings of a
    `{"kfold": k}` validation included; None where unmeasured."""
    from sparseshot.presets import estimate_seconds as estimate
    from sparseshot.recipe import planned_steps
    from sparseshot.validation import fold_hparams, fold_plans

    runs = [planned_steps(params, sum(counts), len(counts))[1:]]
    if validation and "kfold" in validation:
        runs += fold_plans(counts, int(validation["kfold"]), fold_hparams(method, params))
    device = training_device(settings)
    parts = [estimate(base_model, method, device, steps=steps, batch=batch) for steps, batch in runs]
    return None if any(p is None for p in parts) else round(sum(p or 0.0 for p in parts), 1)


def create_job(
    *, session: Session, settings: Settings, queue: Queue, bases: BaseRegistry, tenant: Tenant,
    body: JobCreate,
) -> Job:
    """Check the dataset and params, commit the queued job, then hand it to the queue (503 and no
    job when the queue cannot take it).

    A dataset qualifies when it has images and every class has at least one. The product is
    built for 1-16 images per class; more are accepted (training simply sees them all).
    """
    dataset = get_dataset(session=session, tenant=tenant, dataset_id=body.dataset_id)
    base_model = resolve_base_model(body.base_model, settings)
    _check_base_available(bases, base_model)
    if body.webhook_url is not None:
        webhooks.check_url(url=body.webhook_url, settings=settings)
        webhooks.ensure_secret(session=session, tenant=tenant)  # committed with the job
    params = validate_params(body.method, body.params, body.preset, base_model)
    counts = image_counts(session=session, dataset=dataset)
    if sum(counts.values()) == 0:
        raise InvalidInput(f"dataset {dataset.id} has no images")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise InvalidInput(f"every class needs at least one image; none for: {', '.join(empty)}")
    validation = _validation(body.validation, counts)
    quotas.check_steps(tenant=tenant, settings=settings, hparams=params, n_images=sum(counts.values()),
                       n_classes=len(counts))
    estimate = estimate_seconds(settings=settings, base_model=base_model, method=body.method, params=params,
                                counts=list(counts.values()), validation=validation)
    quotas.check_new_job(session=session, tenant=tenant, settings=settings)  # locks until the commit
    job = lifecycle.create(session, tenant_id=tenant.id, dataset_id=dataset.id, method=body.method,
                           base_model=base_model, params=params, webhook_url=body.webhook_url)
    job.preset, job.estimated_seconds, job.validation = body.preset, estimate, validation
    session.commit()
    _enqueue(session, queue, job)
    return job


def _validation(option: dict | None, counts: dict[str, int]) -> dict | None:
    """The validation the job runs (`sparseshot.validation.resolve`): the normalised option, or
    `{"kfold": k}` when no class can hold an image out; 422 when it is malformed or impossible."""
    from sparseshot.validation import parse_validation, resolve

    try:
        return resolve(parse_validation(option), list(counts.values()))
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def _check_base_available(bases: BaseRegistry, spec: str) -> None:
    """503 + Retry-After while this process's last load of the base failed (its registry `bases`):
    a job accepted now would only fail when its worker tries the same load."""
    down = bases.unavailable(spec)
    if down is not None:
        error, retry_after_s = down
        raise Unavailable(f"the base model is unavailable, no job was created: {error}",
                          retry_after_s=retry_after_s, extra={"base_model": spec})


def _enqueue(session: Session, queue: Queue, job: Job) -> None:
    """Hand the committed job to the queue. When the broker cannot take it, the job row is deleted
    again (nothing half-written stays visible) and the client is told to retry (503)."""
    try:
        queue.enqueue_training(job.id)
    except Exception as e:
        log.exception("could not enqueue job %s", job.id)
        lifecycle.withdraw(session, job_id=job.id)
        session.commit()
        raise Unavailable("the job queue is unavailable; the job was not created, retry shortly",
                          retry_after_s=10) from e


def get_job(*, session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def list_jobs(
    *, session: Session, tenant: Tenant, status: JobStatus | None, limit: int, offset: int
) -> list[Job]:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status.value)
    query = query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    return list(session.scalars(query))


def cancel_job(*, session: Session, tenant: Tenant, job_id: str) -> Job:
    """Queued: cancelled at once. Running: flagged; the worker stops within seconds.

    Cancelling a cancelled job is a no-op; a succeeded or failed job cannot be cancelled (409).
    The race with a worker starting the job is settled in lifecycle.cancel.
    """
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    lifecycle.cancel(session, job_id=job.id, now=utcnow())
    session.commit()
    session.refresh(job)
    if job.status in FINISHED - {JobStatus.CANCELLED}:
        raise Conflict(f"job {job.id} already {job.status}")
    return job


def to_public(job: Job) -> JobPublic:
    progress = JobProgress(
        step=job.step, total_steps=job.total_steps, loss=job.loss,
        train_accuracy=job.train_accuracy, eta_seconds=job.eta_seconds,
    )  # fmt: skip
    return JobPublic(
        id=job.id, dataset_id=job.dataset_id, method=job.method, base_model=job.base_model,
        params=job.params, preset=job.preset, validation=job.validation,
        estimated_seconds=job.estimated_seconds, device=job.device, versions=job.versions,
        status=JobStatus(job.status), cancel_requested=job.cancel_requested,
        progress=progress, attempts=job.attempts, model_id=job.model_id, error=job.error,
        webhook_url=job.webhook_url, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at,
    )  # fmt: skip
