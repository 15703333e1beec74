"""sparseshot.adapt on the tiny random-init config: every method end to end, learning, progress,
cancellation, determinism, checkpoint resume and hyperparameter validation (CPU, seconds)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sparseshot
from sparseshot.recipe import Cancelled, Progress, adapt, hparam_defaults, validate_hparams

adapt_mod = importlib.import_module("sparseshot.recipe")
train_mod = importlib.import_module("sparseshot.train")  # the training loop (progress throttle)

CLASSES = ["red", "blue"]
COLOURS = [(230, 20, 20), (20, 20, 230)]
# SO settings that learn within a few steps on the tiny model (the recipe's density is for ViT-B).
FAST_SO = {"density": 0.05, "lr": 1e-2, "n_iters": 2, "batch_size": 4}
FAST_LORA = {"lr": 1e-2, "n_iters": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def base():
    return sparseshot.load_base("sparseshot-tiny:random", device="cpu")


def _data(per_class: int = 2):
    """Solid-colour images with slight shade variation; labels alternate between the classes."""
    images, labels = [], []
    for i in range(per_class * len(CLASSES)):
        y = i % len(CLASSES)
        shade = tuple(max(0, min(255, c + 5 * (i // 2))) for c in COLOURS[y])
        images.append(Image.new("RGB", (40, 40), shade))
        labels.append(y)
    return images, labels


@pytest.fixture(autouse=True)
def _every_step_progress(monkeypatch):
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)


def _text_embeddings(model, base, template="a photo of a {}."):
    tokens = base.tokenizer([template.format(c) for c in CLASSES])
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens), dim=-1)


def _entries(delta):
    return {e.name: (e.indices, e.values) for e in delta.entries}


def test_zeroshot_needs_no_images(base):
    r = adapt(base, [], [], CLASSES, method="zeroshot")
    assert r.method == "zeroshot" and r.metrics["steps"] == 0
    assert r.delta.nnz == 0
    assert r.class_embeddings.shape == (2, 32)
    torch.testing.assert_close(r.class_embeddings.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(r.delta.class_embeddings, r.class_embeddings)
    torch.testing.assert_close(r.class_embeddings, _text_embeddings(base.model, base))
    meta = r.delta.meta
    assert meta["classes"] == CLASSES and meta["method"] == "zeroshot"
    assert meta["base_model"] == base.spec and meta["base_fingerprint"] == base.fingerprint
    assert meta["template"] == "a photo of a {}."


def test_so_end_to_end_delta_reproduces_adapted_model(base):
    images, labels = _data()
    before = sparseshot.delta.weights_fingerprint(base.model)
    r = adapt(base, images, labels, CLASSES, method="so", **FAST_SO)
    assert sparseshot.delta.weights_fingerprint(base.model) == before  # the shared base is untouched
    assert all(not p.requires_grad for p in base.model.parameters())
    assert r.method == "so" and r.delta.meta["method"] == "so"
    assert r.metrics["steps"] >= 1 and r.metrics["train_seconds"] > 0
    assert 0 < r.delta.nnz and r.delta.density <= 1.0
    allowed = set(adapt_mod.trainable_weights(base.model))
    assert set(r.delta.names) <= allowed
    # Applying the delta to a copy of the base gives the adapted text encoder's class embeddings.
    model = copy.deepcopy(base.model)
    r.delta.apply(model)
    torch.testing.assert_close(_text_embeddings(model, base), r.class_embeddings, atol=1e-5, rtol=1e-4)
    assert r.delta.meta["hparams"]["density"] == FAST_SO["density"]


def test_lora_end_to_end_lowrank_delta(base):
    images, labels = _data()
    before = sparseshot.delta.weights_fingerprint(base.model)
    r = adapt(base, images, labels, CLASSES, method="lora", **FAST_LORA)
    assert sparseshot.delta.weights_fingerprint(base.model) == before
    assert r.metrics["steps"] == r.metrics["total_steps"] == 2 * 2  # n_iters · shots, no early stop
    assert len(r.delta.lowrank) == 3 * 4  # q, k, v of 2 blocks in each of 2 towers
    model = copy.deepcopy(base.model)
    r.delta.apply(model)
    torch.testing.assert_close(_text_embeddings(model, base), r.class_embeddings, atol=1e-4, rtol=1e-3)


def test_so_loss_falls_on_learnable_task(base):
    images, labels = _data()
    seen: list[Progress] = []
    r = adapt(base, images, labels, CLASSES, method="so", on_progress=seen.append,
              **{**FAST_SO, "n_iters": 6, "early_stop_loss": 0.0})
    first = seen[0].loss
    assert r.metrics["final_loss"] < 0.5 * first
    assert r.metrics["train_accuracy"] == 1.0


def test_progress_reported(base):
    images, labels = _data()
    seen: list[Progress] = []
    r = adapt(base, images, labels, CLASSES, method="lora", on_progress=seen.append, **FAST_LORA)
    steps = [p.step for p in seen]
    assert steps == sorted(steps) and steps[-1] == r.metrics["steps"]
    assert all(p.total_steps == r.metrics["total_steps"] for p in seen)
    assert all(p.eta_seconds >= 0 and 0 <= p.train_accuracy <= 1 and p.loss >= 0 for p in seen)
    assert seen[-1].eta_seconds == 0


def test_progress_is_throttled(base, monkeypatch):
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 3600.0)
    images, labels = _data()
    seen: list[Progress] = []
    r = adapt(base, images, labels, CLASSES, method="lora", on_progress=seen.append, **FAST_LORA)
    assert [p.step for p in seen] == [r.metrics["steps"]]  # only the final report


def test_cancel_stops_within_one_step(base):
    images, labels = _data()
    seen: list[Progress] = []
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # asked before every step: steps 1..3 run, then stop

    with pytest.raises(Cancelled):
        adapt(base, images, labels, CLASSES, method="so", on_progress=seen.append,
              should_stop=should_stop, **{**FAST_SO, "early_stop_loss": 0.0})
    assert seen[-1].step == 3 and calls["n"] == 4


def test_deterministic_for_a_seed(base):
    images, labels = _data()
    a = adapt(base, images, labels, CLASSES, method="so", seed=3, **FAST_SO)
    b = adapt(base, images, labels, CLASSES, method="so", seed=3, **FAST_SO)
    c = adapt(base, images, labels, CLASSES, method="so", seed=4, **FAST_SO)
    ea, eb, ec = _entries(a.delta), _entries(b.delta), _entries(c.delta)
    assert ea.keys() == eb.keys()
    for name in ea:
        assert torch.equal(ea[name][0], eb[name][0]) and torch.equal(ea[name][1], eb[name][1])
    assert any(not torch.equal(ea[n][0], ec[n][0]) for n in ea)
    torch.testing.assert_close(a.class_embeddings, b.class_embeddings, rtol=0, atol=0)
    # Callers' RNG is left alone.
    torch.manual_seed(11)
    x = torch.rand(3)
    torch.manual_seed(11)
    adapt(base, images, labels, CLASSES, method="lora", **FAST_LORA)
    assert torch.equal(torch.rand(3), x)


@pytest.mark.parametrize("method,hp", [("so", FAST_SO), ("lora", FAST_LORA)])
def test_checkpoint_resume_after_cancel_matches_uninterrupted(base, tmp_path, method, hp):
    images, labels = _data()
    hp = {**hp, "n_iters": 3, "batch_size": 2}  # 6 steps, 2 per epoch
    if method == "so":
        hp["early_stop_loss"] = 0.0
    full = adapt(base, images, labels, CLASSES, method=method, **hp)
    ckpt = tmp_path / "run.ckpt"
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        adapt(base, images, labels, CLASSES, method=method, checkpoint=ckpt,
              should_stop=stop_after_three, **hp)
    assert ckpt.exists()
    seen: list[Progress] = []
    resumed = adapt(base, images, labels, CLASSES, method=method, checkpoint=ckpt,
                    on_progress=seen.append, **hp)
    assert seen[0].step == 4  # continued after the 3 saved steps
    assert resumed.metrics["steps"] == full.metrics["steps"]
    assert not ckpt.exists()  # removed once training completed
    torch.testing.assert_close(resumed.class_embeddings, full.class_embeddings, rtol=0, atol=0)
    if method == "so":
        ef, er = _entries(full.delta), _entries(resumed.delta)
        assert ef.keys() == er.keys()
        for name in ef:
            assert torch.equal(ef[name][0], er[name][0]) and torch.equal(ef[name][1], er[name][1])
    else:
        for lf, lr in zip(full.delta.lowrank, resumed.delta.lowrank, strict=True):
            assert torch.equal(lf.A, lr.A) and torch.equal(lf.B, lr.B)


def test_checkpoint_of_other_inputs_is_ignored(base, tmp_path):
    images, labels = _data()
    ckpt = tmp_path / "run.ckpt"
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        adapt(base, images, labels, CLASSES, method="lora", checkpoint=ckpt, should_stop=stop, **FAST_LORA)
    seen: list[Progress] = []
    adapt(base, images, labels, CLASSES, method="lora", checkpoint=ckpt, on_progress=seen.append,
          **{**FAST_LORA, "lr": 5e-3})  # other hyperparameters: starts over
    assert seen[0].step == 1


def test_encoder_and_positions_select_weights(base):
    images, labels = _data()
    r = adapt(base, images, labels, CLASSES, method="so", encoder="vision", positions=[-1], **FAST_SO)
    assert r.delta.names and all(n.startswith("visual.transformer.resblocks.1.") for n in r.delta.names)
    # The text encoder is untouched: class embeddings equal the base's.
    torch.testing.assert_close(r.class_embeddings, _text_embeddings(base.model, base))


def test_custom_template_is_used(base):
    r = adapt(base, [], [], CLASSES, method="zeroshot", template="a {} thing")
    torch.testing.assert_close(r.class_embeddings, _text_embeddings(base.model, base, "a {} thing"))
    assert r.delta.meta["template"] == "a {} thing"


def test_hparam_defaults_follow_the_recipes():
    so = hparam_defaults("so")
    assert so["lr"] == 2e-4 and tuple(so["betas"]) == (0.9, 0.999) and so["batch_size"] == 32
    assert so["n_iters"] == 2000 and so["early_stop_loss"] == 0.01 and so["encoder"] == "both"
    lora = hparam_defaults("lora")
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (2, 1.0, 0.25)
    assert (lora["lr"], lora["weight_decay"], lora["n_iters"]) == (2e-4, 1e-2, 500)
    assert set(hparam_defaults("zeroshot")) == {"template"}
    with pytest.raises(ValueError, match="unknown method"):
        hparam_defaults("dense")


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("so", {"learning_rate": 1e-3}, "unknown hyperparameter"),
        ("so", {"rank": 4}, "unknown hyperparameter"),
        ("zeroshot", {"lr": 1e-3}, "unknown hyperparameter"),
        ("so", {"lr": "fast"}, "lr must be a number"),
        ("so", {"lr": 0}, "lr must be in"),
        ("so", {"lr": float("nan")}, "lr must be a number"),
        ("so", {"batch_size": 2.5}, "batch_size must be an integer"),
        ("so", {"batch_size": True}, "batch_size must be an integer"),
        ("so", {"density": 1.5}, "density must be in"),
        ("so", {"betas": [0.9]}, "betas"),
        ("so", {"refresh_every": 0}, "refresh_every"),
        ("so", {"encoder": "audio"}, "encoder"),
        ("so", {"positions": "first"}, "positions"),
        ("so", {"positions": [0.5]}, "positions"),
        ("lora", {"dropout": 1.0}, "dropout"),
        ("lora", {"rank": 0}, "rank"),
        ("lora", {"template": "no placeholder"}, "template"),
        ("lora", {"seed": -1}, "seed"),
        ("so", {"seed": 2**40}, "seed"),
    ],
)
def test_validate_hparams_rejects(method, params, match):
    with pytest.raises(ValueError, match=match):
        validate_hparams(method, params)


def test_validate_hparams_merges_defaults():
    out = validate_hparams("so", {"density": 5e-4, "refresh_every": 10, "betas": (0.8, 0.99)})
    assert out["density"] == 5e-4 and out["refresh_every"] == 10 and out["betas"] == [0.8, 0.99]
    assert out["lr"] == 2e-4 and out["template"] == "a photo of a {}."
    assert validate_hparams("lora", None)["rank"] == 2


def test_adapt_rejects_bad_inputs(base):
    images, labels = _data(1)
    with pytest.raises(ValueError, match="unknown method"):
        adapt(base, images, labels, CLASSES, method="full")
    with pytest.raises(ValueError, match="labels"):
        adapt(base, images, labels[:1], CLASSES, method="so")
    with pytest.raises(ValueError, match="labels must be integers"):
        adapt(base, images, [0, 2], CLASSES, method="so")
    with pytest.raises(ValueError, match="at least one training image"):
        adapt(base, [], [], CLASSES, method="lora")
    with pytest.raises(ValueError, match="unique"):
        adapt(base, [], [], ["a", "a"], method="zeroshot")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        adapt(base, images, labels, CLASSES, method="so", rank=2)


def test_missing_weights_error_names_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(sparseshot.BaseModelError, match="nope.pt"):
        sparseshot.load_base(f"sparseshot-tiny:{missing}", device="cpu")


def test_package_exports_the_adapt_function(base):
    # The recipe module is imported above; the package attribute is still the function.
    assert sparseshot.adapt is adapt_mod.adapt is adapt
    r = sparseshot.adapt(base, [], [], CLASSES, method="zeroshot")
    assert r.method == "zeroshot"
