"""The training task: claim the job row, run sparseshot.adapt, store the delta, create the model.

Every write made while training goes through app.jobs.lifecycle, conditional on still owning the
job (status running, same worker, same attempt), so a worker that was declared dead by
worker.recovery and comes back cannot overwrite the run that replaced it. Claiming:
worker.claims; heartbeat, cancel and progress: worker.watcher; examples: worker.examples.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import shared_task, signals

from app.core.config import Settings
from app.db import dispose_engines, session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import Claim, JobStatus
from app.models import utcnow
from app.runtime import Runtime
from app.services import history
from app.storage import Storage
from app.webhooks.dispatch import start_dispatcher
from worker import context
from worker.celery_app import TRAIN_TASK
from worker.claims import claim_job, wake_waiting, worker_id
from worker.examples import JobError, load_examples
from worker.liveness import start_liveness
from worker.memory import keep_freed_memory
from worker.recovery import start_sweeper
from worker.watcher import Watcher, optional_float, progress_writer

if TYPE_CHECKING:  # torch: only in the pool process that trains
    from sparseshot.delta import SparseDelta
    from sparseshot.train import AdaptResult

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


# ---------------------------------------------------------------- the pool process


@signals.worker_process_init.connect
def _init_child(**_: Any) -> None:
    """In each forked pool process: allocator settings for training, drop inherited DB connections,
    build the process's context, warm the default base model."""
    keep_freed_memory()
    context.forget_inherited()
    dispose_engines(close=False)
    runtime = context.init()
    runtime.bases.warm_up()  # the default base, in the background; a failed load is logged there


# ---------------------------------------------------------------- the run


def checkpoint_path(job_id: str, settings: Settings) -> Path:
    path = Path(settings.data_dir) / "checkpoints" / f"{job_id}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _store_delta(delta: SparseDelta, storage: Storage) -> str:
    """Save the delta into content-addressed storage (written atomically there); returns its key."""
    from app.services import models as model_service  # imports torch: pool children only

    return model_service.store_delta(storage=storage, delta=delta)


def _commit_success(
    claim: Claim, result: AdaptResult, classes: list[str], key: str, runtime: Runtime
) -> bool:
    """Model row + job succeeded in ONE transaction; False (nothing written) if not ours anymore."""
    delta = result.delta
    delta.meta.setdefault("classes", classes)
    if not delta.meta.get("template") and claim.params.get("template"):
        delta.meta["template"] = claim.params["template"]
    from app.services import models as model_service  # imports torch: pool children only

    with session_scope(runtime.engine) as s:
        model = model_service.add_model(session=s, tenant_id=claim.tenant_id, delta=delta, key=key,
                                        base_model=claim.base_model, method=claim.method,
                                        job_id=claim.job_id, metrics=_jsonable(result.metrics or {}))
        metrics = result.metrics or {}
        step = int(metrics["steps"]) + int(metrics.get("cv_steps") or 0) if metrics.get("steps") else None
        if not lifecycle.succeed(s, claim=claim, model_id=model.id, now=utcnow(), step=step,
                                 loss=optional_float(metrics.get("final_loss")),
                                 train_accuracy=optional_float(metrics.get("train_accuracy"))):
            s.rollback()
            return False
    return True


def _jsonable(value: Any) -> Any:
    """Metrics as JSON: numbers (tensor or numpy scalars as Python ones), strings, None, and lists
    and objects of them (the validation report); anything else as its string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def run_job(job_id: str, *, runtime: Runtime, worker: str | None = None) -> str:
    """Run one delivery of the training message: the job worker.claims picks for it (`job_id` is a
    hint, see there). Returns the started job's resulting status, or "skipped"."""
    claim = claim_job(runtime, job_id, worker or worker_id())
    if claim is None:
        return "skipped"
    try:
        return _run_claimed(claim, runtime)
    finally:
        wake_waiting(runtime, claim)


def _run_claimed(claim: Claim, runtime: Runtime) -> str:
    job_id = claim.job_id
    log.info("job %s: attempt %d on %s", job_id, claim.attempt, claim.worker)
    ckpt = checkpoint_path(job_id, runtime.settings)
    with Watcher(claim, runtime) as watcher:
        status, error = _train(claim, runtime, watcher, ckpt)
    if status == "succeeded":
        ckpt.unlink(missing_ok=True)
        return status
    if status == "lost":
        log.warning("job %s: ownership lost (declared dead); result discarded", job_id)
        return "skipped"
    with session_scope(runtime.engine) as s:
        ended = lifecycle.finish(s, claim=claim, status=JobStatus(status), error=error, now=utcnow())
    if ended:
        ckpt.unlink(missing_ok=True)
        return status
    return "skipped"


Examples = tuple[list[Any], list[int]]


def _split(claim: Claim, images: list[Any], labels: list[int],
           n_classes: int) -> tuple[Examples, Examples, int]:
    """(training, held-out, folds) under the job's validation option as `sparseshot.validation.resolve`
    makes it of the images there now: held out (folds 0), k-fold (all images train the model,
    folds k) or none (all train, folds 0)."""
    from sparseshot.validation import holdout_split, resolve

    counts = [labels.count(c) for c in range(n_classes)]
    option = resolve(claim.validation, counts, strict=False)
    if option is None or "kfold" in option:
        return (images, labels), ([], []), int(option["kfold"]) if option else 0
    split = holdout_split(labels, option, seed=int(claim.params.get("seed", 0)))
    return (([images[i] for i in split.train], [labels[i] for i in split.train]),
            ([images[i] for i in split.val], [labels[i] for i in split.val]), 0)


def _cross_validate(claim: Claim, base: Any, examples: Examples, classes: list[str], folds: int,
                    on_progress: Any, should_stop: Any) -> Any:
    """The job's k-fold cross-validation (sparseshot.crossval) before its training on all images."""
    from sparseshot import crossval
    from sparseshot.validation import fold_hparams

    images, labels = examples
    after = crossval.planned(claim.method, claim.params, len(images), len(classes))
    return crossval.cross_validate(base, images, labels, classes, claim.method, folds=folds,
                                   on_progress=on_progress, should_stop=should_stop, steps_after=after,
                                   **fold_hparams(claim.method, claim.params))


def _fit(claim: Claim, runtime: Runtime, watcher: Watcher, ckpt: Path, base: Any, classes: list[str],
         images: list[Any], labels: list[int]) -> Any:
    """The job's validation (`_split`: held out, or k-fold folds first) and its training: the
    sparseshot.adapt result, the cross-validation's figures added to its metrics."""
    import sparseshot
    from sparseshot.crossval import shifted

    train, val, folds = _split(claim, images, labels, len(classes))
    cv = None
    if folds:
        cv = _cross_validate(claim, base, train, classes, folds,
                             progress_writer(claim, runtime, with_history=False), watcher.should_stop)
    result = sparseshot.adapt(
        base, *train, classes, claim.method,
        on_progress=shifted(progress_writer(claim, runtime), cv.steps if cv else 0),
        should_stop=watcher.should_stop, checkpoint=str(ckpt), val_images=val[0], val_labels=val[1],
        **claim.params,
    )
    if cv is not None:
        result.metrics.update(cv.metrics(classes))
    elif claim.validation and not val[0]:  # the dataset shrank since the submit
        result.metrics["val_images"] = 0
    return result


def _train(claim: Claim, runtime: Runtime, watcher: Watcher, ckpt: Path) -> tuple[str, str | None]:
    """(status, error): succeeded / cancelled / failed / lost."""
    # sparseshot (torch) only in the pool process that trains: the main process stays light.
    import sparseshot

    try:
        classes, images, labels = load_examples(claim, runtime)
        base = runtime.bases.get(claim.base_model)
        history.record_environment(claim=claim, device=getattr(base, "device", None), engine=runtime.engine)
        if watcher.should_stop():
            raise sparseshot.Cancelled()
        result = _fit(claim, runtime, watcher, ckpt, base, classes, images, labels)
    except sparseshot.Cancelled:
        return ("lost", None) if watcher.lost.is_set() else ("cancelled", None)
    except JobError as e:
        return "failed", str(e)
    except Exception as e:
        log.exception("job %s failed", claim.job_id)
        return "failed", f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    # Storage or database errors from here on propagate: the job stays running without a
    # heartbeat, and the recovery sweep re-runs it rather than failing a finished training.
    key = _store_delta(result.delta, runtime.storage)
    ok = _commit_success(claim, result, classes, key, runtime)
    return ("succeeded", None) if ok else ("lost", None)


@shared_task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train_job(job_id: str) -> str:
    """Celery entry point (one message = one delivery; duplicates are dropped by claim_job)."""
    return run_job(job_id, runtime=context.current())


@signals.worker_ready.connect
def _start_recovery(**_: Any) -> None:
    """The worker's main process sweeps for jobs of dead workers (see worker.recovery), sends due
    webhooks (app.webhooks.dispatch: never in the pool process that trains) and refreshes its
    liveness file (worker.liveness)."""
    runtime = context.current()
    start_sweeper(runtime)
    start_dispatcher(runtime)
    start_liveness(runtime)
