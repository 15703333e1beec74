"""Service settings: one pydantic-settings class read from `SPARSESHOT_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024
BODY_SLACK = MB  # multipart boundaries, part headers and form fields beside the files


class Settings(BaseSettings):
    """Everything the API, the worker and the CLI read from the environment.

    Defaults are the embedded single-machine setup: a SQLite file and local storage under
    `data_dir`, and a broker that needs no server (`broker_url` empty).
    """

    model_config = SettingsConfigDict(env_prefix="SPARSESHOT_", env_file=None, extra="ignore")

    # Where things live.
    data_dir: Path = Path("./data")
    database_url: str = ""  # empty -> sqlite:///{data_dir}/sparseshot.db
    broker_url: str = ""  # empty -> embedded transport (no server); redis://... when distributed
    queue_name: str = "sparseshot"
    base_model: str = "ViT-B-16:openai"
    # Further specs clients may ask for (JSON list in the environment); only these and base_model.
    allowed_base_models: list[str] = Field(default_factory=list)
    device: str = ""  # empty -> cuda when available, else cpu
    model_download_dir: Path | None = None  # open_clip / hub download cache (None: library default)

    # Input limits.
    max_image_bytes: int = Field(default=10 * MB, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)  # width * height; larger = decompression bomb
    max_files_per_request: int = Field(default=64, gt=0)
    max_archive_bytes: int = Field(default=200 * MB, gt=0)  # the uploaded .zip itself
    max_archive_expanded_bytes: int = Field(default=500 * MB, gt=0)  # sum of uncompressed members
    max_archive_files: int = Field(default=2000, gt=0)
    max_classes: int = Field(default=1000, gt=0)
    max_class_name_chars: int = Field(default=200, gt=0)
    max_top_k: int = Field(default=100, gt=0)
    # Labelled images one evaluation classifies (it runs inside the request; over it: 413).
    max_evaluation_images: int = Field(default=500, gt=0)
    # Decoded images are reduced to this shorter side before they are held (>= the base's input size).
    image_decode_side: int = Field(default=448, ge=32)
    # Request bodies, refused (413) from Content-Length or cut off while streaming, before parsing.
    # 0: derived, see `upload_body_limit` / `archive_body_limit`.
    max_upload_body_bytes: int = Field(default=0, ge=0)
    max_json_body_bytes: int = Field(default=2 * MB, gt=0)  # every body that is not multipart

    # Serving and training.
    model_cache_bytes: int = Field(default=1024 * MB, ge=0)  # prepared deltas held in memory
    max_delta_bytes: int = Field(default=512 * MB, gt=0)  # a delta file sent to /v1/models/import
    serving_max_batch_images: int = Field(default=32, gt=0)  # images per forward pass
    serving_queue_images: int = Field(default=512, gt=0)  # queued images before 503 + Retry-After
    serving_batch_window_s: float = Field(default=0.002, ge=0)  # an idle scheduler waits this long
    serving_loader_threads: int = Field(default=2, gt=0)  # threads preparing cold models
    serving_dense_cache_bytes: int = Field(default=512 * MB, ge=0)  # dense weights: dense layers, hot models
    serving_timeout_s: float = Field(default=120.0, gt=0)  # longest a classify request waits
    serving_retry_after_s: int = Field(default=1, ge=0)
    progress_interval_s: float = Field(default=1.0, gt=0)
    job_heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, gt=0)
    recovery_interval_s: float = Field(default=30.0, gt=0)
    history_every_steps: int = Field(default=10, gt=0)  # a training-history point every N steps
    events_poll_s: float = Field(default=0.5, gt=0)  # SSE /events: how often the job row is read
    events_heartbeat_s: float = Field(default=15.0, gt=0)  # SSE comment line when nothing changed
    events_max_s: float = Field(default=3600.0, gt=0)  # an SSE stream closes after this (reconnect)
    # Storage: how long a pending reference (upload between file write and row commit) holds a file.
    object_pin_ttl_s: float = Field(default=3600.0, gt=0)

    # Per-tenant limits (app/quotas.py); a tenant row's non-null column of the same name overrides.
    max_running_jobs: int = Field(default=4, ge=0)  # trainings at once; more wait queued
    max_queued_jobs: int = Field(default=50, ge=0)  # waiting jobs; a submit over it answers 429
    # n_iters x shots, the recipe's step count (the thorough preset at 16 shots: 64,000)
    max_steps_per_job: int = Field(default=100_000, ge=1)
    max_images_per_dataset: int = Field(default=10_000, ge=0)
    max_models: int = Field(default=1000, ge=0)  # models plus jobs that will create one

    @model_validator(mode="after")
    def _fill_database_url(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'sparseshot.db').as_posix()}"
        return self

    @property
    def upload_body_limit(self) -> int:
        """Multipart bodies: `max_upload_body_bytes`, or max files x max image bytes + slack."""
        return self.max_upload_body_bytes or self.max_files_per_request * self.max_image_bytes + BODY_SLACK

    @property
    def archive_body_limit(self) -> int:
        """Multipart bodies of routes that take a .zip: also room for `max_archive_bytes` + slack."""
        return max(self.upload_body_limit, self.max_archive_bytes + BODY_SLACK)

    @property
    def storage_dir(self) -> Path:
        """Root of content-addressed files (images and deltas)."""
        return self.data_dir / "objects"


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
