"""Tests for dinomix_ros.evaluation.loops: RTAB-Map ground truth, causal loop closure and relocalization.

References are brute-force rankings written independently of the vectorised code, on seeded data, plus the real
RTAB-Map corridor sequence (test/data/rtabmap_corridor) with a thumbnail baseline whose scores SOURCE.md states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.evaluation.inputs import EvaluationError
from dinomix_ros.evaluation.loops import (
    GroundTruthFormatError,
    evaluate_loop_closures,
    evaluate_relocalization,
    load_loop_closure_ground_truth,
)

# ----------------------------------------------------------------------------------------------- reference code


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


def test_thumbnail_baseline_reproduces_reference(corridor_thumbnails: np.ndarray,
                                                 corridor_gt: np.ndarray) -> None:
    """SOURCE.md: 32x24 grayscale thumbnails, cosine, past frames only, last 10 excluded -> R@1/5/10 0.36/0.82/0.91.

    Recipe (see the corridor_thumbnails fixture): bilinear resize, per-image mean subtracted, L2-normalised. It gives
    16, 36 and 40 of the 44 frames with a loop (0.364, 0.818, 0.909). Variants that miss by more than 0.02: Pillow's
    default (bicubic) filter gives R@5 0.795, R@10 0.932; no mean subtraction gives R@5 0.750, R@10 0.864.
    """
    x = corridor_thumbnails
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
