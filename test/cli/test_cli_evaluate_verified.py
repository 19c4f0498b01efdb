"""``dinomix map eval`` on the whole corridor with random weights: loop closures with and without geometric
verification on the same queries (the issue's "Must hold": precision >= 0.95 with verification at the defaults;
recall@1 after re-ranking reported next to before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cliutil import DATA, MODEL, run_json

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth
from dinomix_ros.localization.verification import VerificationConfig


def test_corridor_loop_closures_with_and_without_verification(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corridor = DATA / "rtabmap_corridor"
    summary = run_json(capsys, "map", "eval", "--images", corridor / "samples", "--loop-gt",
                       corridor / "samples_GT.bmp", "--out", tmp_path / "ev", *MODEL)
    assert summary["note"].startswith("random weights")
    verification = summary["verification"]
    without, with_ = verification["without_verification"], verification["with_verification"]
    # geometry does the work: random weights accept many wrong loops, verification almost none
    assert with_["precision"] >= 0.95, with_
    assert with_["accepted"] >= 20 and without["precision"] < 0.5
    before, after = verification["recall_before"]["recalls"], verification["recall_after"]["recalls"]
    assert verification["recall_before"]["num_queries"] == verification["recall_after"]["num_queries"] == 44
    assert after["1"] > before["1"]  # re-ranking by verified score
    assert after["5"] == before["5"]  # the top 5 are re-ordered, not replaced
    assert verification["settings"]["min_inliers"] == VerificationConfig().min_inliers
    assert verification["min_similarity"] == 0.5
    assert verification["verification_ms"]["p50"] > 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    curve = report["verification"]["verified_score_pr_curve"]
    assert len(curve["thresholds"]) >= 5 and max(curve["precision"]) == 1.0
    assert report["plots"]["pr_verified"].endswith("pr_verified.png")
    assert (tmp_path / "ev" / "pr_verified.png").stat().st_size > 1000


def test_index_ground_truth_setup_verifies_with_the_given_settings(
        tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture) -> None:
    """The VPR layout (``--ground-truth``) verifies its queries too, with the --verification-* flags given (they were
    accepted and ignored there before): four corridor revisits against the first-pass images they revisit."""
    queries = tmp_path / "queries"
    queries.mkdir()
    for i in (41, 49, 57, 65):  # revisits of 1, 9, 17, 25 (corridor_subset)
        shutil.copy(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg", queries / f"{i}.jpg")
    gt = load_loop_closure_ground_truth(DATA / "rtabmap_corridor" / "samples_GT.bmp")
    gt = gt | gt.T
    positives = [[j for j, d in enumerate((1, 9, 17, 25)) if gt[q - 1, d - 1]] for q in (41, 49, 57, 65)]
    assert positives == [[0], [1], [2], [3]]
    (tmp_path / "gt.json").write_text(json.dumps(positives))
    base = ["map", "eval", "--database", corridor_subset, "--queries", queries, "--ground-truth", tmp_path / "gt.json",
            *MODEL]

    default = run_json(capsys, *base, "--out", tmp_path / "a")["verification"]
    assert default["settings"]["min_inliers"] == VerificationConfig().min_inliers
    assert default["with_verification"]["accepted"] >= 2 and default["with_verification"]["precision"] == 1.0
    assert default["recall_after"]["recalls"]["1"] > default["recall_before"]["recalls"]["1"]
    strict = run_json(capsys, *base, "--verification-min-inliers", "100000", "--out", tmp_path / "b")["verification"]
    assert strict["settings"]["min_inliers"] == 100000 and strict["with_verification"]["accepted"] == 0
    assert strict["recall_before"] == default["recall_before"]  # the same queries and search
    off = run_json(capsys, *base, "--no-verification-enabled", "--out", tmp_path / "c")
    assert "verification" not in off
    assert "verification" not in json.loads((tmp_path / "c" / "report.json").read_text())
