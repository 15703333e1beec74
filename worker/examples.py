"""A job's training examples: the dataset's classes, its images decoded from storage, their labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from app import quotas
from app.db import session_scope
from app.errors import QuotaExceeded
from app.jobs.lifecycle import Claim
from app.models import Dataset, Image, Tenant
from app.runtime import Runtime

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


class JobError(Exception):
    """A job that cannot run as submitted (reason shown to the client)."""


def load_examples(claim: Claim, runtime: Runtime) -> tuple[list[str], list[PILImage], list[int]]:
    """The dataset's classes, its images (RGB PIL, shorter side at most the model's input size:
    the training crops are resized to it anyway) and their label indices."""
    # PIL only in the pool process that trains (the worker's main process stays light).
    from app.services.images import Rejected, decode_stored

    if claim.dataset_id is None:
        raise JobError("the dataset was deleted")
    with session_scope(runtime.engine) as s:
        dataset = s.get(Dataset, claim.dataset_id)
        if dataset is None:
            raise JobError("the dataset was deleted")
        classes = list(dataset.classes)
        rows = s.execute(
            select(Image.storage_key, Image.label).where(Image.dataset_id == claim.dataset_id)
            .order_by(Image.created_at, Image.id)
        ).all()
        tenant = s.get(Tenant, claim.tenant_id)
        if rows and tenant is not None:
            _check_steps(claim, runtime, tenant, len(rows), len(classes))
    if not rows:
        raise JobError("the dataset has no images")
    side, max_pixels = runtime.bases.get(claim.base_model).image_size, runtime.settings.max_image_pixels
    index = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for key, label in rows:
        if label not in index:
            raise JobError(f"image label {label!r} is not a class of the dataset")
        try:  # one at a time, reduced before the next is read
            images.append(decode_stored(runtime.storage.get(key), side, max_pixels))
        except Rejected as e:
            raise JobError(f"a stored image cannot be read: {e.detail}") from e
        labels.append(index[label])
    return classes, images, labels


def _check_steps(claim: Claim, runtime: Runtime, tenant: Tenant, n_images: int, n_classes: int) -> None:
    # Again with the images there now: ones added after the submit raise the step count (shots).
    try:
        quotas.check_steps(tenant=tenant, settings=runtime.settings, hparams=claim.params,
                           n_images=n_images, n_classes=n_classes)
    except QuotaExceeded as e:
        raise JobError(e.detail) from e
