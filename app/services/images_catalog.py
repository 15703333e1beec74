"""The images of a dataset once stored: list, thumbnail, relabel, delete.

Uploading and checking new files is `app.services.datasets.add_images`; this module works on rows
that already exist. Changes are refused (409) while a queued or running job trains on the dataset,
since the worker reads the dataset's images when it starts and on a retry.
"""

from __future__ import annotations

import enum
import io

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NotFound
from app.models import Dataset, Image, Tenant
from app.schemas import ImagePublic
from app.services import datasets as datasets_svc
from app.services import objects
from app.storage import Storage, StorageError


class ThumbnailSize(enum.IntEnum):
    """Longest side in pixels: a few fixed sizes, so the cache stays bounded per image."""

    small = 64
    medium = 128
    large = 256

THUMBNAIL_FORMAT = "JPEG"
THUMBNAIL_MEDIA_TYPE = "image/jpeg"


def to_public(image: Image) -> ImagePublic:
    return ImagePublic(
        image_id=image.id,
        filename=image.filename,
        label=image.label,
        width=image.width,
        height=image.height,
        created_at=image.created_at,
        thumbnail_url=f"/v1/datasets/{image.dataset_id}/images/{image.id}/thumbnail",
    )


def list_images(
    *, session: Session, tenant: Tenant, dataset_id: str, label: str | None, limit: int, offset: int
) -> list[Image]:
    """The dataset's images, oldest first, optionally of one class (which must be a class)."""
    dataset = datasets_svc.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    query = select(Image).where(Image.dataset_id == dataset.id)
    if label is not None:
        _check_label(label, dataset)
        query = query.where(Image.label == label)
    query = query.order_by(Image.created_at, Image.id).limit(limit).offset(offset)
    return list(session.scalars(query))


def _check_label(label: str, dataset: Dataset) -> None:
    if label not in dataset.classes:
        raise InvalidInput(f"label {label!r} is not one of the dataset's classes: {dataset.classes}")


def get_image(*, session: Session, tenant: Tenant, dataset_id: str, image_id: str) -> tuple[Dataset, Image]:
    """The image of the tenant's dataset; NotFound for unknown ids and other tenants' alike."""
    dataset = datasets_svc.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    image = session.scalar(select(Image).where(Image.id == image_id, Image.dataset_id == dataset.id))
    if image is None:
        raise NotFound(f"no image {image_id} in dataset {dataset.id}")
    return dataset, image


def relabel_image(
    *, session: Session, tenant: Tenant, dataset_id: str, image_id: str, label: str
) -> Image:
    """Move an image to another class of its dataset (409 while a job trains on it)."""
    dataset, image = get_image(session=session, tenant=tenant, dataset_id=dataset_id, image_id=image_id)
    _check_label(label, dataset)
    datasets_svc.ensure_idle(session=session, dataset=dataset)
    image.label = label
    session.commit()
    return image


def delete_image(
    *, session: Session, storage: Storage, tenant: Tenant, dataset_id: str, image_id: str
) -> None:
    """Delete the image row; its file goes once no other row uses it (409 while a job trains)."""
    dataset, image = get_image(session=session, tenant=tenant, dataset_id=dataset_id, image_id=image_id)
    datasets_svc.ensure_idle(session=session, dataset=dataset)
    key = image.storage_key
    session.delete(image)
    session.commit()
    objects.remove_unreferenced(session=session, storage=storage, keys=[key])


def thumbnail(
    *, session: Session, storage: Storage, tenant: Tenant, dataset_id: str, image_id: str,
    size: ThumbnailSize,
) -> bytes:  # fmt: skip
    """JPEG bytes of the image fitted in size x size, made once and cached beside the stored file."""
    _dataset, image = get_image(session=session, tenant=tenant, dataset_id=dataset_id, image_id=image_id)
    name = f"thumb-{int(size)}.jpg"
    cached = storage.get_derived(image.storage_key, name)
    if cached is not None:
        return cached
    try:
        data = storage.get(image.storage_key)
    except StorageError as e:
        raise NotFound(f"the file of image {image.id} is missing from storage") from e
    thumb = render_thumbnail(data, int(size))
    storage.put_derived(image.storage_key, name, thumb)
    return thumb


def render_thumbnail(data: bytes, size: int) -> bytes:
    """Encode `data` (an image checked at upload) as a JPEG whose longer side is at most `size`."""
    with PILImage.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly (fast, little memory)
        im.seek(0)  # first frame of an animated GIF/WEBP
        rgb = im.convert("RGB")
    rgb.thumbnail((size, size))
    out = io.BytesIO()
    rgb.save(out, format=THUMBNAIL_FORMAT, quality=80)
    return out.getvalue()
