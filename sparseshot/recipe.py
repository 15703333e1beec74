"""Few-shot adaptation of a CLIP base model: SO (the paper's recipe), LoRA (CLIP-LoRA) and zero-shot.

`adapt(base, images, labels, classes, method=...)` trains a private copy of ``base.model`` (the
shared base is never modified) and returns an `AdaptResult` whose delta holds the changed weights
(sparse entries for SO, low-rank blocks for LoRA, nothing for zero-shot) and the class text
embeddings of the adapted text encoder, so that serving only runs the vision tower.

Where things live: the hyperparameters (typed configs, defaults, ranges, docs) in
sparseshot.configs; prompts and text embeddings in sparseshot.prompts; the training loop and the
delta budget in sparseshot.train; checkpoint files in sparseshot.checkpoint. This module checks the
inputs and dispatches.

Shots = round(N / number of classes), at least 1 (the mean images per class: a user's classes need
not be balanced, and the mean keeps one small class from shrinking the schedule); training runs
``n_iters · shots`` steps. Randomness (data order, augmentation, dropout, SO supports) comes from
`seed` only: the loop runs inside ``torch.random.fork_rng`` with the global RNG seeded, so CPU runs
are bit-for-bit reproducible and callers' RNG state is untouched. With ``checkpoint=path`` the
training state is saved atomically every `CHECKPOINT_EVERY_STEPS` steps or `CHECKPOINT_EVERY_S`
seconds (and on cancellation), and an interrupted run with the same inputs resumes from it and ends
with the same result as an uninterrupted one; the file is removed when training completes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sparseshot.checkpoint import CHECKPOINT_EVERY_S, CHECKPOINT_EVERY_STEPS
from sparseshot.configs import METHODS, config_for, hparam_defaults, validate_hparams
from sparseshot.delta import CLASS_EMBEDDINGS, SparseDelta
from sparseshot.prompts import DEFAULT_TEMPLATE, check_class_name, class_text_embeddings
from sparseshot.train import (
    FINAL_LR,
    PROGRESS_EVERY_S,
    SO_WEIGHTS,
    AdaptResult,
    Cancelled,
    Progress,
    Run,
    planned_steps,
    result_meta,
    trainable_weights,
)

if TYPE_CHECKING:  # base pulls in open_clip, which adapting never imports itself
    from sparseshot.base import BaseModel

__all__ = [
    "CHECKPOINT_EVERY_S",
    "CHECKPOINT_EVERY_STEPS",
    "DEFAULT_TEMPLATE",
    "FINAL_LR",
    "METHODS",
    "PROGRESS_EVERY_S",
    "SO_WEIGHTS",
    "AdaptResult",
    "Cancelled",
    "Progress",
    "adapt",
    "adapt_budgets",
    "hparam_defaults",
    "planned_steps",
    "trainable_weights",
    "validate_hparams",
]


def _check_inputs(images: Sequence[Any], labels: Sequence[int], classes: Sequence[str], method: str) -> None:
    if not classes:
        raise ValueError("classes must not be empty")
    for c in classes:
        check_class_name(c)
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    bad = [y for y in labels if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(classes)]
    if bad:
        raise ValueError(f"labels must be integers in [0, {len(classes)}), got {bad[:5]}")
    if method != "zeroshot" and not images:
        raise ValueError(f"method {method!r} needs at least one training image")


def _checked(base: BaseModel, images: Sequence[Any], labels: Sequence[int], classes: Sequence[str],
             method: str, seed: int, hparams: dict[str, Any]) -> dict[str, Any]:
    """The validated hyperparameters (seed included for the training methods), inputs checked."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "zeroshot":
        hparams = {**hparams, "seed": seed}
    config = config_for(method, hparams)
    config.check_against(base)  # block indices against the loaded model's depth
    _check_inputs(images, labels, classes, method)
    return config.to_params()


def adapt(
    base: BaseModel,
    images: Sequence[Any],
    labels: Sequence[int],
    classes: Sequence[str],
    method: str = "so",
    *,
    seed: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    val_images: Sequence[Any] = (),
    val_labels: Sequence[int] = (),
    **hparams: Any,
) -> AdaptResult:
    """Adapt `base` (a sparseshot.BaseModel) to `classes` from labelled images.

    images: PIL images (converted to RGB); labels: indices into classes; method: "so" | "lora" |
    "zeroshot" (no training, images may be empty). hparams: see `hparam_defaults(method)` and
    sparseshot.configs. Raises ValueError on bad inputs or hyperparameters and `Cancelled` when
    should_stop() is True. val_images / val_labels: held-out examples (see sparseshot.validation),
    never trained on; their accuracy is reported as Progress.val_accuracy and metrics["val_accuracy"].
    """
    hp = _checked(base, images, labels, classes, method, seed, hparams)
    if len(val_images) != len(val_labels):
        raise ValueError(f"{len(val_images)} validation images but {len(val_labels)} labels")
    if val_labels:
        _check_inputs(val_images, val_labels, classes, method)
    if method == "zeroshot":
        return _zeroshot(base, classes, hp)
    run = Run(base, list(images), [int(y) for y in labels], list(classes), method, hp,
              on_progress, should_stop, checkpoint, val=(list(val_images), [int(y) for y in val_labels]))
    return run.execute()


def adapt_budgets(
    base: BaseModel,
    images: Sequence[Any],
    labels: Sequence[int],
    classes: Sequence[str],
    budgets: Sequence[float],
    *,
    seed: int = 0,
    **hparams: Any,
) -> dict[float, AdaptResult]:
    """SO results for several `delta_budget` values, the main training shared among them.

    result[b] equals ``adapt(..., method="so", seed=seed, delta_budget=b, **hparams)`` (tested):
    the main phase does not depend on the budget; only the prune-and-refine phase is run per budget.
    """
    if "delta_budget" in hparams:
        raise ValueError("pass the budgets as `budgets`, not delta_budget")
    hps = [_checked(base, images, labels, classes, "so", seed, {**hparams, "delta_budget": b})
           for b in budgets]
    run = Run(base, list(images), [int(y) for y in labels], list(classes), "so", hps[0])
    return run.execute_budgets([hp["delta_budget"] for hp in hps])


def _zeroshot(base: BaseModel, classes: Sequence[str], hp: dict[str, Any]) -> AdaptResult:
    t0 = time.perf_counter()
    with base.lock:
        emb = class_text_embeddings(base.model, base.tokenizer, classes, hp["template"], base.device).cpu()
    delta = SparseDelta.empty(result_meta(base, classes, "zeroshot", hp))
    delta.extras[CLASS_EMBEDDINGS] = emb
    metrics = {"steps": 0, "total_steps": 0, "final_loss": None, "train_accuracy": None,
               "train_seconds": time.perf_counter() - t0}
    return AdaptResult(delta, emb, metrics, "zeroshot", hp)
