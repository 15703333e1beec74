"""Validation (sparseshot.validation: the option, held-out and k-fold splits), training with held-out
images, and the k-fold runner (sparseshot.crossval) on the tiny random model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sparseshot import crossval, validation
from sparseshot.recipe import Cancelled, Progress, adapt
from tests.sparseshot.test_adapt import (  # noqa: F401
    CLASSES,
    FAST_LORA,
    FAST_SO,
    _data,
    _entries,
    base,
    train_mod,
)


@pytest.fixture(autouse=True)
def _every_step_progress(monkeypatch):
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)


def test_parse_validation() -> None:
    assert validation.parse_validation(None) is None and validation.parse_validation({}) is None
    assert validation.parse_validation({"holdout": 0.2}) == {"holdout": 0.2}
    assert validation.parse_validation({"holdout_per_class": 2}) == {"holdout_per_class": 2}
    assert validation.parse_validation({"kfold": 2}) == {"kfold": 2}
    assert validation.parse_validation({"kfold": validation.MAX_FOLDS}) == {"kfold": validation.MAX_FOLDS}
    for bad in ({"holdout": 0}, {"holdout": 0.6}, {"holdout": True}, {"holdout": "0.2"},
                {"holdout_per_class": 0}, {"holdout_per_class": 1.5},
                {"holdout": 0.2, "holdout_per_class": 1}, {"kfold": 1}, {"kfold": validation.MAX_FOLDS + 1},
                {"kfold": 3.0}, {"kfold": True}, {"kfold": 3, "holdout": 0.2}, {"folds": 3}, [0.2]):
        with pytest.raises(ValueError, match="validation"):
            validation.parse_validation(bad)  # type: ignore[arg-type]


def test_holdout_keeps_two_training_images_per_class() -> None:
    # class sizes 1, 2, 3, 5, 10
    labels = [0] + [1] * 2 + [2] * 3 + [3] * 5 + [4] * 10
    split = validation.holdout_split(labels, {"holdout": 0.2}, seed=1)
    # round(0.2 n), at least 1, at most n - 2: 0, 0, 1, 1, 2
    assert split.held_out == {2: 1, 3: 1, 4: 2}
    assert Counter(labels[i] for i in split.val) == {2: 1, 3: 1, 4: 2}
    assert sorted(split.train + split.val) == list(range(len(labels)))
    assert not set(split.train) & set(split.val)
    per = validation.holdout_split(labels, {"holdout_per_class": 4}, seed=1)
    assert per.held_out == {2: 1, 3: 3, 4: 4}  # capped at n - 2
    again = validation.holdout_split(labels, {"holdout": 0.2}, seed=1)
    assert again == split  # the job's seed decides: a resumed job splits the same way
    assert validation.holdout_split([0, 0, 1, 1], {"holdout": 0.5}).val == []  # too few: nothing held out


def test_validation_accuracy_reported_and_training_unchanged(base, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(train_mod, "VAL_COST_FACTOR", 0)  # a pass at every report
    images, labels = _data(per_class=3)
    split = validation.holdout_split(labels, {"holdout_per_class": 1})
    train_x, train_y = [images[i] for i in split.train], [labels[i] for i in split.train]
    val_x, val_y = [images[i] for i in split.val], [labels[i] for i in split.val]
    hp = {**FAST_SO, "n_iters": 6, "early_stop_loss": 0.0}
    seen: list[Progress] = []
    r = adapt(base, train_x, train_y, CLASSES, method="so", on_progress=seen.append,
              val_images=val_x, val_labels=val_y, **hp)
    plain = adapt(base, train_x, train_y, CLASSES, method="so", **hp)
    assert all(p.val_accuracy is not None and 0 <= p.val_accuracy <= 1 for p in seen)
    assert r.metrics["val_images"] == 2 and r.metrics["train_images"] == 4
    assert r.metrics["val_accuracy"] == 1.0  # the colours are learnable (train accuracy 1.0 as well)
    assert "val_accuracy" not in plain.metrics
    ea, eb = _entries(r.delta), _entries(plain.delta)  # the passes change nothing in the training
    assert ea.keys() == eb.keys() and all(torch.equal(ea[n][1], eb[n][1]) for n in ea)
    with pytest.raises(ValueError, match="validation"):
        adapt(base, train_x, train_y, CLASSES, method="so", val_images=val_x, val_labels=val_y[:1], **hp)


def test_validation_passes_are_spaced_by_their_cost(base, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(train_mod, "VAL_COST_FACTOR", 10**9)  # only the first and the final report
    images, labels = _data(per_class=3)
    split = validation.holdout_split(labels, {"holdout_per_class": 1})
    seen: list[Progress] = []
    adapt(base, [images[i] for i in split.train], [labels[i] for i in split.train], CLASSES, method="so",
          on_progress=seen.append, val_images=[images[i] for i in split.val],
          val_labels=[labels[i] for i in split.val], **{**FAST_SO, "n_iters": 3, "early_stop_loss": 0.0})
    measured = [p.val_accuracy is not None for p in seen]
    assert len(seen) > 2 and measured[0] and measured[-1] and not any(measured[1:-1])


# ---------------------------------------------------------------- which validation runs


def test_resolve_falls_back_to_kfold_when_nothing_can_be_held_out() -> None:
    assert validation.resolve(None, [5, 5]) is None
    assert validation.resolve({"holdout": 0.2}, [3, 1]) == {"holdout": 0.2}  # the class of 3 holds one out
    # classes of at most MIN_TRAIN: k-fold, k = min(DEFAULT_FOLDS, shots), at least 2
    assert validation.resolve({"holdout": 0.2}, [1, 1, 1]) == {"kfold": 2}
    assert validation.resolve({"holdout_per_class": 1}, [2, 2]) == {"kfold": 2}
    assert validation.default_folds([2, 2, 2]) == 2 and validation.default_folds([9, 9]) == 3
    assert validation.default_folds([4, 3]) == min(validation.DEFAULT_FOLDS, 4)  # round(7 / 2) shots
    assert validation.resolve({"kfold": 4}, [2, 2]) == {"kfold": 4}  # asked for: also with enough images
    with pytest.raises(ValueError, match="5-fold.*needs at least 5 images"):
        validation.resolve({"kfold": 5}, [2, 2])
    with pytest.raises(ValueError, match="needs at least 2 images"):
        validation.resolve({"holdout": 0.2}, [1])
    # the worker's view of a dataset that changed since the submit: capped, or nothing to validate
    assert validation.resolve({"kfold": 5}, [2, 2], strict=False) == {"kfold": 4}
    assert validation.resolve({"kfold": 3}, [1], strict=False) is None


@pytest.mark.parametrize("sizes,k", [([1, 2, 3, 5, 10], 3), ([2, 2], 2), ([1, 1, 1, 1, 1], 4), ([7], 7),
                                     ([4, 6], 5)])
def test_kfold_splits_are_stratified_and_hold_each_image_out_once(sizes: list[int], k: int) -> None:
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    labels = labels[::2] + labels[1::2]  # classes interleaved: indices are not grouped by class
    splits = validation.kfold_splits(labels, k, seed=3)
    assert len(splits) == k
    held = [i for s in splits for i in s.val]
    assert sorted(held) == list(range(len(labels)))  # every image held out exactly once
    for s in splits:
        assert s.val and s.train and sorted(s.train + s.val) == list(range(len(labels)))
        assert s.held_out == dict(sorted(Counter(labels[i] for i in s.val).items()))
        for c, n in enumerate(sizes):  # each class spread as evenly as it can be
            assert s.held_out.get(c, 0) in {n // k, -(-n // k)}
    fold_sizes = [len(s.val) for s in splits]
    assert max(fold_sizes) - min(fold_sizes) <= 1
    assert validation.kfold_splits(labels, k, seed=3) == splits  # seeded: a resumed job folds the same
    if any(n >= 2 for n in sizes):
        others = [validation.kfold_splits(labels, k, seed=s) for s in range(4, 12)]
        assert any(o != splits for o in others)  # the seed decides which images go together


def test_kfold_splits_reject_impossible_k() -> None:
    for k in (1, 5, True):
        with pytest.raises(ValueError, match="k-fold"):
            validation.kfold_splits([0, 0, 1, 1], k)  # type: ignore[arg-type]


def test_fold_hparams_take_the_quick_schedule_capped_at_the_jobs_steps() -> None:
    from sparseshot.presets import PRESETS, preset_params

    quick = PRESETS["quick"]["so"]
    job = preset_params("standard", "so", {"density": 0.01, "seed": 4})
    hp = validation.fold_hparams("so", job)
    assert hp["n_iters"] == quick["n_iters"] and hp["lr"] == quick["lr"]
    assert hp["density"] == 0.01 and hp["seed"] == 4 and hp["template"] == job["template"]
    short = validation.fold_hparams("so", {**job, "n_iters": 5})
    assert short["n_iters"] == 5  # never more steps than the job's own training
    plans = validation.fold_plans([2, 2, 2], 2, hp)  # folds train on 3 images: 1 shot each
    assert plans == [(quick["n_iters"] * 1, 3)] * 2


# ---------------------------------------------------------------- the fold runner on the tiny model


def test_holdout_training_reports_per_class_metrics(base) -> None:  # noqa: F811
    images, labels = _data(per_class=3)
    split = validation.holdout_split(labels, {"holdout_per_class": 1}, seed=2)
    r = adapt(base, [images[i] for i in split.train], [labels[i] for i in split.train], CLASSES, method="so",
              val_images=[images[i] for i in split.val], val_labels=[labels[i] for i in split.val],
              **{**FAST_SO, "n_iters": 3})
    v = r.metrics["validation"]
    assert v["mode"] == "holdout" and v["classes"] == CLASSES and v["n_images"] == 2
    assert [sum(row) for row in v["confusion_matrix"]] == [1, 1]  # rows: true classes, one image each
    assert {c: m["support"] for c, m in v["per_class"].items()} == {"red": 1, "blue": 1}
    assert v["accuracy"] == r.metrics["val_accuracy"]
    assert r.val_probs is not None and len(r.val_probs) == 2
    assert all(abs(sum(p) - 1) < 1e-5 for p in r.val_probs)
    right = sum(max(range(2), key=p.__getitem__) == labels[i]
                for p, i in zip(r.val_probs, split.val, strict=True))
    assert r.metrics["val_accuracy"] == right / 2


FOLD_HP = {**FAST_SO, "n_iters": 2, "early_stop_loss": 0.0}


def test_cross_validate_measures_each_fold_on_its_held_out_images(base) -> None:  # noqa: F811
    images, labels = _data(per_class=2)
    seen: list[Progress] = []
    cv = crossval.cross_validate(base, images, labels, CLASSES, "so", folds=2, seed=1,
                                 on_progress=seen.append, steps_after=7, **FOLD_HP)
    splits = validation.kfold_splits(labels, 2, seed=1)
    assert cv.folds == 2 and len(cv.fold_accuracies) == 2
    for split, acc in zip(splits, cv.fold_accuracies, strict=True):  # a fold = training without its images
        alone = adapt(base, [images[i] for i in split.train], [labels[i] for i in split.train], CLASSES,
                      method="so", seed=1, val_images=[images[i] for i in split.val],
                      val_labels=[labels[i] for i in split.val], **FOLD_HP)
        assert acc == alone.metrics["val_accuracy"]
    assert cv.accuracy == sum(cv.fold_accuracies) / 2
    m = cv.report.confusion
    assert sum(map(sum, m)) == len(images) and [sum(row) for row in m] == [2, 2]  # each image once
    # progress: one rising sequence over both folds, the total counting the training after them
    per_fold = 2 * 1  # n_iters x 1 shot (2 training images of 2 classes)
    assert cv.steps == 2 * per_fold
    assert [p.step for p in seen] == list(range(1, cv.steps + 1))
    assert all(p.total_steps == cv.steps + 7 for p in seen)
    assert all(p.eta_seconds >= 0 and p.val_accuracy is None for p in seen)
    assert seen[0].eta_seconds > 0  # the second fold and the training after are still ahead
    out = cv.metrics(CLASSES)
    assert out["cv_accuracy"] == cv.accuracy and out["cv_folds"] == 2 and out["cv_steps"] == cv.steps
    v = out["validation"]
    assert v["mode"] == "kfold" and v["fold_accuracies"] == cv.fold_accuracies and v["n_images"] == 4
    assert v["hparams"] == {"n_iters": 2, "lr": FAST_SO["lr"]} and v["preset"] == "quick"
    assert set(v["per_class"]) == set(CLASSES) and v["confusion_matrix"] == m
    again = crossval.cross_validate(base, images, labels, CLASSES, "so", folds=2, seed=1, **FOLD_HP)
    assert again.fold_accuracies == cv.fold_accuracies and again.report == cv.report  # deterministic


def test_cross_validate_stops_when_asked(base) -> None:  # noqa: F811
    images, labels = _data(per_class=2)
    seen: list[Progress] = []
    with pytest.raises(Cancelled):
        crossval.cross_validate(base, images, labels, CLASSES, "lora", folds=2, on_progress=seen.append,
                                should_stop=lambda: len(seen) >= 3, **{**FAST_LORA, "n_iters": 2})
    assert [p.step for p in seen] == [1, 2, 3]  # stopped in the second fold, before its second step


def test_shifted_progress_counts_on_from_the_folds() -> None:
    got: list[Progress] = []
    report = crossval.shifted(got.append, 10)
    assert report is not None
    report(Progress(step=2, total_steps=5, loss=1.0, train_accuracy=0.5, eta_seconds=3.0))
    assert (got[0].step, got[0].total_steps, got[0].eta_seconds) == (12, 15, 3.0)
    assert crossval.shifted(got.append, 0) == got.append and crossval.shifted(None, 3) is None
