"""Request and response bodies of the v1 API (XCreate: request, XPublic: response)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.jobs.status import JobStatus
from sparseshot.configs import params_json_schema
from sparseshot.text_rules import MAX_CLASS_NAME_CHARS, MAX_TEMPLATE_CHARS, NAME_PATTERN, TEMPLATE_PATTERN
from sparseshot.validation import DEFAULT_FOLDS, MAX_FOLDS, MIN_TRAIN, validation_json_schema

# Names (datasets, models, classes) and templates follow `sparseshot.text_rules`, the one owner of
# what may reach a prompt. The same rule is in the OpenAPI schema (`pattern`), and the length limit
# applies to the text as sent; it is then stripped and NFC-normalised.
MAX_NAME_CHARS = MAX_CLASS_NAME_CHARS


def clean_name(value: str) -> str:
    """A name as stored and compared: NFC-normalised, surrounding whitespace removed.

    NFC makes "cafe\u0301" and "caf\u00e9" the same class; the two read identical.
    """
    return unicodedata.normalize("NFC", value).strip()


def check_name(value: str, what: str = "name") -> str:
    """`clean_name` after the checks of NAME_PATTERN and the length (ValueError), for values that
    do not come through a schema (form fields, archive folder names)."""
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    if not re.match(NAME_PATTERN, value):
        raise ValueError(f"{what} must hold a visible character and no control characters")
    return clean_name(value)


Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=NAME_PATTERN), AfterValidator(clean_name)
]
ClassName = Name
ClassList = Annotated[
    list[ClassName], Field(min_length=2, json_schema_extra={"uniqueItems": True},
                           description="At least two distinct class names.")
]
ModelName = Name
PresetName = Literal["quick", "standard", "thorough"]  # = sparseshot.presets.PRESETS (a test checks)
ExportFormat = Literal["delta", "checkpoint", "onnx"]  # = app.services.exports.FORMATS (a test checks)


def _unique(classes: list[str]) -> list[str]:
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise ValueError(f"class names must be unique; repeated: {', '.join(dupes)}")
    return classes


class RequestBody(BaseModel):
    """A request body: unknown fields are refused (422), never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class DatasetCreate(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "pets", "classes": ["cat", "dog"]}]})

    name: Name
    classes: ClassList

    _check_unique = field_validator("classes")(_unique)


class DatasetPublic(BaseModel):
    id: str
    name: str
    classes: list[str]
    image_counts: dict[str, int]
    created_at: datetime


class ImageAdded(BaseModel):
    image_id: str
    filename: str
    label: str


class ImageRejected(BaseModel):
    filename: str
    detail: str
    duplicate_of: str | None = Field(
        default=None, description="Set when the file is an exact duplicate of this image of the dataset."
    )


class ImagesAdded(BaseModel):
    added: list[ImageAdded]
    rejected: list[ImageRejected]


class ImagePublic(BaseModel):
    image_id: str
    filename: str = Field(description="The client's file name at upload (reports only).")
    label: str
    width: int
    height: int
    created_at: datetime
    thumbnail_url: str = Field(description="A small JPEG of the image (authenticated like every call).")


class ImagePatch(RequestBody):
    label: ClassName = Field(description="The new class: one of the dataset's classes.")

    model_config = ConfigDict(json_schema_extra={"examples": [{"label": "dog"}]})


class JobCreate(RequestBody):
    # Works as sent once `dataset_id` names one of your datasets (a short run: quick on a CPU).
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"dataset_id": "3f2b8c1e-0d4a-4e7b-9a61-5c2f0e8d7b10", "method": "so", "preset": "quick",
                 "params": {"n_iters": 50, "lr": 0.01}},
            ]
        }
    )  # fmt: skip

    dataset_id: str
    method: Literal["so", "lora"] = "so"
    base_model: str | None = None
    preset: PresetName = Field(
        default="standard",
        description="Named hyperparameters (quick / standard = the paper's recipe / thorough); "
        "`params` override its values.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Hyperparameters of `method` over the preset's values (any subset of that method's "
        "schema below, derived from `sparseshot.configs`); unknown names and out-of-range values: 422.",
        json_schema_extra={"anyOf": [{"title": f"{m.upper()} params", **params_json_schema(m)}
                                     for m in ("so", "lora")]},
    )
    validation: dict[str, Any] | None = Field(
        default=None,
        description='Measure the model on images it did not train on: `{"holdout": 0.2}` (a fraction of '
        'each class, at least one image) or `{"holdout_per_class": 1}` hold images out of training (a '
        f"class always keeps {MIN_TRAIN} training images; smaller classes hold none out), reported as "
        "`val_accuracy`; "
        f'when no class has more than {MIN_TRAIN} images the job runs `{{"kfold": k}}` instead (k = '
        f'min({DEFAULT_FOLDS}, shots), at least 2), which can also be asked for: `{{"kfold": k}}` (2 to '
        f"{MAX_FOLDS}) trains k folds with the "
        "quick preset's schedule, each on the other folds' images, measures each on its own "
        "(stratified per class, seeded) and then trains the model on all images; reported as "
        "`cv_accuracy` (the folds' mean), the folds' accuracies, and the time they take is part of "
        "`estimated_seconds` and of the progress' steps. Either way the model's `metrics.validation` holds "
        "per-class precision / recall / F1 / support and the confusion matrix.",
        examples=[{"holdout": 0.2}, {"holdout_per_class": 1}, {"kfold": 3}],
        json_schema_extra=validation_json_schema(),
    )
    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="POSTed to (signed JSON) when the job succeeds, fails or is cancelled: http(s) only; "
        "hosts resolving to private, loopback or link-local addresses are refused unless "
        "SPARSESHOT_WEBHOOK_ALLOW_PRIVATE=true.",
    )


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    loss: float | None
    train_accuracy: float | None
    eta_seconds: float | None


class JobPublic(BaseModel):
    id: str
    dataset_id: str | None
    method: str
    base_model: str
    params: dict[str, Any]
    preset: str | None = None
    validation: dict[str, Any] | None = Field(
        default=None,
        description='The validation the job runs: the option as asked, or `{"kfold": k}` where a '
        f"held-out split was asked for and no class has more than {MIN_TRAIN} images.")
    estimated_seconds: float | None = Field(
        default=None,
        description="Planned steps x the measured step time of this base and method on the worker's "
        "device, at creation (null: no measured figure); `progress.eta_seconds` follows the run.",
    )
    device: str | None = Field(default=None, description="Device of the latest training attempt.")
    versions: dict[str, str] | None = Field(default=None, description="Library versions it trained with.")
    status: JobStatus
    cancel_requested: bool
    progress: JobProgress
    attempts: int
    model_id: str | None = None
    error: str | None = None
    webhook_url: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class HistoryPoint(BaseModel):
    step: int
    loss: float | None
    train_accuracy: float | None
    lr: float | None
    val_accuracy: float | None
    elapsed_s: float | None


class JobHistoryPublic(BaseModel):
    items: list[HistoryPoint]


class ZeroshotCreate(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"classes": ["cat", "dog"], "template": "a photo of a {}."}]}
    )

    classes: ClassList
    base_model: str | None = None
    template: str | None = Field(
        default=None, max_length=MAX_TEMPLATE_CHARS, pattern=TEMPLATE_PATTERN,
        description="Prompt with one '{}' for the class name."
    )
    name: ModelName | None = None

    _check_unique = field_validator("classes")(_unique)


class DeltaInfo(BaseModel):
    nnz: int
    bytes: int
    density: float


class ModelPublic(BaseModel):
    id: str
    name: str | None = None
    status: str
    classes: list[str]
    base_model: str
    method: str
    template: str | None
    job_id: str | None
    delta: DeltaInfo
    metrics: dict[str, Any] = Field(
        description="The training's figures (steps, final_loss, train_accuracy, ...); with a validation "
        "`val_accuracy` (held out) or `cv_accuracy` / `cv_folds` (k-fold) and `validation`: the report "
        "(mode, accuracy, n_images, classes, per_class, confusion_matrix, suggested_thresholds).")
    created_at: datetime


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    filename: str
    labels: list[LabelScore] = Field(description="Best first; only labels at or above the threshold.")
    unknown: bool = Field(
        default=False, description="True when a threshold was given and no label reaches it (labels empty)."
    )


class ClassifyPublic(BaseModel):
    predictions: list[Prediction]


class EvaluationCreate(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"dataset_id": "3f2b8c1e-0d4a-4e7b-9a61-5c2f0e8d7b10"}]}
    )

    dataset_id: str = Field(description="A labelled dataset of yours (its images' labels are the truth).")


class ClassMetrics(BaseModel):
    precision: float = Field(
        description="Of the images predicted as this class, the share that are (0 if none)."
    )
    recall: float = Field(description="Of the images of this class, the share predicted as it (0 if none).")
    f1: float
    support: int = Field(description="Images of this class in the dataset.")


class EvaluationPublic(BaseModel):
    id: str
    model_id: str
    dataset_id: str | None = Field(description="Null once the dataset is deleted.")
    created_at: datetime
    n_images: int = Field(description="Images evaluated: those labelled with one of the model's classes.")
    accuracy: float = Field(description="Top-1 accuracy over the evaluated images.")
    classes: list[str] = Field(description="The model's classes: the order of the confusion matrix.")
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]] = Field(
        description="Rows: true class, columns: predicted class (top-1), both in `classes` order."
    )
    suggested_thresholds: dict[str, float | None] = Field(
        description="Per class, the probability cut that maximises that class's one-vs-rest F1 on this "
        "dataset (null: no image of the class); can be sent as classify's `threshold`."
    )
    excluded_images: int = Field(
        description="Images whose label is not a class of the model (not evaluated)."
    )
    excluded_labels: dict[str, int] = Field(description="Those images per label.")


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool]
    reasons: dict[str, str] = Field(default_factory=dict, description="Why each failing check failed.")


class WebhookAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status (null: no response).")
    error: str | None = Field(description="Why the attempt failed (null: a 2xx answer).")
    duration_s: float


class WebhookDeliveryPublic(BaseModel):
    id: str = Field(description="Sent as the `X-SparseShot-Delivery` header (receivers de-duplicate on it).")
    event: str = Field(description="`job.succeeded`, `job.failed` or `job.cancelled`.")
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]
    next_attempt_at: datetime | None = Field(description="When the next attempt is due (pending only).")
    created_at: datetime
    delivered_at: datetime | None = None


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of `X-SparseShot-Signature` (keep it private).")
