"""SQLAlchemy 2.0 models. The schema itself is created only by the Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.jobs.status import JobStatus

# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The one clock of the service: timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset; restore it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Per-tenant limits (app/quotas.py): NULL = the Settings field of the same name.
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_steps_per_job: Mapped[int | None] = mapped_column(Integer, default=None)
    max_images_per_dataset: Mapped[int | None] = mapped_column(Integer, default=None)
    max_models: Mapped[int | None] = mapped_column(Integer, default=None)


class ApiKey(Base):
    """An API key `sk_<prefix>_<secret>`: looked up by prefix, verified by the sha256 of the whole key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[str]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Image(Base):
    """One stored image of a dataset; the file is content-addressed by `sha256` (= storage key)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    storage_key: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))  # the client's name, for reports only
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    """An adapted (or zero-shot) classifier: a sparse delta file over a base model."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # The job that produced it (no foreign key: jobs.model_id already points here).
    job_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)
    name: Mapped[str | None] = mapped_column(String(200), default=None)  # the client's label, if any
    status: Mapped[str] = mapped_column(String(16), default="ready")
    classes: Mapped[list[str]] = mapped_column()
    base_model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    template: Mapped[str | None] = mapped_column(Text, default=None)
    delta_key: Mapped[str] = mapped_column(String(200), index=True)
    nnz: Mapped[int] = mapped_column(Integer, default=0)
    nbytes: Mapped[int] = mapped_column(Integer, default=0)
    density: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A model's metrics on a labelled dataset (app/services/evaluations.py); immutable once written.

    `report` is the EvaluationPublic body less the identifying columns (accuracy, per-class
    metrics, confusion matrix, suggested thresholds, excluded labels)."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    # NULL once the dataset is deleted (the evaluation keeps its figures).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    n_images: Mapped[int] = mapped_column(Integer)  # images evaluated (excluded ones not counted)
    accuracy: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        # A tenant's last start, for fair scheduling (app.jobs.lifecycle.claim_next).
        Index("ix_jobs_tenant_started", "tenant_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # NULL once the dataset is deleted (only finished jobs can lose it).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    preset: Mapped[str | None] = mapped_column(String(32), default=None)
    # The validation split (sparseshot.validation), None for none.
    validation: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # steps x measured step time for the base, method and device, at creation (None: unmeasured).
    estimated_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    # Where the latest attempt trained: device string and library versions (written by the worker).
    device: Mapped[str | None] = mapped_column(String(64), default=None)
    versions: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # A JobStatus value; written only by app.jobs.lifecycle.
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    train_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True, default=None
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobHistory(Base):
    """One point of a job's training curve (written by the worker every few steps)."""

    __tablename__ = "job_history"
    __table_args__ = (Index("ix_job_history_job_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    train_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    lr: Mapped[float | None] = mapped_column(Float, default=None)
    val_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    elapsed_s: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ObjectPin(Base):
    """A pending reference to a stored object: written (committed) before the file, so garbage
    collection keeps the file until the rows that use it are committed (see app.services.objects).

    `pin_id` groups the keys of one upload; a pin whose writer died lapses at `expires_at`.
    """

    __tablename__ = "object_pins"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    pin_id: Mapped[str] = mapped_column(String(36), index=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)
