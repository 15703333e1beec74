"""Adapted models: creation (zero-shot, import, training results), read, list, delta download,
classify, delete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import quotas
from app.core.config import Settings
from app.errors import InvalidInput, ModelNotReady, NotFound, TooLarge
from app.models import Job, Model, Tenant
from app.schemas import ClassifyPublic, DeltaInfo, ModelPublic, Prediction, ZeroshotCreate
from app.services import images as imgcheck
from app.services import objects
from app.services.datasets import Upload
from app.services.jobs import resolve_base_model, validate_params
from app.storage import Storage
from sparseshot.delta import DeltaError, SparseDelta

if TYPE_CHECKING:
    from app.services.bases import BaseRegistry
    from app.services.inference import Serving
    from sparseshot.base import BaseModel


def store_delta(*, storage: Storage, delta: SparseDelta, data: bytes | None = None) -> str:
    """The delta's file into content-addressed storage (written atomically there); returns its key.

    data: the delta's file as received (an import keeps the exact bytes), else delta.to_bytes()."""
    return storage.put(data if data is not None else delta.to_bytes())


def add_model(
    *, session: Session, tenant_id: str, delta: SparseDelta, key: str, base_model: str, method: str,
    job_id: str | None = None, name: str | None = None, metrics: dict[str, Any] | None = None,
) -> Model:
    """The Model row of a stored delta, added to `session` and flushed, not committed (a caller
    such as the training worker commits it with its own conditional updates, in one transaction)."""
    meta = delta.meta or {}
    model = Model(
        tenant_id=tenant_id, job_id=job_id, name=name, classes=list(meta.get("classes") or []),
        base_model=base_model, method=method, template=meta.get("template"), delta_key=key,
        nnz=int(delta.nnz), nbytes=int(delta.nbytes), density=float(delta.density), metrics=metrics or {},
    )  # fmt: skip
    session.add(model)
    session.flush()
    return model


def create_model_from_delta(
    *, session: Session, storage: Storage, settings: Settings, tenant: Tenant, delta: SparseDelta,
    base_model: str,
    method: str, job_id: str | None = None, name: str | None = None, metrics: dict[str, Any] | None = None,
    data: bytes | None = None,
) -> Model:
    """The one way a model comes to exist: delta stored, then its row committed.

    Used by zero-shot creation and import here, and (as store_delta + add_model) by the training
    worker. A failed commit leaves at most an unreferenced content-addressed file, removed here."""
    data = data if data is not None else delta.to_bytes()
    key = hashlib.sha256(data).hexdigest()  # = the storage key (content-addressed)
    pin_id = objects.pin(session=session, keys=[key], ttl_s=settings.object_pin_ttl_s)  # before the file
    try:
        stored = store_delta(storage=storage, delta=delta, data=data)
        quotas.check_new_model(session=session, tenant=tenant, settings=settings)  # locked until the commit
        model = add_model(session=session, tenant_id=tenant.id, delta=delta, key=stored,
                          base_model=base_model,
                          method=method, job_id=job_id, name=name, metrics=metrics)
        objects.unpin(session=session, pin_id=pin_id)  # the row now holds the key: one commit
        session.commit()
    except BaseException:
        session.rollback()
        objects.unpin(session=session, pin_id=pin_id)
        session.commit()
        objects.remove_unreferenced(session=session, storage=storage, keys=[key])
        raise
    return model


def create_zeroshot(
    *, session: Session, storage: Storage, settings: Settings, bases: BaseRegistry, tenant: Tenant,
    body: ZeroshotCreate,
) -> Model:
    """A model from class names alone (text embeddings of the prompts), usable at once."""
    from app.services import inference  # loads torch and open_clip: only when a model is made

    if len(body.classes) > settings.max_classes:
        raise InvalidInput(f"{len(body.classes)} classes, over the limit of {settings.max_classes}")
    # The recipe's check and default, so the model row records the template actually used.
    template = validate_params("zeroshot", {"template": body.template} if body.template else {})["template"]
    base_model = resolve_base_model(body.base_model, settings)
    quotas.check_new_model(session=session, tenant=tenant, settings=settings, lock=False)  # before the work
    with inference.serving_errors(None, settings, base_model, bases=bases):
        delta = inference.zeroshot_delta(bases=bases, classes=list(body.classes), base_model=base_model,
                                         template=template)
    return create_model_from_delta(session=session, storage=storage, settings=settings, tenant=tenant,
                                   delta=delta, base_model=base_model, method="zeroshot", name=body.name)


def import_model(
    *, session: Session, storage: Storage, settings: Settings, bases: BaseRegistry, tenant: Tenant,
    upload: Upload, name: str | None,
) -> Model:
    """A model from a delta file made by sparseshot for this server's base; nothing is stored
    unless every check passes (size, format and checksum, base fingerprint, classes, embeddings)."""
    from app.services import inference

    data = upload.file.read(settings.max_delta_bytes + 1)
    if len(data) > settings.max_delta_bytes:
        raise TooLarge(f"the delta file is over the limit of {settings.max_delta_bytes} bytes")
    try:
        delta = SparseDelta.from_bytes(data)
    except DeltaError as e:
        raise InvalidInput(f"not a valid sparseshot delta file: {e}") from None
    spec = _import_base(delta, settings)
    with inference.serving_errors(None, settings, spec, bases=bases):
        base = bases.get(spec)
    _check_import(delta, base, settings)
    method = str(delta.meta.get("method") or "imported")[:32]
    quotas.check_new_model(session=session, tenant=tenant, settings=settings, lock=False)
    return create_model_from_delta(session=session, storage=storage, settings=settings, tenant=tenant,
                                   delta=delta, base_model=spec, method=method, name=name, data=data)


def _import_base(delta: SparseDelta, settings: Settings) -> str:
    """The served base spec the delta names (when allowed here), else the default base."""
    named = delta.meta.get("base_model")
    return named if named in settings.allowed_base_models else settings.base_model


def _check_import(delta: SparseDelta, base: BaseModel, settings: Settings) -> None:
    """InvalidInput unless the delta fits `base` and carries what serving needs."""
    if not delta.meta.get("base_fingerprint"):
        raise InvalidInput("the delta records no base_fingerprint; it cannot be checked against this base")
    try:
        delta.check(base.model, fingerprint=base.fingerprint)
    except DeltaError as e:
        raise InvalidInput(f"the delta was made for another base model: {e}") from None
    classes = delta.meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise InvalidInput("the delta's meta must list at least two class names under 'classes'")
    if len(classes) > settings.max_classes or len(set(classes)) != len(classes):
        raise InvalidInput(f"the delta's classes must be distinct and at most {settings.max_classes}")
    emb = delta.class_embeddings
    dim = base.model.visual.output_dim  # type: ignore[union-attr]
    if emb is None or tuple(emb.shape) != (len(classes), dim) or not emb.is_floating_point():
        raise InvalidInput(f"the delta must carry class_embeddings of shape ({len(classes)}, {dim})")


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
    objects.remove_unreferenced(session=session, storage=storage, keys=[key])


Threshold = float | dict[str, float | None]
_THRESHOLD_FORM = "threshold must be a number in [0, 1] or a JSON object of class -> number in [0, 1]"


def parse_threshold(text: str | None, classes: list[str]) -> Threshold | None:
    """classify's `threshold` form field: a number in [0, 1], or a JSON object of class -> number in
    [0, 1] or null (a class left out or null is not cut). None when absent or empty; 422 otherwise."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidInput(_THRESHOLD_FORM) from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(classes))
        if unknown:
            raise InvalidInput(f"threshold names classes the model does not have: {', '.join(unknown[:10])}")
        if not all(v is None or _unit(v) for v in value.values()):
            raise InvalidInput("every per-class threshold must be a number in [0, 1] or null")
        return {k: (None if v is None else float(v)) for k, v in value.items()}
    if not _unit(value):
        raise InvalidInput(_THRESHOLD_FORM)
    return float(value)


def _unit(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0


def _cut(labels: list[dict[str, Any]], threshold: Threshold) -> list[dict[str, Any]]:
    """The labels (best first) whose score reaches their threshold."""
    def bar(label: str) -> float:
        t = threshold.get(label) if isinstance(threshold, dict) else threshold
        return 0.0 if t is None else t

    return [ls for ls in labels if ls["score"] >= bar(ls["label"])]


def check_servable(*, model: Model, storage: Storage) -> None:
    """409 unless the model is ready and its delta file is there."""
    if model.status != "ready":
        raise ModelNotReady(f"model {model.id} is {model.status}, not ready")
    if not storage.exists(model.delta_key):
        raise ModelNotReady(f"the delta file of model {model.id} is not available")


def classify(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    serving: Serving,
    tenant: Tenant,
    model_id: str,
    files: list[Upload],
    top_k: int,
    threshold: str | None = None,
) -> ClassifyPublic:
    """Top-k labels per image, those under `threshold` (see parse_threshold) dropped; an image
    with none left is `unknown`. Any bad image fails the request (422) listing every rejection."""
    from app.services import inference

    model = get_model(session=session, tenant=tenant, model_id=model_id)
    check_servable(model=model, storage=storage)
    cut = parse_threshold(threshold, list(model.classes))
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
    with inference.serving_errors(model.id, settings, model.base_model, bases=serving.bases):
        results = inference.classify(model=model, images=decoded, top_k=min(top_k, len(model.classes)),
                                     storage=storage, serving=serving)
    if cut is not None:
        results = [{**r, "labels": _cut(r["labels"], cut)} for r in results]
        results = [{**r, "unknown": not r["labels"]} for r in results]
    return ClassifyPublic(predictions=[Prediction.model_validate(r) for r in results])


def to_public(model: Model) -> ModelPublic:
    return ModelPublic(
        id=model.id, status=model.status, classes=model.classes, base_model=model.base_model,
        name=model.name, method=model.method, template=model.template, job_id=model.job_id,
        delta=DeltaInfo(nnz=model.nnz, bytes=model.nbytes, density=model.density),
        metrics=model.metrics or {}, created_at=model.created_at,
    )  # fmt: skip
