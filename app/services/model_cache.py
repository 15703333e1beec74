"""Prepared deltas in memory: an LRU under a byte budget, filled by a pool of loader threads.

A miss hands the load (fetch from storage, verify, `sparseshot.serving.prepare`) to the pool
and returns a Future at once, so the scheduler's batch loop never waits on a cold model: only
that model's requests wait for its Future. Concurrent misses of one model share one load. The
total `PreparedDelta.nbytes` stays under the budget (the newest entry is always kept, even alone
over it); an evicted delta still in a running batch stays alive until that batch ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from app import metrics

if TYPE_CHECKING:
    from sparseshot.serving import PreparedDelta

ModelKey = tuple[str, str]  # (base model spec, delta storage key)


class PreparedCache:
    """LRU of PreparedDelta by (base spec, delta key) under `budget_bytes`."""

    def __init__(self, budget_bytes: int, threads: int = 2) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[ModelKey, PreparedDelta] = OrderedDict()
        self._loading: dict[ModelKey, Future[PreparedDelta]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delta-loader")
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: ModelKey, load: Callable[[], PreparedDelta]) -> Future[PreparedDelta]:
        """A Future of the prepared delta: already done on a hit, load() running in the pool on a miss."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                metrics.MODEL_CACHE_HITS.inc()
                done: Future[PreparedDelta] = Future()
                done.set_result(hit)
                return done
            pending = self._loading.get(key)
            if pending is not None:
                return pending
            self.misses += 1
            metrics.MODEL_CACHE_MISSES.inc()
            future = self._pool.submit(self._fill, key, load)
            self._loading[key] = future
            return future

    def _fill(self, key: ModelKey, load: Callable[[], PreparedDelta]) -> PreparedDelta:
        try:
            prepared = load()
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
            raise
        with self._lock:
            self._entries[key] = prepared
            self._loading.pop(key, None)
            self._evict()
        return prepared

    def _evict(self) -> None:
        """Drop least recently used entries until under budget (call with the lock held)."""
        total = sum(p.nbytes for p in self._entries.values())
        while len(self._entries) > 1 and total > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._entries.clear()
