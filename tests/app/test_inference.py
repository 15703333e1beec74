"""Serving internals: the scheduler (mixed batches, fairness, bounded queue, cold loads off the batch
loop), the byte-budgeted LRU of prepared deltas, and the service over the real tiny base."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from app.runtime import Runtime
from app.services import inference
from app.services.bases import BaseRegistry
from app.services.model_cache import PreparedCache
from app.services.scheduler import QueueFull, Scheduler


@dataclass
class _Prepared:
    """Stands in for sparseshot.serving.PreparedDelta: one class per model, named after it."""

    name: str
    nbytes: int = 1

    @property
    def classes(self) -> list[str]:
        return [self.name, "other"]


class _Engine:
    """Records each batch's groups; model m's probability for its own class is the pixel value."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.delay = delay

    def probabilities(self, pixels, groups):
        self.batches.append([(p.name, n) for p, n in groups])
        time.sleep(self.delay)
        out, at = [], 0
        for _, n in groups:
            v = pixels[at : at + n, 0, 0, 0].clamp(0, 1)
            out.append(torch.stack([v, 1 - v], dim=1))
            at += n
        return out


def _scheduler(load=None, engine=None, **kw) -> tuple[Scheduler, _Engine]:
    engine = engine or _Engine()
    load = load or (lambda key: _Prepared(key[1]))

    class _Sched(Scheduler):
        def submit(self, key, pixels, top_k, load_fn=None):  # type: ignore[override]
            return super().submit(key, pixels, top_k, lambda: load(key))

    return _Sched(cache=PreparedCache(10_000), engine_for=lambda spec: engine, **kw), engine


def _px(n: int, value: float = 0.7) -> torch.Tensor:
    return torch.full((n, 3, 2, 2), value)


def _parallel(fn, args_list):
    with ThreadPoolExecutor(len(args_list)) as pool:
        return list(pool.map(lambda a: fn(*a), args_list))


def test_requests_for_many_models_share_batches_and_get_their_own_rows() -> None:
    sched, engine = _scheduler(window_s=0.05)
    reqs = [(("b", f"m{i % 3}"), _px(1 + i % 2, 0.1 * i), 2) for i in range(9)]
    results = _parallel(sched.submit, reqs)
    for (key, pixels, _), res in zip(reqs, results, strict=True):
        assert len(res) == pixels.shape[0]
        scores = dict(res[0])
        assert set(scores) == {key[1], "other"}  # its own model's classes
        assert scores[key[1]] == pytest.approx(float(pixels[0, 0, 0, 0].clamp(0, 1)))
    assert len(engine.batches) < 9  # merged
    assert any(len(b) > 1 for b in engine.batches)  # a batch mixed models
    for batch in engine.batches:  # one group of rows per model
        names = [name for name, _ in batch]
        assert len(set(names)) == len(names)
    sched.stop()


def test_round_robin_keeps_a_hot_model_from_starving_others() -> None:
    gate = threading.Event()
    engine = _Engine()
    sched, _ = _scheduler(engine=engine, max_batch_images=4, window_s=0)
    blocker = threading.Thread(target=sched.submit, args=(("b", "first"), _px(1), 1))
    original = engine.probabilities

    def slow_first(pixels, groups):
        if not gate.is_set():
            gate.wait(5)
        return original(pixels, groups)

    engine.probabilities = slow_first  # type: ignore[method-assign]
    blocker.start()
    time.sleep(0.1)  # the first batch is running; the rest queue behind it
    hot = [threading.Thread(target=sched.submit, args=(("b", "hot"), _px(1), 1)) for _ in range(12)]
    for t in hot:
        t.start()
    time.sleep(0.1)
    cold = threading.Thread(target=sched.submit, args=(("b", "cold"), _px(1), 1))
    cold.start()
    time.sleep(0.1)
    gate.set()
    for t in [blocker, cold, *hot]:
        t.join(5)
    second = engine.batches[1]
    assert ("cold", 1) in second and sum(n for _, n in second) == 4  # served in the next batch
    sched.stop()


def test_full_queue_is_refused_and_errors_reach_callers() -> None:
    release = threading.Event()

    def slow_load(key):
        release.wait(5)
        return _Prepared(key[1])

    sched, _ = _scheduler(load=slow_load, max_queue_images=3)
    waiting = threading.Thread(target=sched.submit, args=(("b", "m"), _px(3), 1))
    waiting.start()
    time.sleep(0.05)
    with pytest.raises(QueueFull):
        sched.submit(("b", "m"), _px(1), 1)
    release.set()
    waiting.join(5)
    assert sched.submit(("b", "m"), _px(1), 1)  # room again

    def broken(key):
        raise ValueError(f"bad delta {key[1]}")

    failing, _ = _scheduler(load=broken)
    with pytest.raises(ValueError, match="bad delta x"):
        failing.submit(("b", "x"), _px(1), 1)
    sched.stop()


def test_a_cold_model_does_not_stall_warm_ones() -> None:
    release = threading.Event()

    def load(key):
        if key[1] == "cold":
            release.wait(5)
        return _Prepared(key[1])

    sched, _ = _scheduler(load=load, window_s=0)
    sched.submit(("b", "warm"), _px(1), 1)
    cold_result: list = []
    cold = threading.Thread(target=lambda: cold_result.append(sched.submit(("b", "cold"), _px(1), 1)))
    cold.start()
    t0 = time.monotonic()
    for _ in range(5):
        sched.submit(("b", "warm"), _px(1), 1)  # answered while "cold" is still loading
    assert time.monotonic() - t0 < 2 and not cold_result
    release.set()
    cold.join(5)
    assert cold_result and cold_result[0][0][0][0] == "cold"
    sched.stop()


def test_lru_respects_byte_budget_and_loads_once() -> None:
    loads: list[str] = []

    def load(key):
        loads.append(key[1])
        time.sleep(0.02)
        return _Prepared(key[1], nbytes=40)

    cache = PreparedCache(100)
    get = lambda k: cache.get(("b", k), lambda: load(("b", k)))  # noqa: E731
    for k in ("k1", "k2", "k1", "k3"):  # k1 hit; k3 evicts k2 (120 > 100)
        get(k).result()
    assert len(cache) == 2 and cache.nbytes == 80 and ("b", "k2") not in cache
    futures = [get("k4") for _ in range(5)]  # concurrent misses: one load
    assert len({id(f.result()) for f in futures}) == 1
    assert loads == ["k1", "k2", "k3", "k4"] and cache.hits == 1 and cache.misses == 4
    big = PreparedCache(10)
    big.get(("b", "x"), lambda: _Prepared("x", nbytes=50)).result()
    assert len(big) == 1  # the newest is kept even alone over budget


# ---------------------------------------------------------------- with the real tiny base model


@pytest.fixture
def runtime(env_settings) -> Iterator[Runtime]:
    """A process's runtime context over the environment's settings: its base models and serving."""
    rt = Runtime.build(env_settings)
    yield rt
    rt.close()


def _store_delta(base, classes, *, perturb: float | None, seed: int) -> str:
    from app.storage import get_storage
    from sparseshot import SparseDelta

    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    names = ["visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj"]
    adapted = dict(state)
    if perturb is not None:
        for name in names:
            w = adapted[name].clone()
            w.view(-1)[torch.randperm(w.numel(), generator=g)[:40]] += perturb
            adapted[name] = w
    delta = SparseDelta.from_models(state, adapted, names=names,
                                    meta={"classes": classes, "base_fingerprint": base.fingerprint})
    dim = state["visual.proj"].shape[1]
    delta.extras["class_embeddings"] = torch.nn.functional.normalize(
        torch.randn(len(classes), dim, generator=g), dim=-1)
    return get_storage().put(delta.to_bytes())


def test_real_models_served_concurrently_match_the_classifier(env_settings, runtime) -> None:
    from PIL import Image

    from app.storage import get_storage
    from sparseshot import Classifier, SparseDelta

    base = runtime.bases.get()

    class Row:
        def __init__(self, key: str) -> None:
            self.id, self.base_model, self.delta_key = key[:8], env_settings.base_model, key

    keys = [_store_delta(base, ["a", "b", "c"], perturb=p, seed=i) for i, p in enumerate((None, 0.5, -0.5))]
    rows = [Row(k) for k in keys]
    imgs = [(f"{i}.png", Image.new("RGB", (40, 40), (i * 60, 255 - i * 50, 90))) for i in range(4)]
    jobs = [(rows[i % 3],) for i in range(12)]
    serve = dict(storage=get_storage(), serving=runtime.serving())
    got = _parallel(lambda r: inference.classify(model=r, images=imgs, top_k=3, **serve), jobs)
    for (r,), out in zip(jobs, got, strict=True):
        clf = Classifier(base, SparseDelta.from_bytes(get_storage().get(r.delta_key)))
        want = clf.predict([im for _, im in imgs], top_k=3)
        for p, q in zip(out, want, strict=True):
            assert [lab["label"] for lab in p["labels"]] == [label for label, _ in q]
            assert [lab["score"] for lab in p["labels"]] == pytest.approx([s for _, s in q], abs=1e-5)
    sched = runtime.serving().scheduler
    assert sched.cache.misses == 3 and sched.batches < 12

    from app.storage import StorageError
    from sparseshot.delta import DeltaError

    with pytest.raises((StorageError, FileNotFoundError, DeltaError)):
        inference.classify(model=Row("0" * 64), images=imgs, top_k=1, **serve)


def test_zeroshot_delta_is_servable(env_settings, runtime) -> None:
    from PIL import Image

    from app.storage import get_storage

    delta = inference.zeroshot_delta(bases=runtime.bases, classes=["cat", "dog"], base_model=None,
                                     template="a picture of a {}.")
    key = get_storage().put(delta.to_bytes())

    class Row:
        id, base_model, delta_key = "zs", env_settings.base_model, key

    (pred,) = inference.classify(model=Row(), images=[("x.png", Image.new("RGB", (32, 32)))], top_k=5,
                                 storage=get_storage(), serving=runtime.serving())
    assert {lab["label"] for lab in pred["labels"]} == {"cat", "dog"}


def test_base_ready_does_not_block_while_loading(env_settings, monkeypatch) -> None:
    import sparseshot

    release = threading.Event()

    def slow_load(spec, device=None, cache_dir=None):
        release.wait(10)
        return object()

    bases = BaseRegistry(env_settings)
    monkeypatch.setitem(vars(sparseshot), "load_base", slow_load)
    t0 = time.monotonic()
    assert bases.ready() is False  # starts the background load
    assert bases.ready() is False
    assert time.monotonic() - t0 < 1
    release.set()
    deadline = time.monotonic() + 5
    while not bases.ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bases.ready()
