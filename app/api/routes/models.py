"""/v1/models: zero-shot creation, import, list, read, delete, delta download, export, classify,
evaluations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import FileResponse

from app.api.deps import BasesDep, PageDep, ServingDep, SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.responses import QUOTA_RESPONSES, Problem, problem_responses
from app.schemas import (
    ClassifyPublic,
    EvaluationCreate,
    EvaluationPublic,
    ExportFormat,
    ModelPublic,
    ZeroshotCreate,
)
from app.services import evaluations as evals
from app.services import exports
from app.services import models as svc
from app.services.datasets import Upload

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problem_responses())


@router.post("/zeroshot", status_code=status.HTTP_201_CREATED, responses=QUOTA_RESPONSES)
def create_zeroshot(
    body: ZeroshotCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep, storage: StorageDep,
    bases: BasesDep,
) -> ModelPublic:
    """Create a zero-shot model.

    A classifier of the base model from the class names alone (no training): each class's text
    embedding of `template` (with `{}` for the name).
    """
    model = svc.create_zeroshot(session=session, storage=storage, settings=settings, bases=bases,
                                tenant=tenant, body=body)
    return svc.to_public(model)


@router.post("/import", status_code=status.HTTP_201_CREATED, responses=QUOTA_RESPONSES)
def import_model(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    bases: BasesDep,
    delta: Annotated[UploadFile, File(description="A sparseshot delta file (.safetensors) for this base.")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> ModelPublic:
    """Import a model from a delta file.

    A sparseshot delta (`.safetensors`, as `GET /v1/models/{id}/delta` returns) made for this
    server's base model (its weight fingerprint is checked) becomes a ready model of your tenant.
    """
    upload = Upload(delta.filename or "delta.safetensors", delta.file)
    model = svc.import_model(session=session, storage=storage, settings=settings, bases=bases, tenant=tenant,
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


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "The export file (`Content-Disposition` names it): `<id>.safetensors` (delta), "
                             "`<id>-merged.safetensors` (checkpoint) or `<id>.onnx`."},
        409: {"model": Problem,
              "description": "The model is not ready, its delta file is missing or unusable, or its base "
                             "cannot be exported in this format."},
    },
)
def export_model(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
    bases: BasesDep,
    format: Annotated[ExportFormat, Query(
        description="`delta`: the sparse delta (as `/delta`); `checkpoint`: the merged open_clip "
                    "checkpoint (safetensors, model config and classes in its metadata); `onnx`: the "
                    "adapted vision tower with the class embeddings, pixels (N,3,S,S) to probabilities "
                    "(N,C), class names in its metadata.",
        examples=["onnx"],
    )],
) -> FileResponse:
    """Export a model.

    Download the model as a sparse delta, a merged open_clip checkpoint or an ONNX classifier that
    gives the service's probabilities. Checkpoint and ONNX files are built on the first request
    (under a second for the tiny base, about 10 s for ViT-B-16 on CPU), then served from storage.
    """
    out = exports.export_file(session=session, storage=storage, settings=settings, bases=bases, tenant=tenant,
                              model_id=model_id, fmt=format)
    return FileResponse(out.path, media_type=out.media_type, filename=out.filename)


@router.post("/{model_id}/classify")
def classify(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    serving: ServingDep,
    files: Annotated[
        list[UploadFile], File(description="Images to classify.", json_schema_extra={"minItems": 1})
    ],
    top_k: Annotated[int, Form(ge=1)] = 5,
    threshold: Annotated[
        str | None,
        Form(
            description="Drop labels whose probability is below it: a number in [0, 1] (e.g. `0.5`) or a "
            'JSON object of class -> number or null (e.g. `{"cat": 0.7}`; classes left out are not cut), '
            "such as an evaluation's `suggested_thresholds`. An image with no label left is `unknown`.",
            examples=["0.5"],
        ),
    ] = None,
) -> ClassifyPublic:
    """Classify images with a model.

    For each of `files`, the `top_k` classes with their scores (softmax probabilities over the
    model's classes), best first. With `threshold`, labels under it are dropped from those
    `top_k`; an image with none left has `labels: []` and `unknown: true`.
    """
    return svc.classify(
        session=session,
        storage=storage,
        settings=settings,
        serving=serving,
        tenant=tenant,
        model_id=model_id,
        files=[Upload(f.filename or "upload", f.file) for f in files],
        top_k=top_k,
        threshold=threshold,
    )


@router.post("/{model_id}/evaluations", status_code=status.HTTP_201_CREATED)
def create_evaluation(
    model_id: str, body: EvaluationCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    storage: StorageDep, serving: ServingDep,
) -> EvaluationPublic:
    """Evaluate a model on a labelled dataset.

    Every image of the dataset `dataset_id` (yours; others are 404) whose label is one of the
    model's classes is classified through the serving path of `classify`, in this request (at most
    `SPARSESHOT_MAX_EVALUATION_IMAGES` images, else 413). Returns and stores top-1 `accuracy`,
    `per_class` precision / recall / F1 / support, the `confusion_matrix` (rows true, columns
    predicted, in the model's class order) and `suggested_thresholds` (per class, the probability
    that maximises its one-vs-rest F1 on this dataset). Images labelled with other names are left
    out and counted in `excluded_labels`; none left to evaluate is 422.
    """
    row = evals.create_evaluation(session=session, storage=storage, settings=settings, serving=serving,
                                  tenant=tenant, model_id=model_id, body=body)
    return evals.to_public(row)


@router.get("/{model_id}/evaluations")
def list_evaluations(
    model_id: str, session: SessionDep, tenant: TenantDep, page: PageDep
) -> list[EvaluationPublic]:
    """List a model's evaluations.

    Newest first, `limit` per page from `offset`.
    """
    rows = evals.list_evaluations(session=session, tenant=tenant, model_id=model_id, limit=page.limit,
                                  offset=page.offset)
    return [evals.to_public(e) for e in rows]


@router.get("/{model_id}/evaluations/{evaluation_id}")
def get_evaluation(
    model_id: str, evaluation_id: str, session: SessionDep, tenant: TenantDep
) -> EvaluationPublic:
    """Get one evaluation of a model."""
    return evals.to_public(evals.get_evaluation(session=session, tenant=tenant, model_id=model_id,
                                                evaluation_id=evaluation_id))
