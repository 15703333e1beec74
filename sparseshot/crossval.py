"""k-fold cross-validation of a few-shot training: the folds of `sparseshot.validation.kfold_splits`,
each trained with `sparseshot.recipe.adapt` and measured on the images it held out, the figures by
`sparseshot.metrics`.

- Accuracy: the mean of the folds' accuracies (`fold_accuracies`: each fold's held-out images
  predicted by the model trained without them).
- Per class (precision, recall, F1, support), the confusion matrix and the suggested thresholds:
  pooled over the folds, every image predicted once, by the fold that held it out
  (`pooled_accuracy` is their accuracy; it differs from the mean only by the folds' sizes).
- Progress: one sequence of steps over every fold (and `steps_after`, the training that follows),
  so a caller's progress bar and ETA cover the whole run; `should_stop` is checked at every step
  of every fold (`Cancelled`).

The folds use the hyperparameters they are given; a job passes `validation.fold_hparams` (the
quick preset's schedule). Nothing is checkpointed: a resumed job runs its folds again (seeded,
they give the same figures).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sparseshot.metrics import Report, evaluate, report_json
from sparseshot.recipe import Progress, adapt, planned_steps, validate_hparams
from sparseshot.validation import FOLD_PRESET, kfold_splits

if TYPE_CHECKING:  # base pulls in open_clip, which cross-validation never imports itself
    from sparseshot.base import BaseModel

__all__ = ["CrossValidation", "cross_validate", "planned", "shifted"]

OnProgress = Callable[[Progress], None]


@dataclass(frozen=True)
class CrossValidation:
    folds: int
    fold_accuracies: list[float]
    report: Report  # pooled over the folds: every image predicted once
    steps: int  # training steps run over all folds
    seconds: float
    hparams: dict[str, Any] = field(default_factory=dict)  # of the fold trainings

    @property
    def accuracy(self) -> float:
        """The cross-validated accuracy: the mean of the folds' accuracies."""
        return sum(self.fold_accuracies) / len(self.fold_accuracies)

    def metrics(self, classes: Sequence[str]) -> dict[str, Any]:
        """What a model's metrics report of it: flat cv_* figures and the `validation` report."""
        figures = report_json(self.report, classes)
        return {
            "cv_accuracy": self.accuracy,
            "cv_folds": self.folds,
            "cv_steps": self.steps,
            "validation": {
                "mode": "kfold", **figures, "accuracy": self.accuracy, "pooled_accuracy": figures["accuracy"],
                "folds": self.folds, "fold_accuracies": list(self.fold_accuracies), "steps": self.steps,
                "seconds": self.seconds, "preset": FOLD_PRESET,
                "hparams": {k: self.hparams[k] for k in ("n_iters", "lr") if k in self.hparams},
            },
        }


def planned(method: str, hparams: Mapping[str, Any], n_images: int, n_classes: int) -> int:
    """Planned steps of a training of `method` (defaults merged into `hparams`) on n_images."""
    return planned_steps(validate_hparams(method, dict(hparams)), n_images, n_classes)[1]


class _Steps:
    """Maps each fold's Progress onto one sequence over all folds and the training after them."""

    def __init__(self, on_progress: OnProgress | None, planned_per_fold: list[int], after: int) -> None:
        self.on_progress, self.planned, self.after = on_progress, planned_per_fold, after
        self.done = 0  # steps of the finished folds
        self.t0 = time.perf_counter()

    def fold(self, i: int) -> OnProgress | None:
        if self.on_progress is None:
            return None
        later = sum(self.planned[i + 1:]) + self.after
        report = self.on_progress

        def on_progress(p: Progress) -> None:
            step = self.done + p.step
            elapsed = time.perf_counter() - self.t0
            eta = p.eta_seconds + later * elapsed / max(1, step)  # this fold's ETA + the rest at this rate
            report(dataclasses.replace(p, step=step, total_steps=self.done + p.total_steps + later,
                                       eta_seconds=eta, elapsed_seconds=elapsed, val_accuracy=None))

        return on_progress


def cross_validate(
    base: BaseModel,
    images: Sequence[Any],
    labels: Sequence[int],
    classes: Sequence[str],
    method: str = "so",
    *,
    folds: int,
    seed: int = 0,
    on_progress: OnProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    steps_after: int = 0,
    **hparams: Any,
) -> CrossValidation:
    """Train and measure each of `folds` stratified folds (seeded by `seed`) with `hparams`.

    steps_after: planned steps of a training that follows (added to the progress' total_steps).
    Raises ValueError on bad folds or inputs and `sparseshot.Cancelled` when should_stop() is True."""
    splits = kfold_splits(labels, folds, seed)
    plans = [planned(method, {**hparams, "seed": seed}, len(s.train), len(classes)) for s in splits]
    steps = _Steps(on_progress, plans, steps_after)
    probs: list[list[float]] = [[] for _ in labels]
    accuracies = []
    for i, split in enumerate(splits):
        r = adapt(base, [images[j] for j in split.train], [labels[j] for j in split.train], classes, method,
                  seed=seed, on_progress=steps.fold(i), should_stop=should_stop,
                  val_images=[images[j] for j in split.val], val_labels=[labels[j] for j in split.val],
                  **hparams)
        steps.done += int(r.metrics["steps"])
        accuracies.append(float(r.metrics["val_accuracy"]))
        for j, row in zip(split.val, r.val_probs or [], strict=True):
            probs[j] = row
    report = evaluate(probs, [int(y) for y in labels], len(classes))
    return CrossValidation(folds=folds, fold_accuracies=accuracies, report=report, steps=steps.done,
                           seconds=time.perf_counter() - steps.t0, hparams=dict(hparams))


def shifted(on_progress: OnProgress | None, steps: int) -> OnProgress | None:
    """on_progress of a training that follows `steps` steps already run (the folds): its step and
    total_steps counted on from there, its ETA its own (nothing runs after it)."""
    if on_progress is None or steps == 0:
        return on_progress
    report = on_progress

    def shifted_progress(p: Progress) -> None:
        report(dataclasses.replace(p, step=steps + p.step, total_steps=steps + p.total_steps))

    return shifted_progress
