"""/v1/models: zero-shot creation, import, list, read, delete, delta download, classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.responses import FileResponse

from app.api.deps import PageDep, SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.responses import QUOTA_RESPONSES, problem_responses
from app.schemas import ClassifyPublic, ModelPublic, ZeroshotCreate
from app.services import models as svc
from app.services.datasets import Upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problem_responses())


@router.post("/zeroshot", status_code=status.HTTP_201_CREATED, responses=QUOTA_RESPONSES)
def create_zeroshot(
    body: ZeroshotCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep, storage: StorageDep
) -> ModelPublic:
    """Create a zero-shot model.

    A classifier of the base model from the class names alone (no training): each class's text
    embedding of `template` (with `{}` for the name).
    """
    model = svc.create_zeroshot(session=session, storage=storage, settings=settings, tenant=tenant, body=body)
    return svc.to_public(model)


@router.post("/import", status_code=status.HTTP_201_CREATED, responses=QUOTA_RESPONSES)
def import_model(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    delta: Annotated[UploadFile, File(description="A sparseshot delta file (.safetensors) for this base.")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> ModelPublic:
    """Import a model from a delta file.

    A sparseshot delta (`.safetensors`, as `GET /v1/models/{id}/delta` returns) made for this
    server's base model (its weight fingerprint is checked) becomes a ready model of your tenant.
    """
    upload = Upload(delta.filename or "delta.safetensors", delta.file)
    model = svc.import_model(session=session, storage=storage, settings=settings, tenant=tenant,
                             upload=upload, name=(name or "").strip() or None)
    return svc.to_public(model)


@router.get("")
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
) -> list[ModelPublic]:
    """List your models.

    Newest first, `limit` per page from `offset`.
    """
    rows = svc.list_models(session=session, tenant=tenant, limit=page.limit, offset=page.offset)
    return [svc.to_public(m) for m in rows]


@router.get("/{model_id}")
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    """Get a model.

    Its classes, base model, method, delta size and training metrics.
    """
    return svc.to_public(svc.get_model(session=session, tenant=tenant, model_id=model_id))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> Response:
    """Delete a model.

    The delta file goes once no other model uses it.
    """
    svc.delete_model(session=session, storage=storage, tenant=tenant, model_id=model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{model_id}/delta",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The delta (safetensors)."}},
)
def download_delta(
    model_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> FileResponse:
    """Download a model's sparse delta.

    The weight changes over the base model as a safetensors file.
    """
    path = svc.delta_path(session=session, storage=storage, tenant=tenant, model_id=model_id)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.safetensors")


@router.post("/{model_id}/classify")
def classify(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    files: Annotated[
        list[UploadFile], File(description="Images to classify.", json_schema_extra={"minItems": 1})
    ],
    top_k: Annotated[int, Form(ge=1)] = 5,
) -> ClassifyPublic:
    """Classify images with a model.

    For each of `files`, the `top_k` classes with their scores, best first.
    """
    return svc.classify(
        session=session,
        storage=storage,
        settings=settings,
        tenant=tenant,
        model_id=model_id,
        files=[Upload(f.filename or "upload", f.file) for f in files],
        top_k=top_k,
    )
