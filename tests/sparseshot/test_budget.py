"""SO's delta budget: stored entries ≤ budget · trained entries, budget 1 = the unbudgeted recipe,
the shared-main-phase branching equals separate runs, accuracy survives pruning."""

from __future__ import annotations

import hashlib

import pytest
import torch

import sparseshot
from sparseshot.recipe import Cancelled, adapt, adapt_budgets, trainable_weights
from tests.sparseshot.test_adapt import CLASSES, _data

FAST_SO = {"density": 0.05, "lr": 1e-2, "n_iters": 3, "batch_size": 4, "early_stop_loss": 0.0}


@pytest.fixture(scope="module")
def base():
    return sparseshot.load_base("sparseshot-tiny:random", device="cpu")


@pytest.fixture(autouse=True)
def _every_step_progress(monkeypatch):
    import sparseshot.train

    monkeypatch.setattr(sparseshot.train, "PROGRESS_EVERY_S", 0.0)


def _digest(result) -> str:
    h = hashlib.sha256()
    for e in sorted(result.delta.entries, key=lambda e: e.name):
        h.update(e.name.encode())
        h.update(e.indices.numpy().tobytes())
        h.update(e.values.numpy().tobytes())
    h.update(result.class_embeddings.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(base):
    """The unbudgeted run and budgeted runs, each trained separately (seed 5)."""
    images, labels = _data(per_class=4)
    return {b: adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=b, **FAST_SO)
            for b in (1.0, 0.05, 0.01, 0.002)}


def test_stored_delta_holds_at_most_the_budget(base, runs):
    n = sum(p.numel() for p in trainable_weights(base.model).values())
    full = runs[1.0].delta.nnz
    assert runs[1.0].metrics["trained_entries"] == n and full > 0.05 * n  # SO left more than 5 %
    for b, r in runs.items():
        assert r.delta.nnz <= b * n and r.delta.nnz <= full
        assert r.metrics["delta_fraction"] == r.delta.nnz / n
        per_matrix = {e.name: e.nnz for e in r.delta.entries}
        params = dict(base.model.named_parameters())
        assert all(k <= int(b * params[name].numel()) for name, k in per_matrix.items())
        assert r.delta.class_embeddings is not None  # the extra stays
    assert runs[0.05].metrics["refine_steps"] == 3  # ceil(0.25 · 12 steps)
    assert runs[0.05].delta.nnz > runs[0.01].delta.nnz > runs[0.002].delta.nnz


def test_budget_one_is_the_unbudgeted_recipe_and_reproducible(base, runs):
    # Budget 1 runs no refine phase and prunes nothing: a second seeded run gives the same bits.
    # (Compared in-process: float results differ between CPUs, so no digest is hard-coded.)
    assert runs[1.0].metrics["refine_steps"] == 0 and runs[1.0].metrics["steps"] == 12
    assert runs[1.0].metrics["delta_fraction"] > 0.05  # more than the smallest budget kept
    images, labels = _data(per_class=4)
    again = adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=1.0, **FAST_SO)
    assert _digest(again) == _digest(runs[1.0])
    other = adapt(base, images, labels, CLASSES, "so", seed=6, delta_budget=1.0, **FAST_SO)
    assert _digest(other) != _digest(runs[1.0])  # the digest sees the seed's support draws


def test_kept_entries_are_the_largest_changes_and_the_rest_is_the_base(base, runs):
    full = {e.name: e for e in runs[1.0].delta.entries}
    for e in runs[0.01].delta.entries:
        kept = set(e.indices.tolist())
        assert kept <= set(full[e.name].indices.tolist())  # only entries SO itself changed


def test_shared_main_phase_equals_separate_runs(base, runs):
    images, labels = _data(per_class=4)
    shared = adapt_budgets(base, images, labels, CLASSES, [1.0, 0.01, 0.05], seed=5, **FAST_SO)
    assert list(shared) == [1.0, 0.01, 0.05]
    for b, r in shared.items():
        assert _digest(r) == _digest(runs[b])
        assert r.hparams["delta_budget"] == b and r.delta.meta["hparams"]["delta_budget"] == b
    with pytest.raises(ValueError, match="budgets"):
        adapt_budgets(base, images, labels, CLASSES, [0.1], delta_budget=0.1)


def test_budget_keeps_accuracy_on_a_learnable_task(base, runs):
    assert runs[1.0].metrics["train_accuracy"] == 1.0
    assert runs[0.01].metrics["train_accuracy"] == 1.0
    assert runs[0.01].metrics["final_loss"] < 0.1


def test_resume_in_the_refine_phase_matches_uninterrupted(base, runs, tmp_path):
    images, labels = _data(per_class=4)
    ckpt = tmp_path / "run.ckpt"
    calls = {"n": 0}

    def stop_in_refine() -> bool:  # 12 main steps, then 3 refine steps: stop after 13
        calls["n"] += 1
        return calls["n"] > 13

    with pytest.raises(Cancelled):
        adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=0.05, checkpoint=ckpt,
              should_stop=stop_in_refine, **FAST_SO)
    assert ckpt.exists()
    seen = []
    resumed = adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=0.05, checkpoint=ckpt,
                    on_progress=seen.append, **FAST_SO)
    assert seen[0].step == 14 and seen[-1].step == seen[-1].total_steps == 15
    assert _digest(resumed) == _digest(runs[0.05])
    assert not ckpt.exists()


def test_budget_never_grows_a_delta_that_already_fits(base, runs):
    images, labels = _data(per_class=4)
    r = adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=0.9, **FAST_SO)
    assert r.metrics["refine_steps"] == 0 and _digest(r) == _digest(runs[1.0])


def test_progress_counts_the_refine_steps(base):
    images, labels = _data(per_class=4)
    seen = []
    adapt(base, images, labels, CLASSES, "so", seed=5, delta_budget=0.01, on_progress=seen.append,
          **{**FAST_SO, "n_iters": 1})
    assert seen[0].total_steps == 4 and seen[-1].step == seen[-1].total_steps == 4 + 1  # + refine
    assert torch.tensor([p.step for p in seen]).diff().ge(0).all()
