"""``dinomix map eval`` on the whole corridor with random weights: loop closures with and without geometric
verification on the same queries (the issue's "Must hold": precision >= 0.95 with verification at the defaults;
recall@1 after re-ranking reported next to before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliutil import DATA, MODEL, run_json


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
    assert verification["settings"]["min_inliers"] == 30 and verification["min_similarity"] == 0.5
    assert verification["verification_ms"]["p50"] > 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    curve = report["verification"]["verified_score_pr_curve"]
    assert len(curve["thresholds"]) >= 5 and max(curve["precision"]) == 1.0
    assert report["plots"]["pr_verified"].endswith("pr_verified.png")
    assert (tmp_path / "ev" / "pr_verified.png").stat().st_size > 1000
