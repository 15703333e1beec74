"""One scheduler per process: classify requests for any models queue together and run in mixed batches.

- A request enters with its images already preprocessed, (n, 3, S, S). It waits for its model's
  prepared delta (`PreparedCache.get`: a Future; a cold model loads in the loader pool, never in
  the batch loop), then joins that model's FIFO.
- The batch thread forms each batch round-robin over the models with waiting requests (one
  request per model per pass, the model served last moves to the back), up to `max_batch_images`
  and for one base model, then runs `ServingEngine.probabilities` once for the whole batch. A hot
  model therefore gets at most its share of a batch while others wait.
- The queue is bounded in images (`max_queue_images`); beyond it `submit` raises `QueueFull`,
  which the service answers with 503 and Retry-After.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from app.services.model_cache import ModelKey, PreparedCache

if TYPE_CHECKING:
    from sparseshot.serving import PreparedDelta, ServingEngine

log = logging.getLogger(__name__)

RankedLabels = list[tuple[str, float]]  # (label, probability), descending


class QueueFull(RuntimeError):
    """The serving queue holds its maximum of images; retry later."""


class QueueTimeout(RuntimeError):
    """A request waited longer than the scheduler's timeout."""


@dataclass
class _Request:
    key: ModelKey
    pixels: torch.Tensor  # (n, 3, S, S)
    top_k: int
    prepared: PreparedDelta | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[RankedLabels] | None = None
    error: BaseException | None = None
    released: bool = False  # its images no longer count against the queue bound

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


class Scheduler:
    """Mixed-model batching over per-base `ServingEngine`s (see the module doc)."""

    def __init__(self, *, cache: PreparedCache, engine_for: Callable[[str], ServingEngine],
                 max_batch_images: int = 32, max_queue_images: int = 512, window_s: float = 0.002,
                 timeout_s: float = 120.0) -> None:
        self.cache = cache
        self._engine_for = engine_for
        self.max_batch_images = max_batch_images
        self.max_queue_images = max_queue_images
        self.window_s = window_s
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._ready: OrderedDict[ModelKey, deque[_Request]] = OrderedDict()  # rotation order
        self._queued_images = 0  # accepted, not yet answered (loading, waiting or running)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.batches = 0  # forward passes run (tests, stats)

    # ---- callers ------------------------------------------------------------------------------------

    def submit(self, key: ModelKey, pixels: torch.Tensor, top_k: int,
               load: Callable[[], PreparedDelta]) -> list[RankedLabels]:
        """Per image, the top_k (label, probability) pairs of model `key`; blocks until answered.

        load() prepares the model when it is not in the cache (in a loader thread)."""
        req = _Request(key, pixels, max(1, int(top_k)))
        with self._cond:
            if self._queued_images + req.size > self.max_queue_images and self._queued_images:
                raise QueueFull(f"{self._queued_images} images are queued (limit {self.max_queue_images})")
            self._queued_images += req.size
            self._start()
        self.cache.get(key, load).add_done_callback(lambda f: self._loaded(req, f))
        if not req.done.wait(self.timeout_s):
            req.error = req.error or QueueTimeout(f"no answer within {self.timeout_s:g} s")
            self._release(req)  # a late answer is dropped
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _loaded(self, req: _Request, future: Future[PreparedDelta]) -> None:
        """Loader callback: queue the request behind its model, or fail it with the load error."""
        error = future.exception()
        if error is not None:
            req.error = error
            self._finish([req])
            return
        req.prepared = future.result()
        with self._cond:
            self._ready.setdefault(req.key, deque()).append(req)
            self._cond.notify()

    def _release(self, req: _Request) -> None:
        with self._cond:
            if not req.released:
                req.released = True
                self._queued_images -= req.size

    def _finish(self, batch: list[_Request]) -> None:
        for req in batch:
            self._release(req)
            req.done.set()

    # ---- the batch loop --------------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the batch thread on first use (call with the condition held)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="serving-batches", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                if self.window_s and self._waiting_images() < self.max_batch_images:
                    self._cond.wait(self.window_s)  # let concurrent callers join this batch
                batch = self._take()
            if batch:
                self._run(batch)

    def _waiting_images(self) -> int:
        return sum(r.size for q in self._ready.values() for r in q)

    def _take(self) -> list[_Request]:
        """Round-robin over models, one request each per pass, one base, up to max_batch_images."""
        batch: list[_Request] = []
        images, spec = 0, None
        progressed = True
        while progressed and images < self.max_batch_images:
            progressed = False
            for key in list(self._ready):
                queue = self._ready[key]
                other_base = spec is not None and key[0] != spec
                if other_base or (batch and images + queue[0].size > self.max_batch_images):
                    continue
                req = queue.popleft()
                batch.append(req)
                images, spec, progressed = images + req.size, key[0], True
                self._ready.move_to_end(key)  # served: to the back of the rotation
                if not queue:
                    del self._ready[key]
                if images >= self.max_batch_images:
                    break
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """One forward for the batch: rows grouped by model, each group with its own classes."""
        order: dict[ModelKey, list[_Request]] = {}
        for req in batch:
            order.setdefault(req.key, []).append(req)
        reqs = [r for group in order.values() for r in group]
        try:
            engine = self._engine_for(reqs[0].key[0])
            groups = [(g[0].prepared, sum(r.size for r in g)) for g in order.values()]  # one per model
            pixels = torch.cat([r.pixels for r in reqs])  # (B, 3, S, S), grouped by model
            probs = engine.probabilities(pixels, groups)  # type: ignore[arg-type]
            for group, p in zip(order.values(), probs, strict=True):
                for req, rows in zip(group, p.split([r.size for r in group]), strict=True):
                    req.result = _top_k(rows, req.prepared.classes, req.top_k)  # type: ignore[union-attr]
        except Exception as e:
            log.exception("serving batch of %d requests failed", len(reqs))
            for req in reqs:
                req.error = e
        self.batches += 1
        self._finish(reqs)


def _top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[RankedLabels]:
    """probs (n, C) -> per row the k most probable (class, probability), descending."""
    values, indices = probs.topk(min(k, len(classes)), dim=-1)
    return [[(classes[j], float(p)) for p, j in zip(vrow, irow, strict=True)]
            for vrow, irow in zip(values.tolist(), indices.tolist(), strict=True)]
