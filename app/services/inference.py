"""Serving adapted models: one shared base per spec, deltas in an LRU, per-model micro-batching.

- Base models: `sparseshot.load_base(spec)` once per process per spec.
- Adapted models: a `sparseshot.Classifier` per (base spec, delta key), kept in an LRU whose
  total `Classifier.nbytes` stays under `settings.model_cache_bytes` (the most recent one is
  always kept, even when alone it is over the budget).
- Batching: concurrent requests for the same model within a few milliseconds are merged into
  one forward pass (`MicroBatcher`). Different models run concurrently; the Classifier applies
  its delta to the shared base under the base's lock, so they never see each other's weights.

Callers are synchronous (FastAPI runs sync routes in a thread pool, which is what lets
concurrent requests meet in a batch).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.config import get_settings
from app.services import objects
from app.storage import get_storage

log = logging.getLogger(__name__)

Prediction = list[tuple[str, float]]  # (label, probability), descending

BATCH_WINDOW_S = 0.005  # how long the first request of a batch waits for others
MAX_BATCH_IMAGES = 64  # images per forward pass


# ---------------------------------------------------------------- base models


_bases: dict[str, Any] = {}
_base_errors: dict[str, str] = {}
_load_lock = threading.Lock()  # held while a base model loads (seconds)
_state_lock = threading.Lock()  # quick checks of the dicts above, never held while loading
_warming: set[str] = set()


def get_base(spec: str | None = None) -> Any:
    """The process's BaseModel for `spec` (default: settings.base_model), loaded once."""
    settings = get_settings()
    spec = spec or settings.base_model
    base = _bases.get(spec)
    if base is not None:
        return base
    with _load_lock:
        base = _bases.get(spec)
        if base is None:
            import sparseshot

            try:
                base = sparseshot.load_base(spec, device=settings.device or None,
                                            cache_dir=settings.model_download_dir)
            except Exception as e:
                _base_errors[spec] = f"{type(e).__name__}: {e}"
                raise
            with _state_lock:
                _bases[spec] = base
                _base_errors.pop(spec, None)
        return base


def warm_up(spec: str | None = None) -> None:
    """Load the base model in a background thread (once at a time per spec)."""
    spec = spec or get_settings().base_model
    with _state_lock:
        if spec in _bases or spec in _warming:
            return
        _warming.add(spec)

    def load() -> None:
        try:
            get_base(spec)
        except Exception as e:
            log.error("base model %s could not be loaded: %s", spec, e)
        finally:
            with _state_lock:
                _warming.discard(spec)

    threading.Thread(target=load, name="base-warm-up", daemon=True).start()


def base_ready(spec: str | None = None) -> bool:
    """True once the default (or given) base model is loaded; never blocks (starts loading it)."""
    spec = spec or get_settings().base_model
    with _state_lock:
        if spec in _bases:
            return True
    warm_up(spec)
    return False


def base_error(spec: str | None = None) -> str | None:
    """The last load error of `spec`, if any (for /readyz details)."""
    return _base_errors.get(spec or get_settings().base_model)


# ---------------------------------------------------------------- micro-batching


@dataclass
class _Request:
    images: list[Any]
    top_k: int
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to run the next batch rather than with a result
    result: list[Prediction] | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Merges concurrent `predict(images, top_k)` calls for one model into single forwards.

    No thread of its own: the first caller to arrive leads, waits `window_s` for others, runs
    the batch, then hands leadership to a request that arrived meanwhile (if any).
    """

    def __init__(self, predict: Callable[[list[Any], int], list[Prediction]],
                 window_s: float = BATCH_WINDOW_S, max_images: int = MAX_BATCH_IMAGES) -> None:
        self._predict = predict
        self.window_s = window_s
        self.max_images = max_images
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._busy = False
        self.forwards = 0  # forward passes run (tests, stats)

    def __call__(self, images: list[Any], top_k: int) -> list[Prediction]:
        req = _Request(list(images), top_k)
        with self._lock:
            self._pending.append(req)
            leader = not self._busy
            self._busy = True
        if leader:
            time.sleep(self.window_s)
            self._lead()
        while True:
            req.done.wait()
            if req.lead and req.result is None and req.error is None:
                req.lead = False
                req.done.clear()
                self._lead()
                continue
            break
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _lead(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        self._run(batch)
        with self._lock:
            if self._pending:
                nxt = self._pending[0]
                nxt.lead = True
                nxt.done.set()
            else:
                self._busy = False

    def _run(self, batch: list[_Request]) -> None:
        images = [im for r in batch for im in r.images]
        top_k = max(r.top_k for r in batch)
        try:
            preds: list[Prediction] = []
            for i in range(0, len(images), self.max_images):
                preds.extend(self._predict(images[i : i + self.max_images], top_k))
                self.forwards += 1
            at = 0
            for r in batch:
                r.result = [p[: r.top_k] for p in preds[at : at + len(r.images)]]
                at += len(r.images)
        except BaseException as e:
            for r in batch:
                r.error = e
        for r in batch:
            r.done.set()


# ---------------------------------------------------------------- adapted models (LRU)


@dataclass
class _Entry:
    classifier: Any
    batcher: MicroBatcher
    nbytes: int


class ModelCache:
    """LRU of Classifier objects keyed by (base spec, delta key) under a byte budget."""

    def __init__(self, budget_bytes: int, loader: Callable[[str, str], Any]) -> None:
        self.budget_bytes = budget_bytes
        self._loader = loader
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _hit(self, key: tuple[str, str]) -> _Entry | None:
        """The cached entry, marked most recently used and counted as a hit; None on a miss.
        Call with self._lock held."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            _count("MODEL_CACHE_HITS")
        return entry

    def get(self, base_spec: str, delta_key: str) -> _Entry:
        key = (base_spec, delta_key)
        with self._lock:
            entry = self._hit(key)
            if entry is not None:
                return entry
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per key, even when many requests miss at once
            with self._lock:
                entry = self._hit(key)
                if entry is not None:
                    return entry
            self.misses += 1
            _count("MODEL_CACHE_MISSES")
            clf = self._loader(base_spec, delta_key)
            entry = _Entry(clf, MicroBatcher(clf.predict), int(getattr(clf, "nbytes", 0) or 0))
            with self._lock:
                self._entries[key] = entry
                self._loading.pop(key, None)
                self._evict()
            return entry

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while len(self._entries) > 1 and total > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _count(name: str) -> None:
    try:
        from app import metrics

        getattr(metrics, name).inc()
    except Exception:  # metrics are optional for the serving path
        pass


def load_classifier(base_spec: str, delta_key: str) -> Any:
    """A Classifier for a stored delta over the process's base model."""
    import sparseshot

    storage = get_storage()
    base = get_base(base_spec)
    delta = sparseshot.SparseDelta.from_bytes(storage.get(delta_key))
    return sparseshot.Classifier(base, delta)


_cache: ModelCache | None = None
_cache_lock = threading.Lock()


def get_cache() -> ModelCache:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = ModelCache(get_settings().model_cache_bytes, load_classifier)
        return _cache


def reset() -> None:
    """Forget cached models and bases (tests)."""
    global _cache
    with _cache_lock:
        _cache = None
    with _load_lock, _state_lock:
        _bases.clear()
        _base_errors.clear()


# ---------------------------------------------------------------- the service functions


def _entry_for(model: Any) -> _Entry:
    """The cached classifier of a model row; ModelNotReady (409) when it cannot be served."""
    from app.errors import ModelNotReady
    from app.storage import StorageError

    try:
        return get_cache().get(model.base_model, model.delta_key)
    except StorageError as e:
        raise ModelNotReady(f"the delta file of model {model.id} is not available") from e
    except Exception as e:
        import sparseshot

        if isinstance(e, (sparseshot.DeltaError, sparseshot.BaseModelError, FileNotFoundError)):
            raise ModelNotReady(f"model {model.id} cannot be served: {e}") from e
        raise


def classify(*, model: Any, images: Sequence[tuple[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """Top-k labels per image: [{"filename", "labels": [{"label", "score"}]}] in input order."""
    entry = _entry_for(model)
    pils = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for _, im in images]
    preds = entry.batcher(pils, max(1, int(top_k)))
    return [
        {"filename": name, "labels": [{"label": label, "score": float(score)} for label, score in pred]}
        for (name, _), pred in zip(images, preds, strict=True)
    ]


def create_zeroshot_delta(*, classes: list[str], base_model: str | None = None,
                          template: str | None = None) -> tuple[str, int, int, float]:
    """A zero-shot model's delta (class embeddings only), stored; (delta_key, nnz, nbytes, density)."""
    import sparseshot

    base = get_base(base_model)
    hparams = {"template": template} if template else {}
    result = sparseshot.adapt(base, [], [], list(classes), method="zeroshot", **hparams)
    delta = result.delta
    key = objects.put_pinned(delta.to_bytes())  # atomic, content-addressed, safe from deletion
    return key, int(delta.nnz), int(delta.nbytes), float(delta.density)
