"""Adapted models: zero-shot creation, read, list, delta download, classify, delete."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import InvalidInput, ModelNotReady, NotFound, TooLarge, Unavailable
from app.models import Image, Job, Model, Tenant
from app.schemas import ClassifyPublic, DeltaInfo, ModelPublic, Prediction, ZeroshotCreate
from app.services import images as imgcheck
from app.services.datasets import Upload
from app.services.jobs import resolve_base_model, validate_params
from app.storage import Storage


@contextmanager
def _serving_errors(model_id: str | None) -> Iterator[None]:
    """A corrupt delta: the model cannot be served (409). No base model: unavailable (503)."""
    from sparseshot.base import BaseModelError
    from sparseshot.delta import DeltaError

    try:
        yield
    except DeltaError as e:
        raise ModelNotReady(f"the delta of model {model_id} cannot be loaded: {e}") from e
    except BaseModelError as e:
        raise Unavailable(f"the base model is not available: {e}") from e


def create_zeroshot(*, session: Session, settings: Settings, tenant: Tenant, body: ZeroshotCreate) -> Model:
    """A model from class names alone (text embeddings of the prompts), usable at once."""
    from app.services import inference

    if len(body.classes) > settings.max_classes:
        raise InvalidInput(f"{len(body.classes)} classes, over the limit of {settings.max_classes}")
    # The recipe's check and default, so the model row records the template actually used.
    template = validate_params("zeroshot", {"template": body.template} if body.template else {})["template"]
    base_model = resolve_base_model(body.base_model, settings)
    with _serving_errors(None):
        key, nnz, nbytes, density = inference.create_zeroshot_delta(
            classes=list(body.classes), base_model=base_model, template=template
        )
    model = Model(
        tenant_id=tenant.id, classes=list(body.classes), base_model=base_model, method="zeroshot",
        template=template, delta_key=key, nnz=nnz, nbytes=nbytes, density=density, metrics={},
    )  # fmt: skip
    session.add(model)
    session.commit()
    return model


def get_model(*, session: Session, tenant: Tenant, model_id: str) -> Model:
    model = session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant.id))
    if model is None:
        raise NotFound(f"no model {model_id}")
    return model


def list_models(*, session: Session, tenant: Tenant, limit: int, offset: int) -> list[Model]:
    query = (
        select(Model)
        .where(Model.tenant_id == tenant.id)
        .order_by(Model.created_at.desc(), Model.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


def delta_path(*, session: Session, storage: Storage, tenant: Tenant, model_id: str) -> Path:
    """Local path of the model's delta file (409 when the file is missing)."""
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    path = storage.path(model.delta_key)
    if not path.is_file():
        raise ModelNotReady(f"the delta file of model {model.id} is not available")
    return path


def delete_model(*, session: Session, storage: Storage, tenant: Tenant, model_id: str) -> None:
    """Delete the row; jobs keep their record (model_id null); the file goes when nothing uses it."""
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    key = model.delta_key
    session.execute(update(Job).where(Job.model_id == model.id).values(model_id=None))
    session.delete(model)
    session.commit()
    in_use = session.scalar(select(Model.id).where(Model.delta_key == key).limit(1)) or session.scalar(
        select(Image.id).where(Image.storage_key == key).limit(1)
    )
    if in_use is None:
        storage.delete(key)


def classify(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    model_id: str,
    files: list[Upload],
    top_k: int,
) -> ClassifyPublic:
    """Top-k labels per image. Any bad image fails the request (422) listing every rejection."""
    from app.services import inference

    model = get_model(session=session, tenant=tenant, model_id=model_id)
    if model.status != "ready":
        raise ModelNotReady(f"model {model.id} is {model.status}, not ready")
    if not storage.exists(model.delta_key):
        raise ModelNotReady(f"the delta file of model {model.id} is not available")
    if not files:
        raise InvalidInput("no images: send one or more 'files'")
    if len(files) > settings.max_files_per_request:
        raise TooLarge(
            f"{len(files)} files in one request, over the limit of {settings.max_files_per_request}"
        )
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidInput(f"top_k must be between 1 and {settings.max_top_k}")
    decoded, rejected = [], []
    for up in files:
        try:
            data = imgcheck.read_limited(up.file, settings.max_image_bytes)
            decoded.append((up.filename, imgcheck.decode_rgb(data, settings)))
        except imgcheck.Rejected as e:
            rejected.append({"filename": up.filename, "detail": e.detail})
    if rejected:
        first = rejected[0]
        raise InvalidInput(f"{first['filename']}: {first['detail']}", extra={"rejected": rejected})
    with _serving_errors(model.id):
        results = inference.classify(model=model, images=decoded, top_k=min(top_k, len(model.classes)))
    return ClassifyPublic(predictions=[Prediction.model_validate(r) for r in results])


def to_public(model: Model) -> ModelPublic:
    return ModelPublic(
        id=model.id, status=model.status, classes=model.classes, base_model=model.base_model,
        method=model.method, template=model.template, job_id=model.job_id,
        delta=DeltaInfo(nnz=model.nnz, bytes=model.nbytes, density=model.density),
        metrics=model.metrics or {}, created_at=model.created_at,
    )  # fmt: skip
