"""Classification metrics on a labelled prediction set (pure Python: used by the service's
evaluations and by training's validation split).

Conventions (the same as scikit-learn's with ``zero_division=0``):
- precision of a class never predicted, recall of a class with no true example, and F1 where
  precision + recall = 0 are 0.0;
- the confusion matrix has rows = true class, columns = predicted class, both in `classes` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int  # true examples of the class


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """(n_classes, n_classes) counts: m[t][p] = examples of true class t predicted as p."""
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        m[t][p] += 1
    return m


def per_class(matrix: Sequence[Sequence[int]]) -> list[ClassReport]:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    n = len(matrix)
    out = []
    for c in range(n):
        tp = matrix[c][c]
        predicted = sum(matrix[t][c] for t in range(n))
        support = sum(matrix[c])
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        out.append(ClassReport(precision=p, recall=r, f1=_ratio(2 * p * r, p + r), support=support))
    return out


def accuracy(matrix: Sequence[Sequence[int]]) -> float:
    """Share of examples on the diagonal (0.0 for an empty matrix)."""
    total = sum(sum(row) for row in matrix)
    return _ratio(sum(matrix[c][c] for c in range(len(matrix))), total)


def best_threshold(scores: Sequence[float], positive: Sequence[bool]) -> tuple[float | None, float]:
    """The score threshold t maximising the F1 of the one-vs-rest rule "class iff score >= t".

    Candidates are the scores of the positive examples (any other cut keeps the same positives
    and at least as many negatives). Ties go to the highest t (the fewest accepted negatives).
    Returns (t, its F1); (None, 0.0) when there is no positive example.
    """
    n_pos = sum(1 for y in positive if y)
    pairs = sorted(zip(scores, positive, strict=True), key=lambda sy: -sy[0])  # best first
    best: tuple[float | None, float] = (None, 0.0)
    tp = fp = 0
    group_pos = False  # a positive among the examples of the current score
    for i, (s, y) in enumerate(pairs):  # sweep t down through the scores: O(n log n)
        tp, fp, group_pos = tp + int(y), fp + int(not y), group_pos or y
        if i + 1 < len(pairs) and pairs[i + 1][0] == s:
            continue  # all examples of one score are accepted together
        if not group_pos:
            continue
        group_pos = False
        p, r = _ratio(tp, tp + fp), _ratio(tp, n_pos)
        f1 = _ratio(2 * p * r, p + r)
        if best[0] is None or f1 > best[1]:  # descending t: ties keep the higher t
            best = (s, f1)
    return best


@dataclass(frozen=True)
class Report:
    accuracy: float
    confusion: list[list[int]]  # rows true, columns predicted
    classes: list[ClassReport]
    thresholds: list[float | None]  # per class: best_threshold of its probability


def evaluate(probs: Sequence[Sequence[float]], y_true: Sequence[int], n_classes: int) -> Report:
    """Metrics of top-1 predictions from per-example class probabilities.

    probs: (n, n_classes) scores in class order; y_true: (n,) true class indices. The predicted
    class is the highest score (the first on ties, like argmax)."""
    y_pred = [max(range(n_classes), key=row.__getitem__) for row in probs]
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    thresholds = [best_threshold([row[c] for row in probs], [t == c for t in y_true])[0]
                  for c in range(n_classes)]
    return Report(accuracy=accuracy(matrix), confusion=matrix, classes=per_class(matrix),
                  thresholds=thresholds)


def report_json(report: Report, classes: Sequence[str]) -> dict[str, Any]:
    """The JSON form of a report (what evaluations store and a job's validation reports):
    accuracy, n_images, classes, per_class (label -> precision, recall, f1, support),
    confusion_matrix (rows true, columns predicted, in `classes` order), suggested_thresholds."""
    if len(classes) != len(report.classes):
        raise ValueError(f"{len(classes)} class names for a report of {len(report.classes)} classes")
    return {
        "accuracy": report.accuracy,
        "n_images": sum(sum(row) for row in report.confusion),
        "classes": list(classes),
        "per_class": {
            c: {"precision": r.precision, "recall": r.recall, "f1": r.f1, "support": r.support}
            for c, r in zip(classes, report.classes, strict=True)
        },
        "confusion_matrix": report.confusion,
        "suggested_thresholds": dict(zip(classes, report.thresholds, strict=True)),
    }
