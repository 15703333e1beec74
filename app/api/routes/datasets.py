"""/v1/datasets: create, list, read, delete, add images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.api.deps import PageDep, SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.responses import QUOTA_RESPONSES, problem_responses
from app.schemas import DatasetCreate, DatasetPublic, ImagesAdded
from app.services import datasets as svc

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problem_responses())


@router.post("", status_code=status.HTTP_201_CREATED)
def create_dataset(
    body: DatasetCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> DatasetPublic:
    """Create a dataset.

    A named set of at least two distinct classes; add images with
    `POST /v1/datasets/{dataset_id}/images`.
    """
    dataset = svc.create_dataset(session=session, tenant=tenant, body=body, settings=settings)
    return svc.to_public(session=session, dataset=dataset)


@router.get("")
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
) -> list[DatasetPublic]:
    """List your datasets.

    Newest first, `limit` per page from `offset`, each with its image count per class.
    """
    rows = svc.list_datasets(session=session, tenant=tenant, limit=page.limit, offset=page.offset)
    return [svc.to_public(session=session, dataset=d) for d in rows]


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    """Get a dataset.

    Its classes and image count per class. Other tenants' datasets answer 404.
    """
    dataset = svc.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    return svc.to_public(session=session, dataset=dataset)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> Response:
    """Delete a dataset.

    Its images go too (files once no other dataset uses them); finished jobs keep their record.
    Refused with 409 while a queued or running job trains on it: cancel those first.
    """
    svc.delete_dataset(session=session, storage=storage, tenant=tenant, dataset_id=dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{dataset_id}/images", status_code=status.HTTP_201_CREATED, responses=QUOTA_RESPONSES)
def add_images(
    dataset_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    # Optional parts typed without `| None`: the schema then offers no `null`, which a form cannot send.
    label: Annotated[str, Form(description="Class of every file in `files`.")] = None,  # type: ignore[assignment]
    files: Annotated[list[UploadFile], File(description="Images of class `label`.")] = None,  # type: ignore[assignment]
    archive: Annotated[UploadFile, File(description=".zip with one folder per class.")] = None,  # type: ignore[assignment]
) -> ImagesAdded:
    """Add images to a dataset.

    Either `files` (one or more images) with the `label` they all have, or one `archive`
    (.zip with one folder per class, named like the classes). Each file is checked (format,
    size, pixels, completeness); bad ones are listed under `rejected` with the reason while the
    good ones are stored, and exact duplicates are reported with the image they repeat.
    """
    return svc.add_images(
        session=session,
        storage=storage,
        settings=settings,
        tenant=tenant,
        dataset_id=dataset_id,
        label=label,
        files=[svc.Upload(f.filename or "upload", f.file) for f in files or []],
        archive=svc.Upload(archive.filename or "archive.zip", archive.file) if archive else None,
    )
