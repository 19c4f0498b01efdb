"""Tests for dinomix_ros.evaluation.metrics: ground truth, Recall@N, PR curves, RTAB-Map loop closure and plots.

References are brute-force loops written independently of the vectorised code, on seeded data, plus the real
RTAB-Map corridor sequence (test/data/rtabmap_corridor) with a thumbnail baseline whose scores SOURCE.md states.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.evaluation.metrics import (
    EvaluationError,
    GroundTruthFormatError,
    PRCurve,
    RecallResult,
    evaluate_loop_closures,
    evaluate_relocalization,
    load_loop_closure_ground_truth,
    plot_pr_curve,
    plot_recall_at_n,
    plot_similarity_matrix,
    positives_within,
    precision_recall_curve,
    recall_at_n,
)

REPO = Path(__file__).resolve().parents[2]
CORRIDOR_FRAMES = 84


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


def _reference_ranking(similarity: np.ndarray, gt: np.ndarray, num_candidates: list[int], ns: tuple[int, ...]):
    """Per row: rank its candidate columns by a full stable sort; return recalls, best matches and scores."""
    hits = {n: 0 for n in ns}
    evaluated = 0
    best, scores = [], []
    for i, count in enumerate(num_candidates):
        if count == 0:
            best.append(-1)
            scores.append(np.nan)
            continue
        ranked = np.argsort(-similarity[i, :count], kind="stable")
        best.append(int(ranked[0]))
        scores.append(float(similarity[i, ranked[0]]))
        if not gt[i, :count].any():
            continue
        evaluated += 1
        for n in ns:
            hits[n] += bool(gt[i, ranked[:n]].any())
    return {n: hits[n] / evaluated for n in ns}, np.array(best), np.array(scores)


def _corridor_thumbnails(data_dir: Path) -> np.ndarray:
    """The thumbnail baseline of test/data/rtabmap_corridor/SOURCE.md, recipe pinned by test_thumbnail_baseline.

    Recipe: PIL ``convert("L").resize((32, 24), Image.BILINEAR)`` (explicit: Pillow's default filter is bicubic),
    flatten to 768 values in float64, subtract each thumbnail's own mean, L2-normalise; similarity = X @ X.T.
    """
    frames = []
    for i in range(1, CORRIDOR_FRAMES + 1):
        with Image.open(data_dir / "rtabmap_corridor" / "samples" / f"{i}.jpg") as img:
            thumb = img.convert("L").resize((32, 24), Image.BILINEAR)
        frames.append(np.asarray(thumb, dtype=np.float64).ravel())
    x = np.stack(frames)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@pytest.fixture
def corridor_gt(data_dir: Path) -> np.ndarray:
    return load_loop_closure_ground_truth(data_dir / "rtabmap_corridor" / "samples_GT.bmp")


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


# ------------------------------------------------------------------------------------------ RTAB-Map ground truth


def test_rtabmap_ground_truth_parses(corridor_gt: np.ndarray) -> None:
    gt = corridor_gt
    assert gt.shape == (84, 84) and gt.dtype == bool
    assert int(gt.sum()) == 228
    rows = np.flatnonzero(gt.any(axis=1))
    assert rows.size == 44
    assert rows.min() == 40  # image 41: images 1-40 are the first pass, no loops (SOURCE.md)
    # Found: the file is strictly lower-triangular, not symmetric: row i marks only earlier images j < i.
    assert not np.triu(gt).any()
    assert not (gt == gt.T).all()
    np.testing.assert_array_equal(np.flatnonzero(gt[40]), [0, 1, 2])  # image 41 closes with images 1-3
    np.testing.assert_array_equal(np.flatnonzero(gt[83]), [2, 3, 4, 41, 42, 43, 44, 45])  # 84: 3-5 and 42-46


def test_ground_truth_rejects_non_square(tmp_path: Path) -> None:
    path = tmp_path / "gt.bmp"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(path)
    with pytest.raises(GroundTruthFormatError, match=r"is 12x10 .* expected a square"):
        load_loop_closure_ground_truth(path)


def test_ground_truth_rejects_non_binary(tmp_path: Path) -> None:
    pixels = np.zeros((5, 5), dtype=np.uint8)
    pixels[3, 1] = 128
    path = tmp_path / "gt.png"
    Image.fromarray(pixels).save(path)
    with pytest.raises(GroundTruthFormatError, match=r"values \[128\]; expected only 0 \(no loop\) and 255"):
        load_loop_closure_ground_truth(path)


def test_ground_truth_rejects_colour_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "gt.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(GroundTruthFormatError, match="mode 'RGB'"):
        load_loop_closure_ground_truth(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_loop_closure_ground_truth(tmp_path / "missing.bmp")
    (tmp_path / "junk.bmp").write_bytes(b"not an image")
    with pytest.raises(GroundTruthFormatError, match="not a readable image"):
        load_loop_closure_ground_truth(tmp_path / "junk.bmp")


def test_ground_truth_reads_one_bit_images(tmp_path: Path) -> None:
    pixels = np.zeros((6, 6), dtype=np.uint8)
    pixels[4, 1] = 255
    path = tmp_path / "gt.bmp"
    Image.fromarray(pixels).convert("1").save(path)
    gt = load_loop_closure_ground_truth(path)
    np.testing.assert_array_equal(np.argwhere(gt), [[4, 1]])


# ------------------------------------------------------------------------------------------------- loop closure


def _toy_loop_data() -> tuple[np.ndarray, np.ndarray]:
    n = 6
    sim = np.full((n, n), 0.05)
    sim[np.arange(1, n), np.arange(n - 1)] = 0.99  # the previous frame: always similar, never a candidate
    sim[2, 0] = 0.9  # first pass: a strong false loop
    sim[3, 0], sim[3, 1] = 0.2, 0.3
    sim[4, 0], sim[4, 1], sim[4, 2] = 0.8, 0.85, 0.1  # revisit of 0, but 1 scores higher
    sim[5, 1], sim[5, 3] = 0.7, 0.6  # revisit of 1, ranked first
    gt = np.zeros((n, n), dtype=bool)
    gt[4, 0] = gt[5, 1] = True
    return sim, gt


def test_loop_closures_hand_checked() -> None:
    sim, gt = _toy_loop_data()
    rep = evaluate_loop_closures(sim, gt, exclude_recent=1, ns=(1, 2), threshold=0.75)
    # Frame i may match j < i - 1: frames 0, 1 have no candidate, 2 and 3 no true loop among theirs.
    np.testing.assert_array_equal(rep.best_match, [-1, -1, 0, 1, 1, 1])
    np.testing.assert_array_equal(rep.correct, [False, False, False, False, False, True])
    assert rep.recall.recalls == {1: 0.5, 2: 1.0}
    assert (rep.recall.num_queries, rep.recall.num_without_positives) == (2, 2)
    assert rep.first_pass_end == 4
    assert rep.false_loops_first_pass == 1  # frame 2 (0.9); frame 3 (0.3) stays below 0.75
    assert (rep.operating_point.accepted, rep.operating_point.true_positives) == (2, 0)
    np.testing.assert_array_equal(rep.pr_curve.thresholds, [0.9, 0.85, 0.7, 0.3])
    np.testing.assert_array_equal(rep.pr_curve.true_positives, [0, 0, 1, 1])
    assert rep.pr_curve.num_positives == 2
    data = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert data["best_match"][:3] == [None, None, 0] and data["best_score"][0] is None

    # Ground truth marked in the upper triangle instead (j > i) means the same loops.
    rep_t = evaluate_loop_closures(sim, gt.T, exclude_recent=1, ns=(1, 2))
    assert rep_t.recall == rep.recall
    assert rep_t.operating_point is None and rep_t.false_loops_first_pass is None


def test_loop_closures_match_reference_ranking(rng: np.random.Generator) -> None:
    n, exclude = 60, 5
    sim = rng.integers(0, 4, size=(n, n)) / 4.0  # heavy ties, also at the N-th place: lower (older) frame first
    gt = np.tril(rng.random((n, n)) < 0.15, -1)
    ns = (1, 3, 10)
    rep = evaluate_loop_closures(sim, gt, exclude_recent=exclude, ns=ns)
    num_candidates = [max(0, i - exclude) for i in range(n)]
    ref, best, scores = _reference_ranking(sim, gt, num_candidates, ns)
    assert rep.recall.recalls == pytest.approx(ref, abs=1e-12)
    np.testing.assert_array_equal(rep.best_match, best)
    np.testing.assert_array_equal(rep.best_score, scores)
    assert all(j < i - exclude for i, j in enumerate(rep.best_match) if j >= 0)  # causal


def test_relocalization_matches_reference_ranking(rng: np.random.Generator) -> None:
    sim = rng.integers(0, 5, size=(40, 25)) / 4.0
    gt = rng.random((40, 25)) < 0.1
    rep = evaluate_relocalization(sim, gt, ns=(1, 5, 30), threshold=0.75)  # 30 > 25 map entries: padding
    ref, best, _ = _reference_ranking(sim, gt, [25] * 40, (1, 5, 30))
    assert rep.recall.recalls == pytest.approx(ref, abs=1e-12)
    assert rep.recall.recalls[30] == 1.0
    np.testing.assert_array_equal(rep.best_match, best)
    assert rep.exclude_recent is None and rep.false_loops_first_pass is None
    assert rep.operating_point.accepted == int((sim.max(axis=1) >= 0.75).sum())


@pytest.mark.parametrize(
    ("sim", "gt", "kwargs", "match"),
    [
        (np.zeros((4, 5)), np.zeros((4, 5), bool), {}, r"expected a \(N, N\) frame-vs-frame"),
        (np.zeros((4, 4)), np.zeros((3, 3), bool), {}, r"ground_truth has shape \(3, 3\)"),
        (np.zeros((4, 4)), np.zeros((4, 4), bool), {"exclude_recent": -1}, "integer >= 0"),
        (np.full((4, 4), np.nan), np.zeros((4, 4), bool), {}, "non-finite"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {}, "expected bool"),
        (np.zeros((4, 4)), np.zeros((4, 4), bool), {"exclude_recent": 3}, "no row has a candidate"),
    ],
)
def test_loop_closures_reject_bad_input(sim, gt, kwargs, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate_loop_closures(sim, gt, **kwargs)


def test_thumbnail_baseline_reproduces_reference(data_dir: Path, corridor_gt: np.ndarray) -> None:
    """SOURCE.md: 32x24 grayscale thumbnails, cosine, past frames only, last 10 excluded -> R@1/5/10 0.36/0.82/0.91.

    Recipe (see _corridor_thumbnails): bilinear resize, per-image mean subtracted, L2-normalised. It gives 16, 36 and
    40 of the 44 frames with a loop (0.364, 0.818, 0.909). Variants that miss by more than 0.02: Pillow's default
    (bicubic) filter gives R@5 0.795, R@10 0.932; no mean subtraction gives R@5 0.750, R@10 0.864.
    """
    x = _corridor_thumbnails(data_dir)
    rep = evaluate_loop_closures(x @ x.T, corridor_gt, exclude_recent=10, ns=(1, 5, 10), threshold=0.9)
    assert rep.recall.num_queries == 44
    assert rep.recall.num_without_positives == 29  # frames 12-40: candidates but no loop
    for n, expected in {1: 0.36, 5: 0.82, 10: 0.91}.items():
        assert abs(rep.recall.recalls[n] - expected) <= 0.02, (n, rep.recall.recalls)
    assert [round(rep.recall.recalls[n] * 44) for n in (1, 5, 10)] == [16, 36, 40]
    assert rep.first_pass_end == 40
    assert all(j < i - 10 for i, j in enumerate(rep.best_match) if j >= 0)
    assert 0.0 < rep.pr_curve.average_precision < 1.0
    assert rep.pr_curve.num_queries == 84 - 11 and rep.pr_curve.num_positives == 44


# --------------------------------------------------------------------------------------------------------- plots


def _assert_png(path: Path, min_size: tuple[int, int]) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        img.verify()


def test_plots_are_written(tmp_path: Path, data_dir: Path, corridor_gt: np.ndarray) -> None:
    x = _corridor_thumbnails(data_dir)
    sim = x @ x.T
    rep = evaluate_loop_closures(sim, corridor_gt)
    reloc = evaluate_relocalization(sim[40:, :40], corridor_gt[40:, :40])

    out = plot_recall_at_n(
        {"loop closure": rep.recall, "relocalization": reloc.recall.to_dict(), "plain": {1: 0.2, 5: 0.5, 10: 0.6}},
        tmp_path / "plots" / "recall.png",
    )
    assert out == tmp_path / "plots" / "recall.png"
    _assert_png(out, (400, 300))
    _assert_png(plot_pr_curve({"thumbnails": rep.pr_curve}, tmp_path / "pr.png", mark_threshold=0.8), (400, 300))
    _assert_png(plot_similarity_matrix(sim, corridor_gt, tmp_path / "sim.png"), (400, 300))
    _assert_png(plot_similarity_matrix(sim[40:, :40], None, tmp_path / "sim_q.png"), (400, 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "pr.png", "sim.png", "sim_q.png"]  # no temp files


def test_plots_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="results is empty"):
        plot_recall_at_n({}, tmp_path / "r.png")
    with pytest.raises(EvaluationError, match="expected a PRCurve"):
        plot_pr_curve({"x": {"thresholds": []}}, tmp_path / "p.png")
    with pytest.raises(EvaluationError, match=r"ground_truth has shape \(2, 2\)"):
        plot_similarity_matrix(np.zeros((3, 3)), np.zeros((2, 2), bool), tmp_path / "s.png")
    assert not list(tmp_path.iterdir())


def test_import_does_not_load_matplotlib_or_ros() -> None:
    code = (
        "import sys, dinomix_ros.evaluation.metrics; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'rclpy'}))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
