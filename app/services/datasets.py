"""Datasets and their images: create, list, add images (files or a .zip), delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Conflict, InvalidInput, NotFound, TooLarge
from app.jobs.status import ACTIVE
from app.metrics import IMAGES_REJECTED
from app.models import Dataset, Image, Job, Model, Tenant, new_id
from app.schemas import DatasetCreate, DatasetPublic, ImageAdded, ImageRejected, ImagesAdded
from app.services import images as imgcheck
from app.storage import Storage


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


@dataclass
class _Candidate:
    filename: str
    label: str
    image: imgcheck.CheckedImage


@dataclass
class _Report:
    added: list[ImageAdded] = field(default_factory=list)
    rejected: list[ImageRejected] = field(default_factory=list)

    def reject(self, filename: str, err: imgcheck.Rejected) -> None:
        IMAGES_REJECTED.labels(err.reason).inc()
        self.rejected.append(ImageRejected(filename=filename, detail=err.detail))


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

    Request-level problems (no/both inputs, unknown label, too many files, unsafe or oversized
    archive) refuse the whole request. Bad single images are rejected with their reason while the
    good ones are kept; when nothing is added and some file was invalid the request fails (422).
    """
    dataset = get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    report = _Report()
    if files and archive is not None:
        raise InvalidInput("send either 'files' (with 'label') or one 'archive', not both")
    if archive is not None:
        candidates = _from_archive(archive, dataset, settings, report)
    elif files:
        candidates = _from_files(files, label, dataset, settings, report)
    else:
        raise InvalidInput("no images: send one or more 'files' with a 'label', or one .zip 'archive'")
    _store(session=session, storage=storage, dataset=dataset, candidates=candidates, report=report)
    invalid = [r for r in report.rejected if r.duplicate_of is None]
    if not report.added and invalid:
        raise InvalidInput(
            f"no image was added: {invalid[0].filename}: {invalid[0].detail}",
            extra={"rejected": [r.model_dump() for r in report.rejected]},
        )
    return ImagesAdded(added=report.added, rejected=report.rejected)


def _check_label(label: str, dataset: Dataset) -> None:
    if label not in dataset.classes:
        raise InvalidInput(f"label {label!r} is not one of the dataset's classes: {dataset.classes}")


def _from_files(
    files: list[Upload], label: str | None, dataset: Dataset, settings: Settings, report: _Report
) -> list[_Candidate]:
    if len(files) > settings.max_files_per_request:
        raise TooLarge(
            f"{len(files)} files in one request, over the limit of {settings.max_files_per_request}"
        )
    if label is None or not label.strip():
        raise InvalidInput("'label' is required with 'files'")
    label = label.strip()
    _check_label(label, dataset)
    out = []
    for up in files:
        try:
            data = imgcheck.read_limited(up.file, settings.max_image_bytes)
            out.append(_Candidate(up.filename, label, imgcheck.check_image(data, settings)))
        except imgcheck.Rejected as e:
            report.reject(up.filename, e)
    return out


def _from_archive(archive: Upload, dataset: Dataset, settings: Settings, report: _Report) -> list[_Candidate]:
    out = []
    for member in imgcheck.read_archive(archive.file, settings):
        try:
            if member.error is not None:
                raise member.error
            if member.label is None:
                raise imgcheck.Rejected("not inside a class folder", "no_label")
            if member.label not in dataset.classes:
                raise imgcheck.Rejected(
                    f"folder {member.label!r} is not one of the dataset's classes", "label"
                )
            assert member.data is not None
            out.append(_Candidate(member.filename, member.label, imgcheck.check_image(member.data, settings)))
        except imgcheck.Rejected as e:
            report.reject(member.filename, e)
    return out


def _store(
    *,
    session: Session,
    storage: Storage,
    dataset: Dataset,
    candidates: list[_Candidate],
    report: _Report,
    attempts: int = 3,
) -> None:
    """Write files first (atomic, content-addressed), then commit all rows in one transaction.

    A concurrent upload of the same image trips unique(dataset_id, sha256): the transaction is
    rolled back and duplicates are worked out again.
    """
    for attempt in range(attempts):
        added, dups = _plan(session, dataset, candidates)
        written = [k for k in added if not storage.exists(k)]
        try:
            for c, _row in added.values():
                storage.put(c.image.data)
            session.add_all(row for _c, row in added.values())
            session.commit()
            break
        except IntegrityError as e:
            session.rollback()
            _remove_unreferenced(session=session, storage=storage, keys=written)
            if attempt == attempts - 1:
                raise Conflict("concurrent uploads of the same images; retry") from e
        except BaseException:
            session.rollback()
            _remove_unreferenced(session=session, storage=storage, keys=written)
            raise
    report.rejected.extend(dups)
    for c, row in added.values():
        report.added.append(ImageAdded(image_id=row.id, filename=c.filename, label=row.label))


def _plan(
    session: Session, dataset: Dataset, candidates: list[_Candidate]
) -> tuple[dict[str, tuple[_Candidate, Image]], list[ImageRejected]]:
    """New rows by sha256 (first file wins) and the duplicates (of stored or earlier files)."""
    existing = _existing(session, dataset.id, [c.image.sha256 for c in candidates])
    added: dict[str, tuple[_Candidate, Image]] = {}
    dups: list[ImageRejected] = []
    for c in candidates:
        img = c.image
        dup = existing.get(img.sha256) or (added[img.sha256][1].id if img.sha256 in added else None)
        if dup is not None:
            detail = "exact duplicate of an image in the dataset"
            dups.append(ImageRejected(filename=c.filename, detail=detail, duplicate_of=dup))
            continue
        row = Image(
            id=new_id(), dataset_id=dataset.id, label=c.label, sha256=img.sha256, storage_key=img.sha256,
            filename=c.filename[:255], format=img.format, width=img.width, height=img.height,
            nbytes=len(img.data),
        )  # fmt: skip
        added[img.sha256] = (c, row)
    return added, dups


def _existing(session: Session, dataset_id: str, shas: list[str]) -> dict[str, str]:
    if not shas:
        return {}
    rows = session.execute(
        select(Image.sha256, Image.id).where(Image.dataset_id == dataset_id, Image.sha256.in_(set(shas)))
    )
    return {sha: image_id for sha, image_id in rows}


def _remove_unreferenced(*, session: Session, storage: Storage, keys: list[str]) -> None:
    """Delete stored files that no image or model row uses any more (best effort)."""
    if not keys:
        return
    used = set(session.scalars(select(Image.storage_key).where(Image.storage_key.in_(keys))))
    used |= set(session.scalars(select(Model.delta_key).where(Model.delta_key.in_(keys))))
    for key in set(keys) - used:
        try:
            storage.delete(key)
        except OSError:
            pass


def ensure_idle(*, session: Session, dataset: Dataset) -> None:
    """Conflict (409) while a queued or running job trains on the dataset: its images must not change."""
    active = session.scalar(
        select(func.count()).where(Job.dataset_id == dataset.id, Job.status.in_([s.value for s in ACTIVE]))
    )
    if active:
        raise Conflict(f"dataset {dataset.id} has {active} queued or running job(s); cancel them first")


def delete_dataset(*, session: Session, storage: Storage, tenant: Tenant, dataset_id: str) -> None:
    """Delete a dataset, its image rows and the files no other row uses.

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
    _remove_unreferenced(session=session, storage=storage, keys=keys)
