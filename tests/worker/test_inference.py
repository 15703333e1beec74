"""Serving internals: per-model micro-batching and the byte-budgeted LRU of adapted models."""

from __future__ import annotations

import threading
import time

import pytest

from app.services import inference
from app.services.inference import MicroBatcher, ModelCache


def _fake_predict(calls: list[int], delay: float = 0.02):
    def predict(images, top_k):
        calls.append(len(images))
        time.sleep(delay)
        # "label" = the image itself, so callers can check they got their own rows back.
        return [[(f"{im}-{j}", 1.0 / (j + 2)) for j in range(top_k)] for im in images]

    return predict


def _run_concurrently(fn, args_list):
    out: dict[int, object] = {}
    barrier = threading.Barrier(len(args_list))

    def call(i, args):
        barrier.wait()
        out[i] = fn(*args)

    threads = [threading.Thread(target=call, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return [out[i] for i in range(len(args_list))]


def test_concurrent_requests_share_forward_passes():
    calls: list[int] = []
    batcher = MicroBatcher(_fake_predict(calls), window_s=0.02)
    reqs = [([f"r{i}a", f"r{i}b"], 1 + i % 3) for i in range(8)]
    results = _run_concurrently(batcher, reqs)
    for (images, top_k), res in zip(reqs, results, strict=True):
        assert [row[0][0].rsplit("-", 1)[0] for row in res] == images
        assert all(len(row) == top_k for row in res)
    assert sum(calls) == 16 and len(calls) < 8  # merged


def test_batch_splits_at_max_images_and_errors_reach_every_caller():
    calls: list[int] = []
    batcher = MicroBatcher(_fake_predict(calls, 0), window_s=0, max_images=3)
    assert len(batcher(list("abcdefg"), 2)) == 7 and calls == [3, 3, 1]

    def broken(images, top_k):
        raise RuntimeError("bad model")

    with pytest.raises(RuntimeError, match="bad model"):
        MicroBatcher(broken, window_s=0)(["x"], 1)


class _Clf:
    def __init__(self, name: str, nbytes: int) -> None:
        self.name, self.nbytes = name, nbytes

    def predict(self, images, top_k=5):
        return [[(self.name, 1.0)] for _ in images]


def test_lru_respects_byte_budget_and_counts_hits():
    loads: list[str] = []

    def loader(base, key):
        loads.append(key)
        return _Clf(key, 40)

    cache = ModelCache(100, loader)
    cache.get("b", "k1")
    cache.get("b", "k2")
    cache.get("b", "k1")  # hit; k2 becomes least recent
    cache.get("b", "k3")  # 120 > 100: evict k2
    assert len(cache) == 2 and cache.nbytes == 80
    cache.get("b", "k1")
    cache.get("b", "k2")  # reloaded
    assert loads == ["k1", "k2", "k3", "k2"] and cache.hits == 2 and cache.misses == 4

    big = ModelCache(10, lambda b, k: _Clf(k, 50))
    big.get("b", "x")
    assert len(big) == 1  # the model in use is kept even alone over budget


def test_concurrent_misses_load_once():
    loads: list[str] = []

    def loader(base, key):
        loads.append(key)
        time.sleep(0.05)
        return _Clf(key, 1)

    cache = ModelCache(1000, loader)
    entries = _run_concurrently(cache.get, [("b", "k")] * 6)
    assert loads == ["k"] and all(e is entries[0] for e in entries)


def test_classify_formats_predictions(monkeypatch):
    from PIL import Image

    cache = ModelCache(1000, lambda b, k: _Clf("cat", 1))
    monkeypatch.setattr(inference, "get_cache", lambda: cache)

    class Row:
        base_model, delta_key = "b", "k"

    imgs = [("a.png", Image.new("L", (4, 4))), ("b.png", Image.new("RGB", (4, 4)))]
    out = inference.classify(model=Row(), images=imgs, top_k=3)
    assert out == [{"filename": "a.png", "labels": [{"label": "cat", "score": 1.0}]},
                   {"filename": "b.png", "labels": [{"label": "cat", "score": 1.0}]}]
