"""Evaluations: a model's metrics on a labelled dataset of its tenant, computed in the request and
stored (create, list, read).

- Serving path: the dataset's images go through `app.services.inference.classify` (the scheduler
  and engine that answer /classify), `settings.max_files_per_request` images at a time, each one
  decoded and reduced (`app.services.images.decode_stored`) before the next is read.
- Size: synchronous, so bounded: more than `settings.max_evaluation_images` evaluable images is
  refused (413) before any work.
- Truth: an image's label. Labels that are not classes of the model (matched exactly, as stored)
  are excluded from every figure and reported per label (`excluded_labels`).
- Figures: `sparseshot.metrics.evaluate` (top-1 predictions; suggested threshold per class = the
  probability maximising that class's one-vs-rest F1 on this dataset).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Conflict, InvalidInput, NotFound, TooLarge
from app.models import Evaluation, Image, Model, Tenant
from app.schemas import ClassMetrics, EvaluationCreate, EvaluationPublic
from app.services import images as imgcheck
from app.services.datasets import get_dataset
from app.services.models import check_servable, get_model
from app.storage import Storage, StorageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from app.services.inference import Serving
from sparseshot import metrics

T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for at in range(0, len(items), size):
        yield items[at : at + size]


def create_evaluation(
    *, session: Session, storage: Storage, settings: Settings, serving: Serving, tenant: Tenant,
    model_id: str, body: EvaluationCreate,
) -> Evaluation:
    """Classify every evaluable image of the dataset with the model, store and return the figures."""
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    check_servable(model=model, storage=storage)
    dataset = get_dataset(session=session, tenant=tenant, dataset_id=body.dataset_id)
    rows = session.execute(
        select(Image.storage_key, Image.label).where(Image.dataset_id == dataset.id)
        .order_by(Image.created_at, Image.id)
    ).all()
    index = {c: i for i, c in enumerate(model.classes)}
    kept = [(key, index[label]) for key, label in rows if label in index]  # (storage key, true class)
    excluded = Counter(label for _key, label in rows if label not in index)
    if not kept:
        raise InvalidInput(f"dataset {dataset.id} has no image labelled with a class of model {model.id} "
                           f"({', '.join(model.classes[:10])})")
    if len(kept) > settings.max_evaluation_images:
        raise TooLarge(f"{len(kept)} images to evaluate, over the limit of {settings.max_evaluation_images}")
    probs = _probabilities(model=model, keys=[key for key, _ in kept], storage=storage, settings=settings,
                           serving=serving)
    report = metrics.evaluate(probs, [y for _, y in kept], len(model.classes))
    evaluation = Evaluation(
        tenant_id=tenant.id, model_id=model.id, dataset_id=dataset.id, n_images=len(kept),
        accuracy=report.accuracy, report=_report_json(model.classes, report, excluded),
    )  # fmt: skip
    session.add(evaluation)
    session.commit()
    return evaluation


def _probabilities(
    *, model: Model, keys: list[str], storage: Storage, settings: Settings, serving: Serving
) -> list[list[float]]:
    """(n, C) class probabilities of the stored images, in `model.classes` order."""
    from app.services import inference  # loads torch: only when something is evaluated

    out: list[list[float]] = []
    for chunk in _chunks(keys, settings.max_files_per_request):
        images = [(key, _decode(key, storage, settings)) for key in chunk]  # one at a time, reduced
        with inference.serving_errors(model.id, settings, model.base_model, bases=serving.bases):
            results = inference.classify(model=model, images=images, top_k=len(model.classes),
                                         storage=storage, serving=serving)
        for r in results:
            scores = {ls["label"]: ls["score"] for ls in r["labels"]}
            out.append([float(scores.get(c, 0.0)) for c in model.classes])
    return out


def _decode(key: str, storage: Storage, settings: Settings) -> PILImage:
    try:
        return imgcheck.decode_stored(storage.get(key), settings.image_decode_side, settings.max_image_pixels)
    except (StorageError, imgcheck.Rejected) as e:
        raise Conflict(f"a stored image of the dataset cannot be read: {e}") from e


def _report_json(classes: list[str], report: metrics.Report, excluded: Counter[str]) -> dict:
    """The stored figures (JSON): what EvaluationPublic shows besides the row's columns."""
    figures = metrics.report_json(report, classes)
    keep = ("classes", "per_class", "confusion_matrix", "suggested_thresholds")  # the rest: row columns
    return {**{k: figures[k] for k in keep}, "excluded_labels": dict(sorted(excluded.items()))}


def list_evaluations(
    *, session: Session, tenant: Tenant, model_id: str, limit: int, offset: int
) -> list[Evaluation]:
    """The model's evaluations, newest first."""
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    query = (
        select(Evaluation).where(Evaluation.model_id == model.id, Evaluation.tenant_id == tenant.id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id).limit(limit).offset(offset)
    )
    return list(session.scalars(query))


def get_evaluation(*, session: Session, tenant: Tenant, model_id: str, evaluation_id: str) -> Evaluation:
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    row = session.scalar(select(Evaluation).where(
        Evaluation.id == evaluation_id, Evaluation.model_id == model.id, Evaluation.tenant_id == tenant.id
    ))
    if row is None:
        raise NotFound(f"no evaluation {evaluation_id} of model {model.id}")
    return row


def to_public(e: Evaluation) -> EvaluationPublic:
    r = e.report
    return EvaluationPublic(
        id=e.id, model_id=e.model_id, dataset_id=e.dataset_id, created_at=e.created_at,
        n_images=e.n_images, accuracy=e.accuracy, classes=r["classes"],
        per_class={c: ClassMetrics.model_validate(m) for c, m in r["per_class"].items()},
        confusion_matrix=r["confusion_matrix"], suggested_thresholds=r["suggested_thresholds"],
        excluded_images=sum(r["excluded_labels"].values()), excluded_labels=r["excluded_labels"],
    )  # fmt: skip
