"""Serving adapted models: the service functions over a process's `Serving`, and its error mapping.

- Base models: `app.services.bases.BaseRegistry` (the process's, `runtime.bases`).
- Prepared deltas: `app.services.model_cache.PreparedCache` (LRU under settings.model_cache_bytes,
  cold models prepared by loader threads).
- Batching: `app.services.scheduler.Scheduler` (mixed-model batches over
  `sparseshot.serving.ServingEngine`, which never writes the shared base's weights).

The process's `Serving` is built on first use by its `app.runtime.Runtime` (`runtime.serving()`);
callers pass it (or the registry) down. Callers are synchronous (FastAPI runs sync routes in a
thread pool, which is what lets concurrent requests meet in a batch).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from app.core.config import Settings
from app.errors import ModelNotReady, Unavailable
from app.services.bases import BaseRegistry
from app.services.model_cache import PreparedCache
from app.services.scheduler import QueueFull, QueueTimeout, Scheduler
from app.storage import Storage, StorageError
from sparseshot.base import BaseModelError
from sparseshot.delta import DeltaError

if TYPE_CHECKING:
    from PIL.Image import Image

    from sparseshot.delta import SparseDelta
    from sparseshot.serving import PreparedDelta, ServingEngine


class ServedModel(Protocol):
    """What serving reads of a model: an app.models.Model row (or a stand-in with these)."""

    @property
    def base_model(self) -> str: ...

    @property
    def delta_key(self) -> str: ...


@contextmanager
def serving_errors(model_id: str | None, settings: Settings, base_model: str | None = None, *,
                   bases: BaseRegistry) -> Iterator[None]:
    """The one mapping of serving failures to problems.

    Base model unavailable: 503 with Retry-After = the registry `bases`' remaining backoff for
    `base_model` (default: the configured base) when its load failed, else serving_retry_after_s.
    Queue full or too slow: 503 (Retry-After serving_retry_after_s). The model's delta missing,
    corrupt or made for another base: 409.
    """
    from sparseshot.serving import ServingError

    retry = int(settings.serving_retry_after_s)
    try:
        yield
    except (BaseModelError, ServingError) as e:
        down = bases.unavailable(base_model or settings.base_model)
        raise Unavailable(f"the base model is not available: {e}",
                          retry_after_s=down[1] if down else retry) from e
    except (QueueFull, QueueTimeout) as e:
        raise Unavailable(f"the server is busy: {e}", retry_after_s=retry) from e
    except (DeltaError, StorageError, FileNotFoundError) as e:
        raise ModelNotReady(f"model {model_id} cannot be served: {e}") from e


# ---------------------------------------------------------------- a process's serving state


def load_prepared(bases: BaseRegistry, storage: Storage, spec: str, delta_key: str) -> PreparedDelta:
    """A stored delta, verified and prepared for serving over its base (runs in a loader thread)."""
    from sparseshot.delta import SparseDelta
    from sparseshot.serving import prepare

    base = bases.get(spec)
    delta = SparseDelta.from_bytes(storage.get(delta_key))
    return prepare(base, delta)


class Serving:
    """What serving keeps for a process: one ServingEngine per base (of the registry `bases`), and
    the scheduler with its cache of prepared deltas, sized by `settings`. The threads start on
    first use. Built and closed by the process's app.runtime.Runtime (`runtime.serving()`)."""

    def __init__(self, settings: Settings, bases: BaseRegistry) -> None:
        self.settings = settings
        self.bases = bases
        self._engines: dict[str, ServingEngine] = {}
        self._lock = threading.Lock()
        cache = PreparedCache(settings.model_cache_bytes, threads=settings.serving_loader_threads)
        self.scheduler = Scheduler(
            cache=cache, engine_for=self.engine_for, max_batch_images=settings.serving_max_batch_images,
            max_queue_images=settings.serving_queue_images, window_s=settings.serving_batch_window_s,
            timeout_s=settings.serving_timeout_s,
        )

    def engine_for(self, spec: str) -> ServingEngine:
        """The ServingEngine of base `spec` (one per base)."""
        from sparseshot.serving import ServingEngine

        with self._lock:
            engine = self._engines.get(spec)
        if engine is None:
            budget = self.settings.serving_dense_cache_bytes
            engine = ServingEngine(self.bases.get(spec), dense_cache_bytes=budget)
            with self._lock:
                engine = self._engines.setdefault(spec, engine)
        return engine

    def close(self) -> None:
        """Stop the batch thread and the loaders; forget prepared deltas and engines."""
        self.scheduler.stop()
        self.scheduler.cache.close()
        with self._lock:
            self._engines.clear()


# ---------------------------------------------------------------- the service functions


def _pixels(bases: BaseRegistry, spec: str, images: Sequence[Image]) -> torch.Tensor:
    """(n, 3, S, S) eval-preprocessed RGB images (in the caller's thread, in parallel across requests)."""
    base = bases.get(spec)
    rgb = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]
    return torch.stack([base.preprocess_eval(im) for im in rgb])


def classify(
    *, model: ServedModel, images: Sequence[tuple[str, Image]], top_k: int, storage: Storage,
    serving: Serving,
) -> list[dict[str, Any]]:
    """Top-k labels per image: [{"filename", "labels": [{"label", "score"}]}] in input order, by
    the process's `serving`.

    Raises the sparseshot/storage/scheduler errors that `serving_errors` maps."""
    spec, key, bases = model.base_model, model.delta_key, serving.bases
    pixels = _pixels(bases, spec, [im for _, im in images])
    preds = serving.scheduler.submit((spec, key), pixels, top_k,
                                     lambda: load_prepared(bases, storage, spec, key))
    return [
        {"filename": name, "labels": [{"label": label, "score": float(score)} for label, score in pred]}
        for (name, _), pred in zip(images, preds, strict=True)
    ]


def zeroshot_delta(*, bases: BaseRegistry, classes: list[str], base_model: str | None = None,
                   template: str | None = None) -> SparseDelta:
    """A zero-shot model's delta (class embeddings only) over `base_model` (default: the
    registry's default base) from the registry `bases`."""
    import sparseshot

    base = bases.get(base_model)
    hparams: dict[str, Any] = {"template": template} if template else {}
    return sparseshot.adapt(base, [], [], list(classes), method="zeroshot", **hparams).delta
