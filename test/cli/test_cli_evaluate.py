"""``dinomix map eval`` run in-process through dinomix_ros.cli.main, with random weights: the folder and loop-closure
setups end to end (the bag setup and calibration: test_cli_maps.py) and the flag checks that refuse a run before
the model loads.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cliutil import DATA, MODEL, run, run_error, run_json
from PIL import Image

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth


def test_eval_on_utm_named_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    database, queries = tmp_path / "database", tmp_path / "queries"
    database.mkdir()
    queries.mkdir()
    with open(DATA / "lund_gps" / "gps_from_exif.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    for i, row in enumerate(rows):  # images 01..08: even numbers are the database, odd the queries
        name = f"@{row['utm_east']}@{row['utm_north']}@{row['utm_zone']}@{row['utm_letter']}@{row['lat']}@" \
               f"{row['lon']}@@@@@@@@{row['image'][:2]}@.jpg"
        shutil.copy(DATA / "lund_gps" / "images" / row["image"], (database if i % 2 else queries) / name)
    summary = run_json(capsys, "map", "eval", "--database", database, "--queries", queries, "--out", tmp_path / "ev",
                       *MODEL)
    assert summary["setup"] == "folders" and summary["num_database"] == 4 and summary["num_queries"] == 4
    assert set(summary["recall"]["recalls"]) == {"1"}  # 4 database images: R@5 would hold all of them
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["frame"] == "utm" and report["radius_m"] == 25.0
    east = {r["image"][:2]: float(r["utm_east"]) for r in rows}
    north = {r["image"][:2]: float(r["utm_north"]) for r in rows}
    for q in report["queries_detail"]:
        a, b = q["image"].split("@")[-2], q["best"].split("@")[-2]
        assert q["distance_m"] == pytest.approx(np.hypot(east[a] - east[b], north[a] - north[b]), abs=1e-6)
        assert q["correct"] == (q["distance_m"] <= 25.0)
    assert len(report["pr_curve"]["thresholds"]) >= 1 and report["note"].startswith("random weights")
    assert (tmp_path / "ev" / "recall.png").is_file() and (tmp_path / "ev" / "pr.png").is_file()


def test_eval_loop_closure_on_a_corridor_subset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Images 1-6 (first pass) and 41-46 (their revisit) with the matching 12 x 12 block of the ground truth.
    numbers = [1, 2, 3, 4, 5, 6, 41, 42, 43, 44, 45, 46]
    folder = tmp_path / "seq"
    folder.mkdir()
    for k, n in enumerate(numbers):
        shutil.copy(DATA / "rtabmap_corridor" / "samples" / f"{n}.jpg", folder / f"{k:02d}.jpg")
    gt = load_loop_closure_ground_truth(DATA / "rtabmap_corridor" / "samples_GT.bmp")
    sub = gt[np.ix_([n - 1 for n in numbers], [n - 1 for n in numbers])]
    assert sub[6:, :6].any(axis=1).all() and not sub[:6].any()  # every revisit frame closes a loop
    Image.fromarray(sub.astype(np.uint8) * 255, mode="L").save(tmp_path / "gt.bmp")
    summary = run_json(capsys, "map", "eval", "--images", folder, "--loop-gt", tmp_path / "gt.bmp",
                       "--exclude-recent-count", "2", "--out", tmp_path / "ev", *MODEL)
    # at most 9 candidates per frame (12 frames, 2 recent excluded): R@10 would say nothing
    assert summary["setup"] == "loop_closure" and set(summary["recall"]["recalls"]) == {"1", "5"}
    assert summary["recall"]["num_queries"] == 6  # frames 6..11 have a true loop among their candidates
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert (report["num_frames"], report["first_pass_end"], report["exclude_recent"]) == (12, 6, 2)
    assert report["num_queries"] == 9  # frames 3..11 have at least one candidate (j < i - 2)
    assert [f["best"] is None for f in report["frames_detail"]] == [True] * 3 + [False] * 9
    for name in ("recall.png", "pr.png", "similarity.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000


def test_eval_errors_exit_2_with_a_clear_message(tmp_path: Path, corridor_subset: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    corridor = corridor_subset
    gt = DATA / "rtabmap_corridor" / "samples_GT.bmp"

    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

    assert "--images needs --loop-gt" in error("map", "eval", "--images", corridor, *MODEL)
    assert "--queries does not apply to --images/--loop-gt (setup c)" in error(
        "map", "eval", "--images", corridor, "--loop-gt", gt, "--queries", corridor, *MODEL)
    assert error("map", "eval", "--images", corridor, "--loop-gt", gt, "--exclude-recent-count", "-1", *MODEL) == \
        "--exclude-recent-count must be >= 0, got -1"
    assert "--target-precision is 1.5" in error("map", "eval", "--images", corridor, "--loop-gt", gt,
                                                "--target-precision", "1.5", *MODEL)
    assert "holds 4 images" in error("map", "eval", "--images", corridor, "--loop-gt", gt, "--out", tmp_path / "ev",
                                     *MODEL)
    assert not list(tmp_path.iterdir())  # a refused run writes nothing


def test_eval_on_the_vpr_layout_with_index_ground_truth(
        tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """Database and queries are the same four images: with the identity as ground truth every query finds its
    positive first (R@1 = 1.0); the npy and json forms give the same report."""
    positives = [[0], [1], [2], [3]]
    (tmp_path / "gt.json").write_text(json.dumps(positives))
    np.save(tmp_path / "gt.npy", np.eye(4, dtype=bool))
    reports = []
    for name in ("gt.json", "gt.npy"):
        summary = run_json(capsys, "map", "eval", "--database", corridor_subset, "--queries", corridor_subset,
                           "--ground-truth", tmp_path / name, "--out", tmp_path / name.replace(".", "_"), *MODEL)
        assert summary["setup"] == "folders" and "radius_m" not in summary
        assert summary["recall"] == {"recalls": {"1": 1.0}, "num_queries": 4, "num_without_positives": 0}
        assert summary["calibration"]["min_similarity"] <= 1.0  # a query and its own image: clamped to 1
        reports.append(json.loads((tmp_path / name.replace(".", "_") / "report.json").read_text()))
    for report in reports:
        assert [q["best_index"] for q in report["queries_detail"]] == [0, 1, 2, 3]
        assert report["recall_all_queries"] == {"1": 1.0}
        # 4 correct matches: too few to calibrate by default, and the report says so
        assert report["calibration"]["warning"].startswith("the calibrated min_similarity")
    assert reports[0]["recall"] == reports[1]["recall"]

    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

    base = ["map", "eval", "--database", corridor_subset, "--queries", corridor_subset]
    assert error(*base, "--ground-truth", tmp_path / "gt.json", "--radius-m", "10", *MODEL) == \
        "--radius-m does not apply to --ground-truth (positives come from the file, not from positions)"
    (tmp_path / "three.json").write_text(json.dumps(positives[:3]))
    assert "has 3 query rows but the query folder holds 4 images" in error(
        *base, "--ground-truth", tmp_path / "three.json", *MODEL)
    assert "--radius-m does not apply to --images/--loop-gt" in error(
        "map", "eval", "--images", corridor_subset, "--loop-gt", tmp_path / "gt.bmp", "--radius-m", "5", *MODEL)


def test_calibrate_refuses_a_threshold_from_too_few_matches(
        tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    map_path = tmp_path / "m.dinomap"
    run_json(capsys, "map", "build", map_path, "--images", corridor_subset, "--geotags", "none", *MODEL)
    before = (map_path / "manifest.json").read_text()
    (tmp_path / "gt.json").write_text(json.dumps([[0], [1], [2], [3]]))
    argv = ["map", "eval", "--database", corridor_subset, "--queries", corridor_subset, "--ground-truth",
            tmp_path / "gt.json", "--out", tmp_path / "ev", "--calibrate", map_path, *MODEL]
    caplog.clear()
    code, stdout = run(capsys, *argv)
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and json.loads(stdout)["calibration"]["min_positives"] == 20  # the summary, then the refusal
    assert re.fullmatch(r"the calibrated min_similarity \S+ rests on 4 correct match\(es\) \(4 accepted of 4 "
                        r"queries\); at least 20 are needed .*; .*m.dinomap was not changed\. Evaluate on more "
                        r"queries, or lower --min-positives if you accept a threshold on this little evidence",
                        message), message
    assert (map_path / "manifest.json").read_text() == before
    assert "warning" in json.loads((tmp_path / "ev" / "report.json").read_text())["calibration"]
    summary = run_json(capsys, *argv, "--min-positives", "4")
    assert summary["calibration"]["written_to"] == str(map_path)
    assert json.loads((map_path / "manifest.json").read_text())["metadata"]["calibration"]["correct_matches"] == 4
