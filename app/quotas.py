"""Per-tenant limits: the one place that knows them, their defaults, and how each is counted.

A limit's default is the `Settings` field of the same name; a tenant row's non-null column of that
name overrides it (`sparseshot tenants set-limits`). Over a limit: `QuotaExceeded` (429, with the
limit's name, its value and the current usage).

- max_running_jobs: the tenant's running jobs; checked at the claim (app.jobs.lifecycle.claim_next):
  over it, the tenant's jobs wait queued (no error).
- max_queued_jobs: the tenant's queued jobs; checked at submit (app.services.jobs).
- max_steps_per_job: n_iters x shots (sparseshot.recipe.planned_steps); checked at submit, and by
  the worker with the images it loads (worker.examples).
- max_images_per_dataset: the dataset's images; checked at upload (app.services.datasets).
- max_models: the tenant's models plus its queued/running jobs (each will create one); checked at
  submit and zero-shot create (app.services.models).

Checks that count then insert hold under concurrency: `lock_tenant` first, in the same
transaction as the insert (PostgreSQL: the tenant row FOR NO KEY UPDATE; SQLite: a no-op UPDATE of
it, which takes the database's single write lock), so two requests cannot both take the last slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import QuotaExceeded
from app.jobs.status import ACTIVE, JobStatus
from app.models import Dataset, Image, Job, Model, Tenant

LIMITS = ("max_running_jobs", "max_queued_jobs", "max_steps_per_job", "max_images_per_dataset", "max_models")


def limit_of(tenant: Tenant, name: str, settings: Settings) -> int:
    """The tenant's value of limit `name`: its own column, or the setting's default when NULL."""
    if name not in LIMITS:
        raise KeyError(name)
    own = getattr(tenant, name)
    return int(getattr(settings, name) if own is None else own)


def limits_of(tenant: Tenant, settings: Settings) -> dict[str, int]:
    return {name: limit_of(tenant, name, settings) for name in LIMITS}


def running_limit(settings: Settings, tenant_id: Any = Job.tenant_id) -> ColumnElement[int]:
    """SQL: the running-jobs limit of the tenant `tenant_id` (a column, e.g. of the job row)."""
    return (
        select(func.coalesce(Tenant.max_running_jobs, literal(settings.max_running_jobs)))
        .where(Tenant.id == tenant_id)
        .scalar_subquery()
    )


def set_limits(*, session: Session, tenant_name: str, values: Mapping[str, int | None]) -> Tenant:
    """Set (int) or clear (None: back to the default) the named limits of a tenant; commits."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name.strip()))
    if tenant is None:
        raise LookupError(f"no tenant {tenant_name!r}")
    for name, value in values.items():
        if name not in LIMITS:
            raise KeyError(name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, not {value}")
        setattr(tenant, name, value)
    session.commit()
    return tenant


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this transaction's count-then-insert with every other one of the same tenant.

    Held until the caller commits or rolls back.
    """
    if session.get_bind().dialect.name == "postgresql":
        # NO KEY UPDATE: conflicts with other lockers, not with inserts referencing the tenant.
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    else:
        # SQLite: any write takes the one database write lock (other writers wait: busy_timeout).
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))


def _refuse(name: str, value: int, current: int, what: str) -> QuotaExceeded:
    return QuotaExceeded(f"{what}: the limit {name} is {value} (current: {current})",
                         limit=name, value=value, current=current)


def _count_jobs(session: Session, tenant_id: str, statuses: set[JobStatus] | frozenset[JobStatus]) -> int:
    query = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_([s.value for s in statuses]))
    return int(session.scalar(query) or 0)


def check_steps(*, tenant: Tenant, settings: Settings, hparams: Mapping[str, Any], n_images: int,
                n_classes: int) -> int:
    """The job's planned steps; QuotaExceeded over max_steps_per_job (no lock: nothing counted)."""
    from sparseshot.recipe import planned_steps  # torch: only where a job is checked

    if "n_iters" not in hparams:  # zero-shot: no training
        return 0
    # Only the step count is used (the batch size does not change it).
    _shots, steps, _batch = planned_steps({"batch_size": 1, **hparams}, n_images, n_classes)
    value = limit_of(tenant, "max_steps_per_job", settings)
    if steps > value:
        raise _refuse("max_steps_per_job", value, steps,
                      f"the job would train {steps} steps (n_iters x shots, {n_images} images in "
                      f"{n_classes} classes)")
    return steps


def check_new_job(*, session: Session, tenant: Tenant, settings: Settings) -> None:
    """Locks the tenant, then: room for one more queued job and for the model it will create.

    Call right before adding the job row, in the transaction that commits it.
    """
    lock_tenant(session, tenant.id)
    queued = _count_jobs(session, tenant.id, {JobStatus.QUEUED})
    value = limit_of(tenant, "max_queued_jobs", settings)
    if queued + 1 > value:
        raise _refuse("max_queued_jobs", value, queued, "too many jobs waiting")
    _check_models(session, tenant, settings)


def check_new_model(*, session: Session, tenant: Tenant, settings: Settings, lock: bool = True) -> None:
    """Room for one more model. With `lock` (right before adding the model row, in its
    transaction) the count holds against concurrent requests; without, a cheap pre-check."""
    if lock:
        lock_tenant(session, tenant.id)
    _check_models(session, tenant, settings)


def _check_models(session: Session, tenant: Tenant, settings: Settings) -> None:
    # Models plus active jobs: a job admitted now can always store its model when it succeeds.
    models = session.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == tenant.id))
    current = int(models or 0) + _count_jobs(session, tenant.id, ACTIVE)
    value = limit_of(tenant, "max_models", settings)
    if current + 1 > value:
        raise _refuse("max_models", value, current, "too many models (queued and running jobs count)")


def check_images(*, session: Session, tenant: Tenant, settings: Settings, dataset: Dataset, adding: int,
                 lock: bool = True) -> None:
    """Room for `adding` more images in the dataset. With `lock` (right before adding the rows,
    in their transaction) the count holds against concurrent uploads; without, a cheap pre-check."""
    if lock:
        lock_tenant(session, tenant.id)
    n = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset.id))
    current = int(n or 0)
    value = limit_of(tenant, "max_images_per_dataset", settings)
    if current + adding > value:
        raise _refuse("max_images_per_dataset", value, current,
                      f"adding {adding} image(s) to dataset {dataset.id} would exceed its limit")
