"""sparseshot.metrics on small prediction sets whose figures can be checked by hand."""

from __future__ import annotations

import pytest

from sparseshot import metrics

# 3 classes, 7 examples: (true, predicted)
PAIRS = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 0)]


def test_confusion_matrix_rows_true_columns_predicted() -> None:
    m = metrics.confusion_matrix([t for t, _ in PAIRS], [p for _, p in PAIRS], 3)
    assert m == [[2, 1, 0],
                 [0, 1, 1],
                 [1, 0, 1]]
    assert metrics.accuracy(m) == pytest.approx(4 / 7)


def test_precision_recall_f1_support() -> None:
    m = metrics.confusion_matrix([t for t, _ in PAIRS], [p for _, p in PAIRS], 3)
    r = metrics.per_class(m)
    # class 0: predicted 3 times, 2 right; 3 true examples, 2 found
    assert (r[0].precision, r[0].recall, r[0].support) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert r[0].f1 == pytest.approx(2 / 3)
    # class 1: predicted twice, 1 right; 2 true, 1 found
    assert (r[1].precision, r[1].recall, r[1].f1, r[1].support) == (0.5, 0.5, 0.5, 2)
    # class 2: predicted twice, 1 right; 2 true, 1 found
    assert (r[2].precision, r[2].recall, r[2].support) == (0.5, 0.5, 2)


def test_undefined_ratios_are_zero() -> None:
    m = metrics.confusion_matrix([0, 0, 1], [0, 0, 0], 3)  # class 1 never predicted, class 2 absent
    r = metrics.per_class(m)
    assert (r[1].precision, r[1].recall, r[1].f1) == (0.0, 0.0, 0.0)
    assert (r[2].precision, r[2].recall, r[2].f1, r[2].support) == (0.0, 0.0, 0.0, 0)
    assert r[0].precision == pytest.approx(2 / 3) and r[0].recall == 1.0 and r[0].f1 == pytest.approx(0.8)
    assert metrics.accuracy([[0, 0], [0, 0]]) == 0.0


def test_best_threshold_maximises_f1_and_prefers_the_higher_cut() -> None:
    # positives at 0.9 and 0.4, negatives at 0.6 and 0.1
    scores, pos = [0.9, 0.6, 0.4, 0.1], [True, False, True, False]
    # t=0.9: P=1, R=1/2, F1=2/3; t=0.4: P=2/3, R=1, F1=0.8
    assert metrics.best_threshold(scores, pos) == (0.4, pytest.approx(0.8))
    # t=0.9: F1 2/3; t=0.5: P=2/4, R=1, F1=2/3 -> a tie: the higher cut
    scores, pos = [0.9, 0.8, 0.7, 0.5], [True, False, False, True]
    assert metrics.best_threshold(scores, pos) == (0.9, pytest.approx(2 / 3))
    assert metrics.best_threshold([0.3, 0.2], [False, False]) == (None, 0.0)


def test_best_threshold_accepts_equal_scores_together() -> None:
    # a negative with the positive's score is accepted with it: P=1/2 at t=0.5
    t, f1 = metrics.best_threshold([0.5, 0.5, 0.2], [True, False, False])
    assert t == 0.5 and f1 == pytest.approx(2 / 3)


def test_evaluate_takes_the_top_score_per_example() -> None:
    probs = [[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    report = metrics.evaluate(probs, [0, 1, 1, 2], 3)
    assert report.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert report.accuracy == 0.75
    # class 1's scores: 0.2 (-), 0.4 (+), 0.8 (+), 0.3 (-): t=0.4 catches both with no negative
    assert report.thresholds == [0.7, 0.4, 0.4]
    assert [c.support for c in report.classes] == [1, 2, 1]
