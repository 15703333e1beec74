"""The validation split (sparseshot.validation) and training with held-out images."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sparseshot import validation
from sparseshot.recipe import Progress, adapt
from tests.recipe.test_adapt import CLASSES, FAST_SO, _data, _entries, base, train_mod  # noqa: F401


@pytest.fixture(autouse=True)
def _every_step_progress(monkeypatch):
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)


def test_parse_validation() -> None:
    assert validation.parse_validation(None) is None and validation.parse_validation({}) is None
    assert validation.parse_validation({"holdout": 0.2}) == {"holdout": 0.2}
    assert validation.parse_validation({"holdout_per_class": 2}) == {"holdout_per_class": 2}
    for bad in ({"holdout": 0}, {"holdout": 0.6}, {"holdout": True}, {"holdout": "0.2"},
                {"holdout_per_class": 0}, {"holdout_per_class": 1.5},
                {"holdout": 0.2, "holdout_per_class": 1}, {"kfold": 3}, [0.2]):
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
