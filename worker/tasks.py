"""The training task: claim the job row, run sparseshot.adapt, store the delta, create the model.

Every write made while training is conditional on still owning the job (status running, same
worker, same attempt), so a worker that was declared dead by worker.recovery and comes back
cannot overwrite the run that replaced it. A duplicate message for a job that is finished,
cancelled or running elsewhere is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import select, update

from app.core.config import Settings, get_settings
from app.db import session_scope
from app.models import Dataset, Image, Job, Model
from app.storage import get_storage
from worker.celery_app import TRAIN_TASK, app

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- base models, once per process

_bases: dict[str, Any] = {}
_bases_lock = threading.Lock()


def get_base(spec: str) -> Any:
    """sparseshot.load_base(spec), loaded once per worker process (thread-safe)."""
    with _bases_lock:
        base = _bases.get(spec)
        if base is None:
            import sparseshot

            settings = get_settings()
            base = sparseshot.load_base(spec, device=settings.device or None,
                                        cache_dir=settings.model_download_dir)
            _bases[spec] = base
        return base


# glibc mallopt parameters: M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc keep large freed buffers instead of returning them to the OS.

    A training step frees and re-requests the same large activation buffers every step; with
    glibc's defaults each comes back through mmap and page faults (hundreds of thousands per step
    on ViT-B-16 on CPU). Same effect as MALLOC_MMAP_MAX_=0 and a high MALLOC_TRIM_THRESHOLD_ in the
    environment, applied at run time. False where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


@signals.worker_process_init.connect
def _init_child(**_: Any) -> None:
    """In each forked pool process: allocator settings for training, drop inherited DB connections,
    warm the default base model."""
    from app import db

    keep_freed_memory()
    db.dispose_engines(close=False)
    threading.Thread(target=_warm_base, name="warm-base", daemon=True).start()


def _warm_base() -> None:
    try:
        get_base(get_settings().base_model)
    except Exception as e:  # a job for this base reports the error itself
        log.warning("could not preload base model: %s", e)


# ---------------------------------------------------------------- job ownership


@dataclass(frozen=True)
class Claim:
    """The job as this worker claimed it."""

    job_id: str
    worker: str
    attempt: int
    tenant_id: str
    dataset_id: str | None
    method: str
    base_model: str
    params: dict[str, Any]


def _owned(claim: Claim) -> Any:
    """WHERE clause: the job is still running under this claim."""
    return (
        (Job.id == claim.job_id)
        & (Job.status == "running")
        & (Job.worker == claim.worker)
        & (Job.attempts == claim.attempt)
    )


def _finish_unclaimed(job_id: str, seen_status: str, seen_attempts: int, **values: Any) -> None:
    with session_scope() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts)
            .values(finished_at=utcnow(), **values)
        )


def claim_job(job_id: str, worker: str, settings: Settings | None = None) -> Claim | None:
    """Move a queued job (or a running one whose worker stopped beating) to running under `worker`.

    An optimistic conditional UPDATE (same status and attempts as read) makes the claim safe
    on every backend when two deliveries of one message race. None: nothing to run.
    """
    settings = settings or get_settings()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        status, attempts, beat = job.status, job.attempts, job.heartbeat_at
        stale = status == "running" and (beat is None or beat < stale_before)
        if status != "queued" and not stale:
            log.info("job %s is %s; duplicate or late message dropped", job_id, status)
            return None
        snapshot = (job.tenant_id, job.dataset_id, job.method, job.base_model, dict(job.params or {}))
        cancel = job.cancel_requested
    if cancel:
        _finish_unclaimed(job_id, status, attempts, status="cancelled")
        return None
    if attempts >= settings.job_max_attempts:
        _finish_unclaimed(job_id, status, attempts, status="failed",
                          error=f"gave up after {attempts} attempts (the worker stopped each time)")
        return None
    with session_scope() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == status, Job.attempts == attempts)
            .values(status="running", attempts=attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=now, finished_at=None, error=None)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            log.info("job %s was claimed concurrently; message dropped", job_id)
            return None
    tenant_id, dataset_id, method, base_model, params = snapshot
    return Claim(job_id, worker, attempts + 1, tenant_id, dataset_id, method, base_model, params)


def _update_owned(claim: Claim, **values: Any) -> bool:
    """Write `values` if the job is still ours; False when ownership was lost."""
    with session_scope() as s:
        res = s.execute(update(Job).where(_owned(claim)).values(**values))
        return res.rowcount == 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------- heartbeat + cancel watcher


class Watcher:
    """Background thread: beats heartbeat_at and polls cancel_requested about once a second.

    `should_stop()` is then a cheap flag read for the training loop.
    """

    def __init__(self, claim: Claim, settings: Settings) -> None:
        self.claim = claim
        self.poll_s = min(1.0, settings.job_heartbeat_timeout_s / 4)
        self.beat_s = max(self.poll_s, min(5.0, settings.job_heartbeat_timeout_s / 4))
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{claim.job_id[:8]}", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.poll_s):
            try:
                if time.monotonic() - last_beat >= self.beat_s:
                    if not _update_owned(self.claim, heartbeat_at=utcnow()):
                        self.lost.set()
                    last_beat = time.monotonic()
                with session_scope() as s:
                    flag = s.scalar(select(Job.cancel_requested).where(Job.id == self.claim.job_id))
                if flag:
                    self.cancelled.set()
            except Exception as e:  # a database hiccup must not kill the training
                log.warning("job %s watcher: %s", self.claim.job_id, e)


# ---------------------------------------------------------------- the run


class JobError(Exception):
    """A job that cannot run as submitted (reason shown to the client)."""


def _load_examples(claim: Claim) -> tuple[list[str], list[Any], list[int]]:
    """The dataset's classes, its images (RGB PIL, shorter side at most the model's input size:
    the training crops are resized to it anyway) and their label indices."""
    from app.services.images import Rejected, decode_stored

    if claim.dataset_id is None:
        raise JobError("the dataset was deleted")
    with session_scope() as s:
        dataset = s.get(Dataset, claim.dataset_id)
        if dataset is None:
            raise JobError("the dataset was deleted")
        classes = list(dataset.classes)
        rows = s.execute(
            select(Image.storage_key, Image.label).where(Image.dataset_id == claim.dataset_id)
            .order_by(Image.created_at, Image.id)
        ).all()
    if not rows:
        raise JobError("the dataset has no images")
    storage = get_storage()
    side, max_pixels = get_base(claim.base_model).image_size, get_settings().max_image_pixels
    index = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for key, label in rows:
        if label not in index:
            raise JobError(f"image label {label!r} is not a class of the dataset")
        try:  # one at a time, reduced before the next is read
            images.append(decode_stored(storage.get(key), side, max_pixels))
        except Rejected as e:
            raise JobError(f"a stored image cannot be read: {e.detail}") from e
        labels.append(index[label])
    return classes, images, labels


def _progress_writer(claim: Claim, settings: Settings) -> Any:
    """on_progress callback: writes step/total/loss/acc/eta at most every progress_interval_s."""
    last = [0.0]

    def on_progress(p: Any) -> None:
        now = time.monotonic()
        final = p.total_steps is not None and p.step >= p.total_steps
        if not final and now - last[0] < settings.progress_interval_s:
            return
        last[0] = now
        try:
            _update_owned(claim, step=int(p.step), total_steps=int(p.total_steps), loss=_f(p.loss),
                          train_accuracy=_f(p.train_accuracy), eta_seconds=_f(p.eta_seconds),
                          heartbeat_at=utcnow())
        except Exception as e:
            log.warning("job %s progress write failed: %s", claim.job_id, e)

    return on_progress


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def checkpoint_path(job_id: str, settings: Settings) -> Path:
    path = Path(settings.data_dir) / "checkpoints" / f"{job_id}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _store_delta(delta: Any, settings: Settings) -> str:
    """Save the delta into content-addressed storage (written atomically there); returns its key."""
    return get_storage().put(delta.to_bytes())


def _commit_success(claim: Claim, result: Any, classes: list[str], key: str) -> bool:
    """Model row + job succeeded in ONE transaction; False (nothing written) if not ours anymore."""
    delta = result.delta
    meta = getattr(delta, "meta", {}) or {}
    template = meta.get("template") or claim.params.get("template")
    with session_scope() as s:
        model = Model(tenant_id=claim.tenant_id, job_id=claim.job_id, classes=classes,
                      base_model=claim.base_model, method=claim.method, template=template,
                      delta_key=key, nnz=int(delta.nnz), nbytes=int(delta.nbytes),
                      density=float(delta.density), metrics=_jsonable(result.metrics))
        s.add(model)
        s.flush()
        values: dict[str, Any] = dict(status="succeeded", model_id=model.id, finished_at=utcnow(),
                                      heartbeat_at=utcnow(), eta_seconds=0.0)
        metrics = result.metrics or {}
        if metrics.get("steps"):
            values["step"] = int(metrics["steps"])
        if metrics.get("final_loss") is not None:
            values["loss"] = float(metrics["final_loss"])
        if metrics.get("train_accuracy") is not None:
            values["train_accuracy"] = float(metrics["train_accuracy"])
        res = s.execute(update(Job).where(_owned(claim)).values(**values))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            return False
    return True


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = str(v)
    return out


def run_job(job_id: str, *, worker: str | None = None, settings: Settings | None = None) -> str:
    """Run one delivery of the training message. Returns the job's resulting status, or "skipped"."""
    settings = settings or get_settings()
    claim = claim_job(job_id, worker or worker_id(), settings)
    if claim is None:
        return "skipped"
    log.info("job %s: attempt %d on %s", job_id, claim.attempt, claim.worker)
    ckpt = checkpoint_path(job_id, settings)
    with Watcher(claim, settings) as watcher:
        status, error = _train(claim, settings, watcher, ckpt)
    if status == "succeeded":
        ckpt.unlink(missing_ok=True)
        return status
    if status == "lost":
        log.warning("job %s: ownership lost (declared dead); result discarded", job_id)
        return "skipped"
    if _update_owned(claim, status=status, error=error, finished_at=utcnow(), eta_seconds=None):
        ckpt.unlink(missing_ok=True)
        return status
    return "skipped"


def _train(claim: Claim, settings: Settings, watcher: Watcher, ckpt: Path) -> tuple[str, str | None]:
    """(status, error): succeeded / cancelled / failed / lost."""
    import sparseshot

    try:
        classes, images, labels = _load_examples(claim)
        base = get_base(claim.base_model)
        if watcher.should_stop():
            raise sparseshot.Cancelled()
        result = sparseshot.adapt(
            base, images, labels, classes, claim.method,
            on_progress=_progress_writer(claim, settings), should_stop=watcher.should_stop,
            checkpoint=str(ckpt), **claim.params,
        )
    except sparseshot.Cancelled:
        return ("lost", None) if watcher.lost.is_set() else ("cancelled", None)
    except JobError as e:
        return "failed", str(e)
    except Exception as e:
        log.exception("job %s failed", claim.job_id)
        return "failed", f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    # Storage or database errors from here on propagate: the job stays running without a
    # heartbeat, and the recovery sweep re-runs it rather than failing a finished training.
    key = _store_delta(result.delta, settings)
    return ("succeeded", None) if _commit_success(claim, result, classes, key) else ("lost", None)


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train_job(job_id: str) -> str:
    """Celery entry point (one message = one delivery; duplicates are dropped by claim_job)."""
    return run_job(job_id)


@signals.worker_ready.connect
def _start_recovery(**_: Any) -> None:
    """The worker's main process sweeps for jobs of dead workers (see worker.recovery)."""
    from worker.recovery import start_sweeper

    start_sweeper()
