"""Validation of a few-shot training: images held out per class, or k-fold cross-validation.

A job's `validation` option (the one definition of it; the service checks requests with
`parse_validation` and `resolve`, the worker splits with `holdout_split` / `kfold_splits`):

- ``{"holdout": f}`` with 0 < f <= 0.5: round(f * n) images of a class of n (at least 1);
- ``{"holdout_per_class": k}`` with k >= 1: k images of each class;
- ``{"kfold": k}`` with 2 <= k <= MAX_FOLDS: k-fold cross-validation (`sparseshot.crossval`).

Held out: a class keeps at least MIN_TRAIN images for training: a class of n holds out at most
n - MIN_TRAIN (none when n <= MIN_TRAIN), so small classes train on everything and are simply
not validated. Which images are held out is drawn per class with `seed` (the job's seed), so a
resumed job splits the same way. The held-out images are never trained on; the training reports
the metrics on them (`sparseshot.adapt(..., val_images=, val_labels=)`).

Too few images to hold any out (every class has at most MIN_TRAIN): `resolve` turns a held-out
option into ``{"kfold": default_folds(...)}`` (at most DEFAULT_FOLDS). k-fold: the images are dealt
into k stratified, seeded folds (`kfold_splits`: every image held out exactly once, each class
spread as evenly as it can be); each fold trains on the other k - 1 with the quick preset's
schedule (`fold_hparams`) and is measured on its own; the model itself then trains on all images.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sparseshot.presets import PRESETS

MIN_TRAIN = 2  # training images a class always keeps
MAX_FRACTION = 0.5
DEFAULT_FOLDS = 3  # folds when a held-out option falls back to k-fold (fewer with fewer shots)
MAX_FOLDS = 10
FOLD_PRESET = "quick"  # the preset whose schedule the fold trainings use
USAGE = 'validation must be an object: {"holdout": 0.2}, {"holdout_per_class": 1} or {"kfold": 3}'


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
        raise ValueError(USAGE)
    keys = set(value)
    if keys - {"holdout", "holdout_per_class", "kfold"} or len(keys) != 1:
        raise ValueError('validation takes exactly one of "holdout" (a fraction), "holdout_per_class" '
                         'or "kfold" (a number of folds)')
    if "holdout" in value:
        f = value["holdout"]
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= MAX_FRACTION:
            raise ValueError(f"validation.holdout must be a number in (0, {MAX_FRACTION}], got {f!r}")
        return {"holdout": float(f)}
    if "holdout_per_class" in value:
        return {"holdout_per_class": _integer(value, "holdout_per_class", 1, None)}
    return {"kfold": _integer(value, "kfold", 2, MAX_FOLDS)}


def _integer(value: Mapping[str, Any], name: str, low: int, high: int | None) -> int:
    k = value[name]
    if isinstance(k, bool) or not isinstance(k, int) or k < low or (high is not None and k > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"validation.{name} must be {bound}, got {k!r}")
    return k


def validation_json_schema() -> dict[str, Any]:
    """The JSON schema of the option or null (for the API's documentation)."""
    def one(title: str, name: str, kind: dict[str, Any]) -> dict[str, Any]:
        return {"title": title, "type": "object", "required": [name], "additionalProperties": False,
                "properties": {name: kind}}

    return {"anyOf": [
        one("held out: a fraction of each class", "holdout",
            {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_FRACTION}),
        one("held out: images per class", "holdout_per_class", {"type": "integer", "minimum": 1}),
        one("k-fold cross-validation", "kfold", {"type": "integer", "minimum": 2, "maximum": MAX_FOLDS}),
        {"type": "null"},
    ]}


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


def default_folds(counts: Sequence[int]) -> int:
    """Folds for a dataset of these class sizes: min(DEFAULT_FOLDS, shots), at least 2, at most
    the images (shots = round(images / classes), as the recipe counts them)."""
    n = sum(counts)
    shots = max(1, round(n / max(1, len(counts))))
    return min(max(2, min(DEFAULT_FOLDS, shots)), n)


def resolve(option: Mapping[str, Any] | None, counts: Sequence[int], *, strict: bool = True
            ) -> dict[str, Any] | None:
    """What a (normalised) option runs on a dataset of these class sizes: itself, or
    ``{"kfold": default_folds(counts)}`` for a held-out option no class can hold an image out of.

    k-fold needs 2 images, and k of them: strict (the API), ValueError otherwise; not strict (the
    worker, the dataset changed since the submit), k is capped at the images and a dataset of
    fewer than 2 is not validated (None)."""
    if option is None:
        return None
    if "kfold" not in option and any(held_out_count(c, option) for c in counts):
        return dict(option)
    n = sum(counts)
    k = int(option["kfold"]) if "kfold" in option else default_folds(counts)
    if n >= max(2, k) or (n >= 2 and not strict):
        return {"kfold": min(k, n)}
    if not strict:
        return None
    raise ValueError(f"validation: {max(2, k)}-fold cross-validation needs at least {max(2, k)} images, "
                     f"the dataset has {n}")


def kfold_splits(labels: Sequence[int], k: int, seed: int = 0) -> list[Split]:
    """k stratified folds: fold i holds out `val`, trains on `train` (the rest).

    Each class's images, shuffled with `seed`, are dealt round-robin into the folds, the deal
    continuing from one class to the next, so every image is held out exactly once, a class of n
    has floor(n / k) or ceil(n / k) images in each fold and fold sizes differ by at most one; a
    class with fewer than k images is held out in only some folds (and one with a single image
    is trained on by every fold but the one that measures it)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= len(labels):
        raise ValueError(f"k-fold needs 2 <= k <= {len(labels)} (the images), got {k!r}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(seed)
    fold_of = [0] * len(labels)
    dealt = 0
    for c in sorted(by_class):
        members = list(by_class[c])
        rng.shuffle(members)
        for j, i in enumerate(members):
            fold_of[i] = (dealt + j) % k
        dealt += len(members)
    splits = []
    for f in range(k):
        val = [i for i in range(len(labels)) if fold_of[i] == f]
        held: dict[int, int] = {}
        for i in val:
            held[int(labels[i])] = held.get(int(labels[i]), 0) + 1
        splits.append(Split(train=[i for i in range(len(labels)) if fold_of[i] != f], val=val,
                            held_out=dict(sorted(held.items()))))
    return splits


def fold_hparams(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters of a fold's training: the job's, with the FOLD_PRESET's values on top
    (its schedule: n_iters and lr), n_iters never above the job's own."""
    quick = PRESETS[FOLD_PRESET].get(method, {})
    hp = {**dict(params), **quick}
    if "n_iters" in params and "n_iters" in quick:
        hp["n_iters"] = min(int(params["n_iters"]), int(quick["n_iters"]))
    return hp


def fold_plans(counts: Sequence[int], k: int, hparams: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(planned steps, batch) of each fold's training (fold sizes depend on the counts only)."""
    from sparseshot.recipe import planned_steps  # torch: only where a job's steps are planned

    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return [planned_steps(hparams, len(s.train), len(counts))[1:] for s in kfold_splits(labels, k)]
