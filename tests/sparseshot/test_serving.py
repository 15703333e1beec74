"""sparseshot.serving: a mixed-model batch equals "apply each delta, then forward" (Classifier)."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch

from sparseshot.base import BaseModel, load_base
from sparseshot.classifier import Classifier, class_text_embeddings
from sparseshot.delta import DeltaError, SparseDelta, weights_fingerprint
from sparseshot.lora import add_lora, lora_delta_parts
from sparseshot.serving import ServingEngine, prepare

CLASSES = ["cat", "dog", "car", "tree"]
V = "visual.transformer.resblocks"


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base("sparseshot-tiny:random", device="cpu")


def _meta(base: BaseModel) -> dict:
    return {"base_model": base.spec, "base_fingerprint": base.fingerprint, "classes": CLASSES,
            "template": "a photo of a {}.", "method": "so"}


def _nudge(flat: torch.Tensor, fraction: float, g: torch.Generator, scale: float = 0.3) -> None:
    k = max(1, int(fraction * flat.numel()))
    flat[torch.randperm(flat.numel(), generator=g)[:k]] += scale * torch.randn(k, generator=g)


def _so_delta(base: BaseModel, seed: int, value_dtype=torch.float32, fraction=0.05,
              extra=True) -> SparseDelta:
    """Sparse changes to every trained matrix of both towers, plus (extra) other vision tensors."""
    g = torch.Generator().manual_seed(seed)
    adapted = copy.deepcopy(base.model)
    state = adapted.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in state.items():
            if name.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")):
                _nudge(t.view(-1), fraction, g)
        if extra:
            for name in ("visual.proj", "visual.conv1.weight", "visual.class_embedding",
                         "visual.positional_embedding", "visual.ln_pre.weight", f"{V}.0.ln_1.bias",
                         f"{V}.1.mlp.c_fc.bias", f"{V}.0.attn.in_proj_bias", "visual.ln_post.bias"):
                _nudge(state[name].view(-1), 0.5, g)
    delta = SparseDelta.from_models(base.model, adapted, value_dtype=value_dtype, meta=_meta(base))
    delta.extras["class_embeddings"] = class_text_embeddings(adapted, base.tokenizer, CLASSES)
    return delta


def _lora_delta(base: BaseModel, seed: int) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for p in add_lora(model, rank=2, encoder="both"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    delta = SparseDelta.empty(_meta(base))
    for name, row_start, b, a, scale in lora_delta_parts(model):
        delta.add_lowrank(name, row_start, b, a, scale)
    model.eval()
    delta.extras["class_embeddings"] = class_text_embeddings(model, base.tokenizer, CLASSES)
    return delta


def _pixels(base: BaseModel, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, base.image_size, base.image_size, generator=g)


def _reference(base: BaseModel, delta: SparseDelta | None, pixels: torch.Tensor) -> torch.Tensor:
    clf = Classifier(base, delta, classes=CLASSES)
    return clf.probabilities(list(pixels))


def test_mixed_batch_equals_apply_then_forward(base: BaseModel) -> None:
    deltas = {
        "zeroshot": None,
        "so": _so_delta(base, 1),
        "so-fp16-add": _so_delta(base, 2, value_dtype=torch.float16),
        "lora": _lora_delta(base, 3),
        "dense-ish": _so_delta(base, 4, fraction=0.6, extra=False),
    }
    fp = weights_fingerprint(base.model)
    prepared = {k: prepare(base, d, classes=CLASSES) for k, d in deltas.items()}
    assert prepared["dense-ish"].linears and all(lin.dense for lin in prepared["dense-ish"].linears.values())
    assert not any(lin.dense for lin in prepared["so"].linears.values())
    assert all(not n.startswith("transformer.") for n in prepared["so"].linears)  # vision part only
    engine = ServingEngine(base)
    order = ["so", "zeroshot", "lora", "so", "so-fp16-add", "dense-ish"]
    sizes = [2, 1, 3, 1, 2, 2]
    pixels = _pixels(base, sum(sizes))
    got = engine.probabilities(pixels, [(prepared[k], n) for k, n in zip(order, sizes, strict=True)])
    at = 0
    for k, n, probs in zip(order, sizes, got, strict=True):
        want = _reference(base, deltas[k], pixels[at : at + n])
        torch.testing.assert_close(probs, want, atol=2e-5, rtol=1e-4)
        at += n
    # Each model's output differs from the bare base's: the corrections really ran.
    zs = engine.probabilities(pixels[:2], [(prepared["zeroshot"], 2)])[0]
    assert not torch.allclose(got[0], zs, atol=1e-3)
    assert weights_fingerprint(base.model) == fp  # the shared base was only read


def test_dense_fallback_without_cache_room_uses_the_sparse_path(base: BaseModel) -> None:
    delta = _so_delta(base, 5, fraction=0.3, extra=False)
    p = prepare(base, delta, dense_threshold=0.0)  # every layer dense
    assert all(lin.dense for lin in p.linears.values())
    pixels = _pixels(base, 3, seed=1)
    with_cache = ServingEngine(base).probabilities(pixels, [(p, 3)])[0]
    no_cache = ServingEngine(base, dense_cache_bytes=0)
    without = no_cache.probabilities(pixels, [(p, 3)])[0]
    assert no_cache.dense.nbytes == 0
    torch.testing.assert_close(with_cache, without, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(without, _reference(base, delta, pixels), atol=2e-5, rtol=1e-4)


def test_compiled_kernel_and_torch_sparse_agree(base: BaseModel, monkeypatch) -> None:
    from sparseshot import kernels

    p = prepare(base, _so_delta(base, 9, fraction=0.02))
    pixels = _pixels(base, 5, seed=3)
    engine = ServingEngine(base)
    with_kernel = engine.image_features(pixels, [(p, 2), (None, 1), (p, 2)])
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(engine.image_features(pixels, [(p, 2), (None, 1), (p, 2)]), with_kernel)
    monkeypatch.undo()
    if not kernels.available():
        pytest.skip("no C compiler: the torch.sparse path above is the one in use")
    # Several models in one call: tiles of 1-4 vectors (5, 20, 37, 64 rows and a remainder of 2000),
    # inputs and outputs off the 16×16 transposes, more than one row block, rows with no entries
    # and dense rows (the chains' remainders), enough work for the two-thread split; then one
    # model alone, whose output rows are split between the threads.
    # Both second threads: one of torch's OpenMP team (where found), then a thread made for the call.
    if sys.platform == "linux" and "OpenMP" in torch.__config__.parallel_info():
        assert kernels._omp is not None, "torch runs on OpenMP but its runtime was not found"
    g = torch.Generator().manual_seed(0)
    for team in (kernels._omp, None):
        monkeypatch.setattr(kernels, "_omp", team)
        for shapes in (((2000, 40, 64, 200), (37, 150, 33, 900), (5, 70, 20, 0), (20, 130, 48, 3000),
                        (64, 96, 768, 5000)), ((50, 300, 96, 4000),)):
            _check_kernel(kernels, shapes, g)


def _check_kernel(kernels, shapes, g: torch.Generator) -> None:
    jobs, want = [], []
    for n, out, inn, k in shapes:
        d = torch.zeros(out, inn)
        d.view(-1)[torch.randperm(d.numel(), generator=g)[:k]] = torch.randn(k, generator=g)
        d[3] = 0.0
        c = d.to_sparse_csr()
        crow, col = c.crow_indices().int(), c.col_indices().int()
        x, y = torch.randn(n, inn, generator=g), torch.randn(n, out, generator=g)
        want.append(y + x @ d.T)
        jobs.append(kernels.Correction(y, x, crow, col, c.values()))
    kernels.csr_add(jobs)
    for job, w in zip(jobs, want, strict=True):
        torch.testing.assert_close(job.y, w, atol=1e-4, rtol=1e-4)


def test_a_hot_model_alone_runs_on_dense_weights_with_equal_outputs(base: BaseModel) -> None:
    from sparseshot import serving

    delta = _so_delta(base, 12, fraction=0.02)
    p = prepare(base, delta, classes=CLASSES)
    engine = ServingEngine(base)
    pixels = _pixels(base, 3, seed=4)
    want = _reference(base, delta, pixels)
    outs = [engine.probabilities(pixels, [(p, 3)])[0] for _ in range(serving.SOLO_STREAK + 1)]
    n_layers = len(p.linears)
    layer_bytes = sum(lin.shape[0] * lin.shape[1] * 4 for lin in p.linears.values())
    assert engine.dense.nbytes == layer_bytes and n_layers > 0  # every layer went dense, once
    for got in outs:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    other = prepare(base, _so_delta(base, 13, fraction=0.02), classes=CLASSES)
    engine.probabilities(pixels, [(other, 2), (p, 1)])  # mixed batch: no streak, sparse path
    assert engine.dense.nbytes == layer_bytes


def test_dense_cache_never_evicts_what_the_current_forward_uses() -> None:
    from sparseshot.serving import DenseWeights

    cache = DenseWeights(budget_bytes=3 * 400)  # three (10, 10) fp32 tensors
    built: list[str] = []

    def build(name: str):
        return lambda: built.append(name) or torch.zeros(10, 10)

    for _ in range(3):  # a model with four layers, one forward each time: the fourth never fits
        f = cache.tick()
        got = [cache.get((1, n), 400, build(n), f) for n in "abcd"]
        assert [g is not None for g in got] == [True, True, True, False]  # d runs sparse
    assert built == ["a", "b", "c"]  # built once each, never evicted by their own model
    f = cache.tick()
    cache.tick()  # a forward later, the entries are old enough to evict
    f = cache.tick()
    assert cache.get((2, "x"), 400, build("x"), f) is not None and cache.nbytes == 3 * 400
    assert cache.get((9, "big"), 401 * 3, build("big"), f) is None


def test_concurrent_forwards_do_not_interfere(base: BaseModel) -> None:
    engine = ServingEngine(base)
    models = [prepare(base, _so_delta(base, 10 + i)) for i in range(3)]
    pixels = _pixels(base, 4, seed=2)
    expected = [engine.probabilities(pixels, [(m, 4)])[0] for m in models]
    out: dict[int, list] = {}

    def run(i: int) -> None:
        out[i] = [engine.probabilities(pixels, [(models[(i + j) % 3], 4)])[0] for j in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(out[i][j], expected[(i + j) % 3])


def test_prepare_checks_the_base_and_the_class_embeddings(base: BaseModel) -> None:
    delta = _so_delta(base, 6)
    delta.meta["base_fingerprint"] = "0" * 64
    with pytest.raises(DeltaError, match="base model mismatch"):
        prepare(base, delta)
    text_only = _so_delta(base, 7, extra=False)
    del text_only.extras["class_embeddings"]
    with pytest.raises(DeltaError, match="class embeddings"):
        prepare(base, text_only)
    p = prepare(base, None, classes=CLASSES)  # zero-shot: embeddings from the base text tower
    assert p.class_embeddings.shape[0] == len(CLASSES) and not p.touches_weights
    assert prepare(base, _so_delta(base, 8)).nbytes > p.nbytes
