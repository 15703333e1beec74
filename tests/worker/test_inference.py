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


# ---------------------------------------------------------------- with the real tiny base model


def _store_delta(base, classes, *, perturb: float | None, seed: int) -> str:
    import tempfile

    import torch

    from app.storage import get_storage
    from sparseshot import SparseDelta

    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    name = next(k for k in state if k.endswith("proj") and state[k].dim() == 2)
    adapted = dict(state)
    if perturb is not None:
        w = adapted[name].clone()
        w.view(-1)[:5] += perturb
        adapted[name] = w
    delta = SparseDelta.from_models(state, adapted, names=[name],
                                    meta={"classes": classes, "base_fingerprint": base.fingerprint})
    emb = torch.nn.functional.normalize(torch.randn(len(classes), state[name].shape[1], generator=g), dim=-1)
    delta.extras["class_embeddings"] = emb
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/delta.safetensors"
        delta.save(path)
        return get_storage().put_file(path)


def test_real_models_served_concurrently_match_sequential(settings):
    from PIL import Image

    inference.reset()
    base = inference.get_base()
    assert inference.base_ready()

    class Row:
        def __init__(self, key: str) -> None:
            self.id, self.base_model, self.delta_key = key[:8], settings.base_model, key

    rows = [Row(_store_delta(base, ["a", "b", "c"], perturb=p, seed=i))
            for i, p in enumerate((None, 0.5, -0.5))]
    imgs = [(f"{i}.png", Image.new("RGB", (40, 40), (i * 60, 255 - i * 50, 90))) for i in range(4)]
    expected = [inference.classify(model=r, images=imgs, top_k=3) for r in rows]
    for exp in expected:
        for pred in exp:
            scores = [lab["score"] for lab in pred["labels"]]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4

    jobs = [(rows[i % 3],) for i in range(12)]
    got = _run_concurrently(lambda r: inference.classify(model=r, images=imgs, top_k=3), jobs)
    for (r,), out in zip(jobs, got, strict=True):
        exp = expected[rows.index(r)]
        for p, q in zip(out, exp, strict=True):
            assert [lab["label"] for lab in p["labels"]] == [lab["label"] for lab in q["labels"]]
            want = [lab["score"] for lab in q["labels"]]
            assert [lab["score"] for lab in p["labels"]] == pytest.approx(want, abs=1e-5)
    cache = inference.get_cache()
    assert cache.misses == 3 and cache.hits >= 12

    from app.errors import ModelNotReady

    with pytest.raises(ModelNotReady):
        inference.classify(model=Row("0" * 64), images=imgs, top_k=1)
    inference.reset()


def test_zeroshot_delta_is_stored_and_servable(settings):
    from PIL import Image

    from app.storage import get_storage

    inference.reset()
    key, nnz, nbytes, density = inference.create_zeroshot_delta(
        classes=["cat", "dog"], base_model=None, template="a picture of a {}.")
    assert get_storage().exists(key) and nbytes > 0 and nnz >= 0 and 0 <= density <= 1

    class Row:
        id, base_model, delta_key = "zs", settings.base_model, key

    (pred,) = inference.classify(model=Row(), images=[("x.png", Image.new("RGB", (32, 32)))], top_k=5)
    assert {lab["label"] for lab in pred["labels"]} == {"cat", "dog"}
    inference.reset()


def test_base_ready_does_not_block_while_loading(settings, monkeypatch):
    import sparseshot

    release = threading.Event()

    def slow_load(spec, device=None, cache_dir=None):
        release.wait(10)
        return object()

    inference.reset()
    monkeypatch.setitem(vars(sparseshot), "load_base", slow_load)
    t0 = time.monotonic()
    assert inference.base_ready() is False  # starts the background load
    assert inference.base_ready() is False
    assert time.monotonic() - t0 < 1
    release.set()
    deadline = time.monotonic() + 5
    while not inference.base_ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inference.base_ready()
    inference.reset()
