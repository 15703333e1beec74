"""Datasets and their images: create, list, add images (files or a .zip), delete."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import quotas
from app.core.config import Settings
from app.errors import Conflict, InvalidInput, NotFound, TooLarge
from app.jobs.status import ACTIVE
from app.metrics import IMAGES_REJECTED
from app.models import Dataset, Image, Job, Tenant, new_id
from app.schemas import (
    DatasetCreate,
    DatasetPublic,
    ImageAdded,
    ImageRejected,
    ImagesAdded,
    check_name,
    clean_name,
)
from app.services import images as imgcheck
from app.services import objects
from app.storage import Storage

log = logging.getLogger(__name__)


def create_dataset(*, session: Session, tenant: Tenant, body: DatasetCreate, settings: Settings) -> Dataset:
    if len(body.classes) > settings.max_classes:
        raise InvalidInput(f"{len(body.classes)} classes, over the limit of {settings.max_classes}")
    dataset = Dataset(tenant_id=tenant.id, name=body.name, classes=list(body.classes))
    session.add(dataset)
    session.commit()
    return dataset


def get_dataset(*, session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    """The tenant's dataset; NotFound for unknown ids and other tenants' datasets alike."""
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant.id))
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id}")
    return dataset


def image_counts(*, session: Session, dataset: Dataset) -> dict[str, int]:
    """Images per class, every class listed (0 when empty)."""
    rows = session.execute(
        select(Image.label, func.count()).where(Image.dataset_id == dataset.id).group_by(Image.label)
    )
    found = {label: int(n) for label, n in rows}
    return {c: found.get(c, 0) for c in dataset.classes}


def to_public(*, session: Session, dataset: Dataset) -> DatasetPublic:
    return DatasetPublic(
        id=dataset.id,
        name=dataset.name,
        classes=dataset.classes,
        image_counts=image_counts(session=session, dataset=dataset),
        created_at=dataset.created_at,
    )


def list_datasets(*, session: Session, tenant: Tenant, limit: int, offset: int) -> list[Dataset]:
    query = (
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(query))


@dataclass
class Upload:
    """One incoming file: the client's name (reports only) and a readable stream."""

    filename: str
    file: BinaryIO


# Checked images are written to storage in batches of about this many bytes: memory stays bounded
# whatever the upload's size, and each batch costs one pin commit.
FLUSH_BYTES = 32 * 1024 * 1024


def _display_name(name: str) -> str:
    """The client's file name as stored and reported: printable characters only, at most 255."""
    return "".join(ch if ch.isprintable() else "?" for ch in name[:255])


@dataclass
class _Report:
    added: list[ImageAdded] = field(default_factory=list)
    rejected: list[ImageRejected] = field(default_factory=list)

    def reject(self, filename: str, err: imgcheck.Rejected) -> None:
        IMAGES_REJECTED.labels(err.reason).inc()
        self.rejected.append(ImageRejected(filename=filename, detail=err.detail))

    def duplicate(self, filename: str, image_id: str) -> None:
        detail = "exact duplicate of an image in the dataset"
        self.rejected.append(ImageRejected(filename=filename, detail=detail, duplicate_of=image_id))


@dataclass
class _Batch:
    """New image rows of one request and their files: pinned and written every FLUSH_BYTES, the
    rows committed (and the pins released) at the end. See app.services.objects."""

    session: Session
    storage: Storage
    pin_ttl_s: float  # settings.object_pin_ttl_s
    rows: dict[str, tuple[str, Image]] = field(default_factory=dict)  # sha256 -> (filename, row)
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    pending_bytes: int = 0
    pins: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    def add(self, filename: str, row: Image, data: bytes) -> None:
        self.rows[row.sha256] = (filename, row)
        self.pending.append((row.sha256, data))
        self.pending_bytes += len(data)
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.pins.append(objects.pin(session=self.session, keys=[k for k, _ in self.pending],
                                     ttl_s=self.pin_ttl_s))
        for key, data in self.pending:
            self.written.append(key)
            self.storage.put(data)
        self.pending, self.pending_bytes = [], 0

    def unpin(self) -> None:
        for pin_id in self.pins:
            objects.unpin(session=self.session, pin_id=pin_id)

    def discard(self) -> None:
        """After a failure: release the pins and remove the files written that nothing else uses."""
        try:
            self.session.rollback()
            self.unpin()
            self.session.commit()
            objects.remove_unreferenced(session=self.session, storage=self.storage, keys=self.written)
        except Exception:  # the original error matters more; lapsed pins are collected later
            log.exception("could not clean up after a failed upload")


def add_images(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    dataset_id: str,
    label: str | None,
    files: list[Upload],
    archive: Upload | None,
) -> ImagesAdded:
    """Check every file, store the good new ones, report the rest.

    Request-level problems (no/both inputs, unknown label, too many files, unsafe, empty or
    oversized archive) refuse the whole request. Files are read, deduplicated by hash and decoded
    one at a time. Bad single images are rejected with their reason while the good ones are kept;
    when nothing is added and some file was invalid the request fails (422).
    """
    dataset = get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    quotas.check_images(session=session, tenant=tenant, settings=settings, dataset=dataset, adding=1,
                        lock=False)  # already full: refused before any decoding
    if files and archive is not None:
        raise InvalidInput("send either 'files' (with 'label') or one 'archive', not both")
    if archive is not None:
        items = _from_archive(archive, dataset, settings)
    elif files:
        items = _from_files(files, label, dataset, settings)
    else:
        raise InvalidInput("no images: send one or more 'files' with a 'label', or one .zip 'archive'")
    report = _Report()
    dataset_id = dataset.id
    existing = _known(session, dataset_id)
    batch = _Batch(session, storage, settings.object_pin_ttl_s)
    try:
        for filename, item_label, data in items:
            _take(batch, report, settings, dataset_id, existing, filename, item_label, data)
        batch.flush()
        _commit(batch, report, dataset_id,
                quota=lambda n: quotas.check_images(session=session, tenant=tenant, settings=settings,
                                                    dataset=dataset, adding=n))
    except BaseException:
        batch.discard()
        raise
    invalid = [r for r in report.rejected if r.duplicate_of is None]
    if not report.added and invalid:
        raise InvalidInput(
            f"no image was added: {invalid[0].filename}: {invalid[0].detail}",
            extra={"rejected": [r.model_dump() for r in report.rejected]},
        )
    return ImagesAdded(added=report.added, rejected=report.rejected)


# (filename, label, bytes or the reason the file was refused before decoding)
_Item = tuple[str, str, "bytes | imgcheck.Rejected"]


def _take(batch: _Batch, report: _Report, settings: Settings, dataset_id: str, existing: dict[str, str],
          filename: str, label: str, data: bytes | imgcheck.Rejected) -> None:
    """One file: refused, a duplicate (found by hash, before decoding), or checked and batched."""
    if isinstance(data, imgcheck.Rejected):
        report.reject(filename, data)
        return
    sha = hashlib.sha256(data).hexdigest()
    dup = existing.get(sha) or (batch.rows[sha][1].id if sha in batch.rows else None)
    if dup is not None:
        report.duplicate(filename, dup)
        return
    try:
        img = imgcheck.check_image(data, settings, sha256=sha)
    except imgcheck.Rejected as e:
        report.reject(filename, e)
        return
    row = Image(
        id=new_id(), dataset_id=dataset_id, label=label, sha256=sha, storage_key=sha,
        filename=filename, format=img.format, width=img.width, height=img.height, nbytes=len(data),
    )  # fmt: skip
    batch.add(filename, row, data)


def _commit(batch: _Batch, report: _Report, dataset_id: str,
            quota: Callable[[int], None] = lambda n: None, attempts: int = 3) -> None:
    """Commit the rows and release the pins in one transaction; `quota(n)` checks the tenant's
    image limit for n more rows under the tenant lock, which the commit releases.

    A concurrent upload of the same image trips unique(dataset_id, sha256): those rows become
    duplicates of the other upload's and the rest is committed again. A dataset deleted meanwhile
    trips its foreign key: 404.
    """
    session = batch.session
    for attempt in range(attempts):
        try:
            quota(len(batch.rows))
            session.add_all(row for _f, row in batch.rows.values())
            batch.unpin()
            session.commit()
            break
        except IntegrityError as e:
            session.rollback()
            if session.get(Dataset, dataset_id) is None:
                raise NotFound(f"no dataset {dataset_id}: it was deleted during the upload") from e
            if attempt == attempts - 1:
                raise Conflict("concurrent uploads of the same images; retry") from e
            taken = _existing(session, dataset_id, list(batch.rows))
            for sha, image_id in taken.items():
                filename, _row = batch.rows.pop(sha)
                report.duplicate(filename, image_id)
    for filename, row in batch.rows.values():
        report.added.append(ImageAdded(image_id=row.id, filename=filename, label=row.label))


def _match_label(label: str, dataset: Dataset) -> str | None:
    """The dataset's class that `label` names (compared NFC-normalised), or None."""
    wanted = clean_name(label)
    return next((c for c in dataset.classes if clean_name(c) == wanted), None)


def _from_files(
    files: list[Upload], label: str | None, dataset: Dataset, settings: Settings
) -> Iterator[_Item]:
    if len(files) > settings.max_files_per_request:
        raise TooLarge(
            f"{len(files)} files in one request, over the limit of {settings.max_files_per_request}"
        )
    if label is None or not label.strip():
        raise InvalidInput("'label' is required with 'files'")
    try:
        cls = _match_label(check_name(label, "label"), dataset)
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    if cls is None:
        raise InvalidInput(f"label {label[:200]!r} is not one of the dataset's classes: {dataset.classes}")
    return _read_files(files, cls, settings)


def _read_files(files: list[Upload], label: str, settings: Settings) -> Iterator[_Item]:
    for up in files:
        try:
            yield _display_name(up.filename), label, imgcheck.read_limited(up.file, settings.max_image_bytes)
        except imgcheck.Rejected as e:
            yield _display_name(up.filename), label, e


def _from_archive(archive: Upload, dataset: Dataset, settings: Settings) -> Iterator[_Item]:
    members = imgcheck.read_archive(archive.file, settings)  # whole-archive checks happen here
    return _read_members(members, dataset)


def _read_members(members: Iterator[imgcheck.ArchiveMember], dataset: Dataset) -> Iterator[_Item]:
    for member in members:
        name = _display_name(member.filename)
        cls = _match_label(member.label, dataset) if member.label is not None else None
        if member.error is not None:
            yield name, cls or "", member.error
        elif member.label is None:
            yield name, "", imgcheck.Rejected("not inside a class folder", "no_label")
        elif cls is None:
            detail = f"folder {member.label[:200]!r} is not one of the dataset's classes"
            yield name, "", imgcheck.Rejected(detail, "label")
        else:
            assert member.data is not None
            yield name, cls, member.data


def _known(session: Session, dataset_id: str) -> dict[str, str]:
    """sha256 -> image id of every image of the dataset (duplicates are found before decoding)."""
    rows = session.execute(select(Image.sha256, Image.id).where(Image.dataset_id == dataset_id))
    return dict(rows.tuples().all())


def _existing(session: Session, dataset_id: str, shas: list[str]) -> dict[str, str]:
    if not shas:
        return {}
    rows = session.execute(
        select(Image.sha256, Image.id).where(Image.dataset_id == dataset_id, Image.sha256.in_(set(shas)))
    )
    return {sha: image_id for sha, image_id in rows}


def ensure_idle(*, session: Session, dataset: Dataset) -> None:
    """Conflict (409) while a queued or running job trains on the dataset: its images must not change."""
    active = session.scalar(
        select(func.count()).where(Job.dataset_id == dataset.id, Job.status.in_([s.value for s in ACTIVE]))
    )
    if active:
        raise Conflict(f"dataset {dataset.id} has {active} queued or running job(s); cancel them first")


def delete_dataset(*, session: Session, storage: Storage, tenant: Tenant, dataset_id: str) -> None:
    """Delete a dataset, its image rows and the files no other row (or pending upload) uses.

    Refused (409) while a queued or running job trains on it: cancel those jobs first.
    Finished jobs keep their record with `dataset_id` set to null.
    """
    dataset = get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    ensure_idle(session=session, dataset=dataset)
    keys = list(session.scalars(select(Image.storage_key).where(Image.dataset_id == dataset.id)))
    session.execute(update(Job).where(Job.dataset_id == dataset.id).values(dataset_id=None))
    session.execute(delete(Image).where(Image.dataset_id == dataset.id))
    session.delete(dataset)
    session.commit()
    objects.remove_unreferenced(session=session, storage=storage, keys=keys)
