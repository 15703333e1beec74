"""Serving adapted models: the service functions over the process's scheduler, and its error mapping.

- Base models: `app.services.bases` (one registry per process).
- Prepared deltas: `app.services.model_cache.PreparedCache` (LRU under settings.model_cache_bytes,
  cold models prepared by loader threads).
- Batching: `app.services.scheduler.Scheduler` (mixed-model batches over
  `sparseshot.serving.ServingEngine`, which never writes the shared base's weights).

Callers are synchronous (FastAPI runs sync routes in a thread pool, which is what lets
concurrent requests meet in a batch).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from app.core.config import get_settings
from app.errors import ModelNotReady, Unavailable
from app.services import bases
from app.services.model_cache import PreparedCache
from app.services.scheduler import QueueFull, QueueTimeout, Scheduler
from app.storage import Storage, StorageError, get_storage
from sparseshot.base import BaseModelError
from sparseshot.delta import DeltaError

if TYPE_CHECKING:
    from sparseshot.delta import SparseDelta
    from sparseshot.serving import PreparedDelta, ServingEngine


@contextmanager
def serving_errors(model_id: str | None, base_model: str | None = None) -> Iterator[None]:
    """The one mapping of serving failures to problems.

    Base model unavailable: 503 with Retry-After = the base registry's remaining backoff for
    `base_model` (default: the configured base) when its load failed, else serving_retry_after_s.
    Queue full or too slow: 503 (Retry-After serving_retry_after_s). The model's delta missing,
    corrupt or made for another base: 409.
    """
    from sparseshot.serving import ServingError

    retry = int(get_settings().serving_retry_after_s)
    try:
        yield
    except (BaseModelError, ServingError) as e:
        down = bases.unavailable(base_model or get_settings().base_model)
        raise Unavailable(f"the base model is not available: {e}",
                          retry_after_s=down[1] if down else retry) from e
    except (QueueFull, QueueTimeout) as e:
        raise Unavailable(f"the server is busy: {e}", retry_after_s=retry) from e
    except (DeltaError, StorageError, FileNotFoundError) as e:
        raise ModelNotReady(f"model {model_id} cannot be served: {e}") from e


# ---------------------------------------------------------------- the process's scheduler


def load_prepared(storage: Storage, spec: str, delta_key: str) -> PreparedDelta:
    """A stored delta, verified and prepared for serving over its base (runs in a loader thread)."""
    from sparseshot.delta import SparseDelta
    from sparseshot.serving import prepare

    base = bases.get_base(spec)
    delta = SparseDelta.from_bytes(storage.get(delta_key))
    return prepare(base, delta)


_engines: dict[str, ServingEngine] = {}
_scheduler: Scheduler | None = None
_lock = threading.Lock()


def engine_for(spec: str) -> ServingEngine:
    """The ServingEngine of base `spec` (one per base per process)."""
    from sparseshot.serving import ServingEngine

    with _lock:
        engine = _engines.get(spec)
    if engine is None:
        budget = get_settings().serving_dense_cache_bytes
        engine = ServingEngine(bases.get_base(spec), dense_cache_bytes=budget)
        with _lock:
            engine = _engines.setdefault(spec, engine)
    return engine


def get_scheduler() -> Scheduler:
    global _scheduler
    with _lock:
        if _scheduler is None:
            s = get_settings()
            cache = PreparedCache(s.model_cache_bytes, threads=s.serving_loader_threads)
            _scheduler = Scheduler(
                cache=cache, engine_for=engine_for, max_batch_images=s.serving_max_batch_images,
                max_queue_images=s.serving_queue_images, window_s=s.serving_batch_window_s,
                timeout_s=s.serving_timeout_s,
            )
        return _scheduler


def reset() -> None:
    """Stop the scheduler, forget prepared deltas, engines and bases (tests)."""
    global _scheduler
    with _lock:
        old, _scheduler = _scheduler, None
        _engines.clear()
    if old is not None:
        old.stop()
        old.cache.close()
    bases.reset()


# ---------------------------------------------------------------- the service functions


def _pixels(spec: str, images: Sequence[Any]) -> torch.Tensor:
    """(n, 3, S, S) eval-preprocessed RGB images (in the caller's thread, in parallel across requests)."""
    base = bases.get_base(spec)
    rgb = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]
    return torch.stack([base.preprocess_eval(im) for im in rgb])


def classify(
    *, model: Any, images: Sequence[tuple[str, Any]], top_k: int, storage: Storage | None = None
) -> list[dict[str, Any]]:
    """Top-k labels per image: [{"filename", "labels": [{"label", "score"}]}] in input order.

    Raises the sparseshot/storage/scheduler errors that `serving_errors` maps."""
    spec, key = model.base_model, model.delta_key
    pixels = _pixels(spec, [im for _, im in images])
    store = storage if storage is not None else get_storage()
    preds = get_scheduler().submit((spec, key), pixels, top_k, lambda: load_prepared(store, spec, key))
    return [
        {"filename": name, "labels": [{"label": label, "score": float(score)} for label, score in pred]}
        for (name, _), pred in zip(images, preds, strict=True)
    ]


def zeroshot_delta(*, classes: list[str], base_model: str | None = None,
                   template: str | None = None) -> SparseDelta:
    """A zero-shot model's delta (class embeddings only) over the process's base model."""
    import sparseshot

    base = bases.get_base(base_model)
    hparams = {"template": template} if template else {}
    return sparseshot.adapt(base, [], [], list(classes), method="zeroshot", **hparams).delta
