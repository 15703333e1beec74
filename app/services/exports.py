"""Model exports: the delta itself, a merged open_clip checkpoint and an ONNX classifier.

The checkpoint and the ONNX file (`sparseshot.export` makes them) are built on the first request
for a model and kept in storage as derived objects of its delta, ``<delta key>.checkpoint-V.safetensors``
and ``<delta key>.onnx-V.onnx`` (V = `sparseshot.export.EXPORT_VERSION`, so a new layout is built
afresh), written atomically. They depend on the delta's content only (the delta records its base's
fingerprint), so models sharing a delta share them, and they are deleted together with the delta
file (`objects.remove_unreferenced`). Building runs in the request's thread, one export at a time
per process (a second request for the same file waits, then streams the stored one); the delta is
pinned meanwhile so that a concurrent delete of the model cannot leave an orphaned export.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Conflict, ModelNotReady, NotFound
from app.models import Model, Tenant
from app.services import objects
from app.services.bases import BaseRegistry
from app.services.models import get_model
from app.storage import Storage

if TYPE_CHECKING:
    from sparseshot.base import BaseModel
    from sparseshot.delta import SparseDelta

OCTET = "application/octet-stream"


@dataclass(frozen=True)
class Format:
    """How one export format is named, built and sent."""

    suffix: str  # of the download's filename: <model id><suffix>
    derived: str | None  # stored name beside the delta (None: the delta file itself)
    build: Callable[[BaseModel, SparseDelta], bytes] | None


def _checkpoint(base: BaseModel, delta: SparseDelta) -> bytes:
    from sparseshot.export import merged_checkpoint

    return merged_checkpoint(base, delta)


def _onnx(base: BaseModel, delta: SparseDelta) -> bytes:
    from sparseshot.export import onnx_export

    return onnx_export(base, delta)


def _version() -> int:
    from sparseshot.export import EXPORT_VERSION

    return EXPORT_VERSION


FORMATS: dict[str, Format] = {
    "delta": Format(".safetensors", None, None),
    "checkpoint": Format("-merged.safetensors", f"checkpoint-{_version()}.safetensors", _checkpoint),
    "onnx": Format(".onnx", f"onnx-{_version()}.onnx", _onnx),
}

_build_lock = threading.Lock()  # one export build at a time in this process (CPU and memory heavy)


@dataclass(frozen=True)
class ExportFile:
    path: Path  # local file to stream
    filename: str  # for Content-Disposition
    media_type: str


def export_file(
    *, session: Session, storage: Storage, settings: Settings, bases: BaseRegistry, tenant: Tenant,
    model_id: str, fmt: str,
) -> ExportFile:
    """The model's export in `fmt` (built and stored on first use). 404: not this tenant's model;
    409: the model is not ready, its delta is missing or unusable, or the base cannot be exported
    this way; 503: the base model is unavailable."""
    spec = FORMATS[fmt]
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    if model.status != "ready":
        raise ModelNotReady(f"model {model.id} is {model.status}, not ready")
    if not storage.exists(model.delta_key):
        raise ModelNotReady(f"the delta file of model {model.id} is not available")
    filename = f"{model.id}{spec.suffix}"
    if spec.derived is None:
        return ExportFile(storage.path(model.delta_key), filename, OCTET)
    path = storage.derived_path(model.delta_key, spec.derived)
    if not path.is_file():
        with _build_lock:
            if not path.is_file():  # another request may have built it while this one waited
                model_id = model.id
                _build(session=session, storage=storage, settings=settings, bases=bases, model=model,
                       spec=spec)
                if not path.is_file():  # the model was deleted while it was built: both files went
                    raise NotFound(f"no model {model_id}")
    return ExportFile(path, filename, OCTET)


def _build(
    *, session: Session, storage: Storage, settings: Settings, bases: BaseRegistry, model: Model, spec: Format
) -> None:
    """Build one export from the stored delta and store it beside the delta (delta pinned)."""
    from app.services import inference
    from sparseshot.delta import SparseDelta
    from sparseshot.export import ExportError

    assert spec.build is not None and spec.derived is not None
    model_id, key, base_spec = model.id, model.delta_key, model.base_model
    with objects.pinned(session=session, storage=storage, keys=[key], ttl_s=settings.object_pin_ttl_s):
        if not storage.exists(key):  # deleted between the check above and the pin
            raise ModelNotReady(f"the delta file of model {model_id} is not available")
        # base unavailable: 503; delta unusable: 409
        with inference.serving_errors(model_id, settings, base_spec, bases=bases):
            base = bases.get(base_spec)
            delta = SparseDelta.from_bytes(storage.get(key))
            try:
                data = spec.build(base, delta)
            except ExportError as e:
                raise Conflict(f"model {model_id} cannot be exported in this format: {e}") from e
        storage.put_derived(key, spec.derived, data)
