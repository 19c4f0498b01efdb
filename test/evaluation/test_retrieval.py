"""Tests for dinomix_ros.evaluation.retrieval: geometric ground truth (positives_within) and Recall@N.

References are brute-force loops written independently of the vectorised code, on seeded data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinomix_ros.evaluation.inputs import EvaluationError
from dinomix_ros.evaluation.retrieval import DEFAULT_NS, RecallResult, ns_within, positives_within, recall_at_n

# ----------------------------------------------------------------------------------------------- reference code


def _brute_force_positives(db: np.ndarray, q: np.ndarray, radius: float) -> list[np.ndarray]:
    out = []
    for point in q:
        dist = np.linalg.norm(db - point, axis=1)  # NaN rows give NaN, and NaN <= r is False
        out.append(np.flatnonzero(dist <= radius))
    return out


def _reference_recall(predictions: np.ndarray, positives: list[np.ndarray], ns: tuple[int, ...]) -> dict[int, float]:
    hits = {n: 0 for n in ns}
    evaluated = 0
    for row, pos in zip(predictions, positives):
        if len(pos) == 0:
            continue
        evaluated += 1
        for n in ns:
            if any(p in set(pos.tolist()) for p in row[:n] if p >= 0):
                hits[n] += 1
    return {n: hits[n] / evaluated for n in ns}


# ------------------------------------------------------------------------------------------------ positives_within


def test_positives_within_matches_brute_force_on_utm_with_nans(rng: np.random.Generator) -> None:
    origin = np.array([412_345.0, 6_178_901.0])  # UTM 32N-like: float32 would round these to 0.25-0.5 m
    db = origin + rng.uniform(0.0, 600.0, size=(3000, 2))
    q = origin + rng.uniform(-50.0, 650.0, size=(400, 2))
    db[rng.choice(3000, 40, replace=False), rng.integers(0, 2, 40)] = np.nan
    q[:5] = np.nan
    q[5, 1] = np.nan
    # Exactly on the radius (representable in float64): inclusive, as sklearn's radius_neighbors.
    db[0] = q[10] + np.array([25.0, 0.0])
    db[1] = q[10] + np.array([0.0, -25.0])
    db[2] = q[10] + np.array([25.0 + 1e-6, 0.0])

    got = positives_within(db, q, radius_m=25.0)
    want = _brute_force_positives(db, q, 25.0)

    assert len(got) == len(q)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w, err_msg=f"query {i}")
    assert all(g.size == 0 for g in got[:6])
    assert {0, 1} <= set(got[10].tolist()) and 2 not in set(got[10].tolist())
    assert sum(g.size for g in got) > 1000  # the comparison covered many matches


def test_positives_within_3d_and_dense_clusters(rng: np.random.Generator) -> None:
    db = np.concatenate([rng.normal(0.0, 3.0, size=(500, 3)), rng.uniform(-100.0, 100.0, size=(500, 3))])
    db[7] = db[8]  # duplicates are both returned
    q = np.concatenate([rng.normal(0.0, 3.0, size=(50, 3)), rng.uniform(-120.0, 120.0, size=(100, 3)), db[7:8]])
    got = positives_within(db, q, radius_m=7.5)
    want = _brute_force_positives(db, q, 7.5)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert {7, 8} <= set(got[-1].tolist())


def test_positives_within_all_nan_database_and_empty_queries() -> None:
    db = np.full((4, 2), np.nan)
    assert [g.size for g in positives_within(db, np.zeros((3, 2)))] == [0, 0, 0]
    assert positives_within(np.zeros((4, 2)), np.zeros((0, 2))) == []


@pytest.mark.parametrize(
    ("db", "q", "radius", "match"),
    [
        (np.zeros((3, 2)), np.zeros((2, 3)), 25.0, "same"),
        (np.zeros((3, 4)), np.zeros((2, 4)), 25.0, r"\(N, 2\) or \(N, 3\)"),
        (np.zeros(2), np.zeros((2, 2)), 25.0, r"reshape"),
        (np.zeros((3, 2)), np.zeros((2, 2)), 0.0, "positive distance"),
        (np.zeros((3, 2)), np.zeros((2, 2)), float("nan"), "positive distance"),
    ],
)
def test_positives_within_rejects_bad_input(db, q, radius, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        positives_within(db, q, radius_m=radius)


# ------------------------------------------------------------------------------------------------------ Recall@N


def test_recall_at_n_hand_checked_with_padding_and_no_positive_queries() -> None:
    predictions = np.array(
        [
            [3, 1, -1],  # hit at rank 2
            [0, 2, 5],  # hit at rank 3
            [-1, -1, -1],  # no predictions: a miss, not an error
            [7, 8, 9],  # no positive in the database: left out
            [4, -1, -1],  # hit at rank 1
        ]
    )
    positives = [np.array([1]), np.array([5, 6]), np.array([2]), np.array([], dtype=np.int64), np.array([4])]
    res = recall_at_n(predictions, positives, ns=(3, 1, 2))
    assert list(res.recalls) == [1, 2, 3]
    assert res.recalls == pytest.approx({1: 1 / 4, 2: 2 / 4, 3: 3 / 4})
    assert (res.num_queries, res.num_without_positives) == (4, 1)
    assert res.summary() == "R@1: 25.0, R@2: 50.0, R@3: 75.0 (4 queries, 1 without positives)"


def test_recall_at_n_padding_never_matches() -> None:
    # A -1 must not match anything, even when a database index lines up with the internal key arithmetic.
    predictions = np.array([[-1, 0], [-1, -1]])
    res = recall_at_n(predictions, [np.array([1]), np.array([0])], ns=(1, 2))
    assert res.recalls == {1: 0.0, 2: 0.0}


def test_recall_at_n_matches_reference_and_is_cumulative(rng: np.random.Generator) -> None:
    num_q, num_db, k = 300, 50, 20
    predictions = np.stack([rng.permutation(num_db)[:k] for _ in range(num_q)])
    predictions[rng.random((num_q, k)) < 0.1] = -1
    positives = [rng.choice(num_db, size=rng.integers(0, 4), replace=False) for _ in range(num_q)]
    ns = (1, 5, 10, 20)
    res = recall_at_n(predictions, positives, ns)
    ref = _reference_recall(predictions, positives, ns)
    assert res.recalls == pytest.approx(ref, abs=1e-12)
    values = [res.recalls[n] for n in ns]
    assert values == sorted(values) and values[0] < values[-1]
    assert res.num_without_positives == sum(len(p) == 0 for p in positives) > 0


def test_recall_at_n_without_any_positive_is_nan_and_json_safe() -> None:
    res = recall_at_n(np.array([[0, 1]]), [np.array([], dtype=np.int64)], ns=(1, 2))
    assert np.isnan(res.recalls[1]) and res.num_queries == 0 and res.num_without_positives == 1
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert json.loads(text)["recalls"] == {"1": None, "2": None}


def test_recall_result_dict_round_trip() -> None:
    res = RecallResult({1: 0.5, 5: 0.75}, 8, 2)
    data = json.loads(json.dumps(res.to_dict()))
    assert RecallResult.from_dict(data) == res
    with pytest.raises(EvaluationError, match="expected the output of RecallResult.to_dict"):
        RecallResult.from_dict({"recalls": {}})


@pytest.mark.parametrize(
    ("predictions", "positives", "ns", "match"),
    [
        (np.zeros((2, 3), dtype=int), [[0], [1]], (1, 5), r"N=5 is larger than the 3 predictions"),
        (np.zeros((2, 3)), [[0], [1]], (1,), "integer indices"),
        (np.zeros(3, dtype=int), [[0]], (1,), r"expected \(Q, K\)"),
        (np.zeros((2, 3), dtype=int), [[0]], (1,), "expected 2, one per prediction row"),
        (np.full((1, 3), -2), [[0]], (1,), "holds -2"),
        (np.zeros((1, 3), dtype=int), [[-1]], (1,), r"positives\[0\] holds -1"),
        (np.zeros((1, 3), dtype=int), [[0.5]], (1,), r"positives\[0\] has dtype float"),
        (np.zeros((1, 3), dtype=int), [[0]], (0, 1), ">= 1"),
        (np.zeros((1, 3), dtype=int), [[0]], (), "non-empty"),
    ],
)
def test_recall_at_n_rejects_bad_input(predictions, positives, ns, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        recall_at_n(predictions, [np.asarray(p) for p in positives], ns)


def test_ns_within_keeps_the_n_that_a_search_of_that_size_can_fail() -> None:
    assert ns_within(15) == (1, 5, 10)  # a 15-image database: R@20 would count every query as found
    assert ns_within(21, DEFAULT_NS) == (1, 5, 10, 20)
    assert ns_within(20) == (1, 5, 10)  # R@20 of 20 images is 1.0 whatever the ranking
    assert ns_within(3) == (1,) and ns_within(1) == (1,) and ns_within(0) == (1,)
    assert ns_within(7, (10, 5, 1)) == (1, 5)
