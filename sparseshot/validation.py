"""Validation split of a few-shot training set: images held out of training per class.

A job's `validation` option (the one definition of it; the service validates requests with
`parse_validation` and the worker splits with `holdout_split`):

- ``{"holdout": f}`` with 0 < f <= 0.5: round(f * n) images of a class of n (at least 1);
- ``{"holdout_per_class": k}`` with k >= 1: k images of each class.

Either way a class keeps at least MIN_TRAIN images for training: a class of n holds out at most
n - MIN_TRAIN (none when n <= MIN_TRAIN), so small classes train on everything and are simply
not validated. Which images are held out is drawn per class with `seed` (the job's seed), so a
resumed job splits the same way. The held-out images are never trained on; the training reports
the accuracy on them (`sparseshot.adapt(..., val_images=, val_labels=)`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MIN_TRAIN = 2  # training images a class always keeps
MAX_FRACTION = 0.5


@dataclass(frozen=True)
class Split:
    train: list[int]  # indices into the examples, in their order
    val: list[int]
    held_out: dict[int, int]  # class index -> images held out (classes with 0 left out)


def parse_validation(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The normalised option, None for none; ValueError naming what is wrong."""
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise ValueError("validation must be an object: {\"holdout\": 0.2} or {\"holdout_per_class\": 1}")
    keys = set(value)
    if keys - {"holdout", "holdout_per_class"} or len(keys) != 1:
        raise ValueError('validation takes exactly one of "holdout" (a fraction) or "holdout_per_class"')
    if "holdout" in value:
        f = value["holdout"]
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= MAX_FRACTION:
            raise ValueError(f"validation.holdout must be a number in (0, {MAX_FRACTION}], got {f!r}")
        return {"holdout": float(f)}
    k = value["holdout_per_class"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"validation.holdout_per_class must be an integer >= 1, got {k!r}")
    return {"holdout_per_class": k}


def held_out_count(n: int, option: Mapping[str, Any]) -> int:
    """Images held out of a class of n under the (normalised) option."""
    room = max(0, n - MIN_TRAIN)
    if "holdout_per_class" in option:
        return min(int(option["holdout_per_class"]), room)
    return min(max(1, round(option["holdout"] * n)), room)


def holdout_split(labels: Sequence[int], option: Mapping[str, Any], seed: int = 0) -> Split:
    """Per class, `held_out_count` of its examples drawn with `seed` go to validation."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(seed)
    val: set[int] = set()
    held: dict[int, int] = {}
    for c in sorted(by_class):
        k = held_out_count(len(by_class[c]), option)
        if k:
            val.update(rng.sample(by_class[c], k))
            held[c] = k
    return Split(train=[i for i in range(len(labels)) if i not in val], val=sorted(val), held_out=held)
