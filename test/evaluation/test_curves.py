"""Tests for dinomix_ros.evaluation.curves: precision/recall of the best match, thresholds and operating points.

References are brute-force loops over the thresholds, on seeded data, plus hand-checked small cases with ties.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinomix_ros.evaluation.curves import PRCurve, precision_recall_curve
from dinomix_ros.evaluation.inputs import EvaluationError

# ----------------------------------------------------------------------------------------------------- PR curve


def _tied_curve() -> PRCurve:
    scores = np.array([0.5, 0.8, 0.9, 0.7, 0.8])
    correct = np.array([False, False, True, True, True])
    has_positive = np.array([False, True, True, True, True])
    return precision_recall_curve(scores, correct, has_positive)


def test_pr_curve_hand_checked_with_ties() -> None:
    curve = _tied_curve()
    # Sorted: 0.9 T | 0.8 F, 0.8 T (tied: accepted together) | 0.7 T | 0.5 F (no positive); 4 queries have one.
    np.testing.assert_array_equal(curve.thresholds, [0.9, 0.8, 0.7, 0.5])
    np.testing.assert_array_equal(curve.accepted, [1, 3, 4, 5])
    np.testing.assert_array_equal(curve.true_positives, [1, 2, 3, 3])
    np.testing.assert_allclose(curve.precision, [1.0, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(curve.recall, [1 / 4, 2 / 4, 3 / 4, 3 / 4])
    assert (curve.num_queries, curve.num_positives) == (5, 4)
    assert curve.average_precision == pytest.approx(0.25 * 1.0 + 0.25 * 2 / 3 + 0.25 * 3 / 4)


def test_pr_curve_threshold_for_precision_and_operating_points() -> None:
    curve = _tied_curve()
    assert curve.threshold_for_precision(1.0) == 0.9
    assert curve.threshold_for_precision(0.75) == 0.7  # lowest threshold reaching 75 %: the most recall
    assert curve.threshold_for_precision(0.6) == 0.5
    assert curve.recall_at_precision(0.75) == pytest.approx(0.75)
    assert curve.recall_at_precision(1.0) == pytest.approx(0.25)

    at = curve.operating_point(0.8)
    assert (at.accepted, at.true_positives, at.false_positives) == (3, 2, 1)
    assert curve.operating_point(0.85).accepted == 1  # between two scores: same as the higher one
    empty = curve.operating_point(0.95)
    assert (empty.accepted, empty.precision, empty.recall, empty.f1) == (0, 1.0, 0.0, 0.0)
    assert curve.operating_point(-1.0).accepted == 5

    best = curve.max_f1()
    assert best.threshold == 0.7 and best.f1 == pytest.approx(0.75)


def test_pr_curve_unreachable_precision_is_none() -> None:
    curve = precision_recall_curve([0.9, 0.5, 0.4], [False, True, False], [True, True, True])
    assert curve.threshold_for_precision(0.6) is None
    assert curve.recall_at_precision(0.6) == 0.0
    assert curve.threshold_for_precision(0.5) == 0.5


def test_pr_curve_perfect_ranking_has_ap_one(rng: np.random.Generator) -> None:
    scores = rng.random(200)
    correct = scores > 0.4
    curve = precision_recall_curve(scores, correct, correct)
    assert curve.average_precision == pytest.approx(1.0)
    assert curve.threshold_for_precision(1.0) == pytest.approx(scores[correct].min())
    assert curve.recall_at_precision(1.0) == 1.0
    # One query with a positive but a wrong best match caps recall (and AP) below 1.
    has_positive = correct.copy()
    has_positive[np.flatnonzero(~correct)[0]] = True
    assert precision_recall_curve(scores, correct, has_positive).average_precision < 1.0


def test_pr_curve_matches_brute_force_thresholds(rng: np.random.Generator) -> None:
    scores = np.round(rng.random(500), 1)  # eleven distinct values: heavy ties
    has_positive = rng.random(500) < 0.7
    correct = has_positive & (rng.random(500) < scores)
    curve = precision_recall_curve(scores, correct, has_positive)
    assert len(curve.thresholds) == len(np.unique(scores))
    for t, p, r in zip(curve.thresholds, curve.precision, curve.recall):
        accepted = scores >= t
        assert p == pytest.approx((correct & accepted).sum() / accepted.sum())
        assert r == pytest.approx((correct & accepted).sum() / has_positive.sum())
    for target in (0.5, 0.6, 0.7, 0.8):
        t = curve.threshold_for_precision(target)
        feasible = [u for u in np.unique(scores) if (correct & (scores >= u)).sum() / (scores >= u).sum() >= target]
        assert t == (min(feasible) if feasible else None)


def test_pr_curve_to_dict_is_json() -> None:
    data = json.loads(json.dumps(_tied_curve().to_dict(), allow_nan=False))
    assert data["thresholds"] == [0.9, 0.8, 0.7, 0.5]
    assert data["max_f1"]["threshold"] == 0.7
    no_positive = precision_recall_curve([0.3, 0.2], [False, False], [False, False])
    assert np.isnan(no_positive.average_precision)
    assert json.loads(json.dumps(no_positive.to_dict(), allow_nan=False))["average_precision"] is None


@pytest.mark.parametrize(
    ("scores", "correct", "has_positive", "match"),
    [
        ([0.5, 0.4], [True, False], [False, False], "marked correct but have no positive"),
        ([0.5, np.nan], [False, False], [False, False], "non-finite"),
        ([0.5, 0.4], [True], [True, True], "expected 2, one per query"),
        ([], [], [], "empty"),
        ([0.5], [0.5], [True], "expected bool"),
        ([[0.5]], [True], [True], "1-D float"),
    ],
)
def test_pr_curve_rejects_bad_input(scores, correct, has_positive, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        precision_recall_curve(np.asarray(scores), np.asarray(correct), np.asarray(has_positive))


def test_pr_curve_rejects_bad_target() -> None:
    with pytest.raises(EvaluationError, match=r"outside \[0, 1\]"):
        _tied_curve().threshold_for_precision(99.0)
