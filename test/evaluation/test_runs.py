"""Tests for dinomix_ros.evaluation.runs, runs_folders and runs_loop_closure: the evaluation setups as library calls
(no argparse, no model).

The thumbnail encoder of conftest.py stands in for the model: an image and its copy score 1.0 and different corridor
images less, so the expected matches are known. The bag setup (b) needs a map built by the real encoder and is
covered through the command line (test/cli/test_cli_maps.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.evaluation.calibration import CalibrationConfig, CalibrationError, require_calibration
from dinomix_ros.evaluation.groundtruth import GroundTruthError
from dinomix_ros.evaluation.loops import LOOP_NS, load_loop_closure_ground_truth
from dinomix_ros.evaluation.reports import RANDOM_WEIGHTS_NOTE, REPORT_FILE, RunResult
from dinomix_ros.evaluation.runs import save_run
from dinomix_ros.evaluation.runs_folders import (
    check_folder_inputs,
    check_ground_truth_inputs,
    evaluate_folders,
    evaluate_folders_ground_truth,
)
from dinomix_ros.evaluation.runs_loop_closure import check_loop_closure_inputs, evaluate_loop_closure
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.manifest import read_manifest
from thumbnails import thumbnail
from dinomix_ros.maps.storage import save_map


@pytest.fixture
def samples(data_dir: Path) -> Path:
    return data_dir / "rtabmap_corridor" / "samples"


def _write_folder(folder: Path, csv_path: Path, rows: list[tuple[str, Path | None, str, str]]) -> None:
    """Images (copies of ``source``; None writes an unreadable file) and an x/y geotag CSV (empty: no position)."""
    folder.mkdir()
    lines = ["image,x,y"]
    for name, source, x, y in rows:
        if source is None:
            (folder / name).write_bytes(b"not a jpeg")
        else:
            shutil.copy(source, folder / name)
        lines.append(f"{name},{x},{y}")
    csv_path.write_text("\n".join(lines) + "\n")


def test_folders_setup_without_argparse(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    # Database: corridor images 10 m apart, one without a position, one unreadable. Queries: copies of two database
    # images 1 m from them, one unreadable, one without a position. With a 5 m radius each query's only positive is
    # its own copy, which the thumbnails rank first (similarity 1).
    database, queries = tmp_path / "database", tmp_path / "queries"
    _write_folder(database, tmp_path / "db.csv", [
        ("a.jpg", samples / "1.jpg", "0", "0"), ("b.jpg", samples / "9.jpg", "10", "0"),
        ("c.jpg", samples / "17.jpg", "20", "0"), ("d.jpg", samples / "25.jpg", "30", "0"),
        ("e.jpg", samples / "33.jpg", "", ""), ("f.jpg", None, "50", "0")])
    _write_folder(queries, tmp_path / "q.csv", [
        ("q1.jpg", samples / "9.jpg", "11", "0"), ("q2.jpg", samples / "25.jpg", "30", "1"),
        ("q3.jpg", None, "0", "0"), ("q4.jpg", samples / "1.jpg", "", "")])
    check_folder_inputs(database, queries)

    result = evaluate_folders(thumbnail_encoder, database, queries, geotags="csv", database_csv=tmp_path / "db.csv",
                              queries_csv=tmp_path / "q.csv", radius_m=5.0, search_device="cpu")

    assert isinstance(result, RunResult) and result.setup == "folders" and result.seconds > 0
    assert result.similarity is None and result.ground_truth is None
    report = result.report
    assert (report["frame"], report["radius_m"], report["num_database"], report["num_queries"]) == ("map", 5.0, 6, 2)
    assert report["skipped"] == {"database_unreadable": 1, "database_without_position": 1, "queries_unreadable": 1,
                                 "queries_without_position": 1}
    first, second = report["queries_detail"]
    assert (Path(first["image"]).name, Path(first["best"]).name, first["correct"]) == ("q1.jpg", "b.jpg", True)
    assert (Path(second["best"]).name, second["num_positives"]) == ("d.jpg", 1)
    assert first["distance_m"] == pytest.approx(1.0) and first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert sorted(first["top"]) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]  # the unreadable one is not indexed
    assert list(result.recall.recalls) == [1] and result.recall.recalls[1] == 1.0  # 5 images indexed: R@5 says nothing
    assert result.pr_curve.num_queries == 2
    assert result.pr_curve.threshold_for_precision(1.0) == pytest.approx(1.0, abs=1e-5)
    assert [c["desc"] for c in thumbnail_encoder.calls] == ["database", "queries"]
    assert all(c["skip_errors"] and not c["progress"] for c in thumbnail_encoder.calls)


def test_folders_setup_refuses_mixed_position_kinds(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    database, queries = tmp_path / "database", tmp_path / "queries"
    _write_folder(database, tmp_path / "db.csv", [("a.jpg", samples / "1.jpg", "0", "0")])
    queries.mkdir()
    shutil.copy(samples / "1.jpg", queries / "q.jpg")
    (tmp_path / "q.csv").write_text("image,lat,lon\nq.jpg,55.7,13.2\n")
    with pytest.raises(ValueError, match="the database positions are x/y but the query positions are UTM"):
        evaluate_folders(thumbnail_encoder, database, queries, geotags="csv", database_csv=tmp_path / "db.csv",
                         queries_csv=tmp_path / "q.csv")


def _loop_sequence(tmp_path: Path, samples: Path) -> tuple[Path, Path]:
    """Corridor images 1-6, then copies of 1-3 (frames 6-8 close loops with frames 0-2), and that ground truth."""
    folder = tmp_path / "seq"
    folder.mkdir()
    for k, n in enumerate([1, 2, 3, 4, 5, 6, 1, 2, 3]):
        shutil.copy(samples / f"{n}.jpg", folder / f"{k:02d}.jpg")
    gt = np.zeros((9, 9), np.uint8)
    gt[6, 0] = gt[7, 1] = gt[8, 2] = 255
    Image.fromarray(gt, mode="L").save(tmp_path / "gt.bmp")
    return folder, tmp_path / "gt.bmp"


def test_loop_closure_setup_without_argparse(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    folder, gt_path = _loop_sequence(tmp_path, samples)
    check_loop_closure_inputs(folder, gt_path)

    result = evaluate_loop_closure(thumbnail_encoder, folder, gt_path, exclude_recent=2, target_precision=1.0)

    # at most 6 candidates (9 frames, 2 recent excluded): R@10 would say nothing
    assert result.setup == "loop_closure" and list(result.recall.recalls) == [n for n in LOOP_NS if n < 7]
    assert result.recall.num_queries == 3 and result.recall.recalls[1] == 1.0  # each revisit finds its copy
    report = result.report
    assert (report["num_frames"], report["first_pass_end"], report["exclude_recent"]) == (9, 6, 2)
    assert report["num_queries"] == 6  # frames 3..8 have a candidate j < i - 2
    assert report["false_loops_first_pass"] == 0  # at the threshold of precision 1.0
    assert [f["best"] for f in report["frames_detail"][6:]] == ["00.jpg", "01.jpg", "02.jpg"]
    assert all(f["correct"] for f in report["frames_detail"][6:])
    assert result.similarity.shape == (9, 9)
    np.testing.assert_array_equal(result.ground_truth, load_loop_closure_ground_truth(gt_path))


def test_loop_closure_inputs_must_match_in_size(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    folder, gt_path = _loop_sequence(tmp_path, samples)
    (folder / "08.jpg").unlink()
    with pytest.raises(ValueError, match=r"gt.bmp is 9 x 9 but .* holds 8 images"):
        check_loop_closure_inputs(folder, gt_path)
    with pytest.raises(ValueError, match="holds 8 images"):
        evaluate_loop_closure(thumbnail_encoder, folder, gt_path)
    assert thumbnail_encoder.calls == []  # refused before describing anything


def _one_keyframe_map(path: Path, fingerprint: dict) -> Path:
    kmap = KeyframeMap.empty(fingerprint, metadata={"name": "calib"})
    desc = np.zeros((1, fingerprint["descriptor_dim"]), np.float32)
    desc[0, 0] = 1.0
    kmap.add(desc, stamps_ns=[1], cameras="front", frame_ids="map")
    save_map(kmap, path)
    return path


def test_save_run_writes_the_run_folder_and_calibrates(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    folder, gt_path = _loop_sequence(tmp_path, samples)
    result = evaluate_loop_closure(thumbnail_encoder, folder, gt_path, exclude_recent=2)
    fingerprint = thumbnail_encoder.fingerprint.to_dict()
    map_path = _one_keyframe_map(tmp_path / "m.dinomap", fingerprint)
    out = tmp_path / "run"

    report = save_run(result, out, model=fingerprint, target_precision=1.0, random_weights=True, calibrate=map_path,
                      calibration=CalibrationConfig(min_positives=3))

    assert sorted(p.name for p in out.iterdir()) == ["pr.png", "recall.png", REPORT_FILE, "similarity.png"]
    assert all((out / name).stat().st_size > 1000 for name in ("pr.png", "recall.png", "similarity.png"))
    written = json.loads((out / REPORT_FILE).read_text())
    assert written["setup"] == "loop_closure" and written["note"] == RANDOM_WEIGHTS_NOTE
    assert written["model"] == fingerprint and written["seconds"] == round(result.seconds, 3)
    assert written["plots"] == {"recall": str(out / "recall.png"), "pr": str(out / "pr.png"),
                                "similarity": str(out / "similarity.png")}
    threshold = written["calibration"]["min_similarity"]
    assert threshold == pytest.approx(1.0, abs=1e-5) and written["calibration"]["written_to"] == str(map_path)
    assert report["calibration"]["written_to"] == str(map_path)
    stored = read_manifest(map_path)["metadata"]["calibration"]
    assert (stored["min_similarity"], stored["target_precision"], stored["setup"]) == (threshold, 1.0, "loop_closure")
    assert stored["report"] == str(out / REPORT_FILE) and stored["note"] == RANDOM_WEIGHTS_NOTE
    assert stored["summary"]["recall"] == written["recall"] and stored["model"] == fingerprint["id"]


def _vpr_layout(tmp_path: Path, samples: Path) -> tuple[Path, Path]:
    """Database: corridor images 1, 9, 17, 25, 33, 41 as 00..05.jpg; queries: copies of database images 2, 4, 1,
    an image not in the database (60), and an unreadable file."""
    database, queries = tmp_path / "database", tmp_path / "queries"
    database.mkdir()
    queries.mkdir()
    for k, n in enumerate([1, 9, 17, 25, 33, 41]):
        shutil.copy(samples / f"{n}.jpg", database / f"{k:02d}.jpg")
    for k, n in enumerate([17, 33, 9, 60]):
        shutil.copy(samples / f"{n}.jpg", queries / f"q{k}.jpg")
    (queries / "q4.jpg").write_bytes(b"not a jpeg")
    return database, queries


#: Per query (q0..q4): the database indices the ground truth calls correct. q2 is a copy of 01 but the ground truth
#: says 03, so its best match is wrong; q3 has no positive; q4 cannot be read.
VPR_POSITIVES = [[2], [4, 5], [3], [], [0]]


def _vpr_reference(database: Path, queries: Path, ns: tuple[int, ...]) -> dict[int, float]:
    """Recall@N as gmberton/VPR-methods-evaluation computes it (its main loop, over every evaluated query, those
    without a positive counting as misses), from the thumbnails directly."""
    db = np.stack([thumbnail(p) for p in sorted(database.iterdir())])
    q = np.stack([thumbnail(queries / f"q{k}.jpg") for k in range(4)])
    predictions = np.argsort(-(q @ db.T), axis=1, kind="stable")
    recalls = np.zeros(len(ns))
    for query_index, preds in enumerate(predictions):
        for i, n in enumerate(ns):
            if np.any(np.isin(preds[:n], VPR_POSITIVES[query_index])):
                recalls[i:] += 1
                break
    return {n: r / len(predictions) for n, r in zip(ns, recalls)}


@pytest.mark.parametrize("kind", ["json", "csv", "npy"])
def test_vpr_layout_with_index_ground_truth_gives_the_literature_recall(
        tmp_path: Path, samples: Path, thumbnail_encoder, kind: str) -> None:
    database, queries = _vpr_layout(tmp_path, samples)
    gt = tmp_path / f"gt.{kind}"
    if kind == "json":
        gt.write_text(json.dumps(VPR_POSITIVES))
    elif kind == "csv":
        gt.write_text("\n".join(",".join(map(str, row)) for row in VPR_POSITIVES) + "\n")
    else:
        matrix = np.zeros((5, 6), bool)
        for k, row in enumerate(VPR_POSITIVES):
            matrix[k, row] = True
        np.save(gt, matrix)
    check_ground_truth_inputs(database, queries, gt)

    result = evaluate_folders_ground_truth(thumbnail_encoder, database, queries, gt, search_device="cpu")

    # Hand count: q0 and q1 find a positive first (their copies), q2 does not; q3 has none; q4 is unreadable.
    recall = result.recall
    assert list(recall.recalls) == [1, 5] and recall.recalls[1] == pytest.approx(2 / 3)  # 6 images: R@10 says nothing
    assert (recall.num_queries, recall.num_without_positives) == (3, 1)
    reference = _vpr_reference(database, queries, (1, 5))
    assert result.report["recall_all_queries"] == {str(n): pytest.approx(r) for n, r in reference.items()}
    assert result.report["recall_all_queries"]["1"] == pytest.approx(2 / 4)
    assert recall.recalls[5] == pytest.approx(reference[5] * 4 / 3)  # the same hits, over the 3 with a positive
    report = result.report
    assert (report["num_database"], report["num_queries"], report["ground_truth"]) == (6, 4, str(gt))
    assert report["skipped"] == {"database_unreadable": 0, "queries_unreadable": 1}
    detail = {Path(d["image"]).name: d for d in report["queries_detail"]}
    assert [(detail[f"q{k}.jpg"]["best_index"], detail[f"q{k}.jpg"]["correct"]) for k in range(3)] == \
        [(2, True), (4, True), (1, False)]
    assert detail["q3.jpg"]["num_positives"] == 0 and detail["q0.jpg"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert result.pr_curve.num_queries == 4 and result.pr_curve.num_positives == 3


def test_vpr_layout_refuses_a_ground_truth_of_other_folders(tmp_path: Path, samples: Path, thumbnail_encoder) -> None:
    database, queries = _vpr_layout(tmp_path, samples)
    (tmp_path / "gt.json").write_text(json.dumps(VPR_POSITIVES[:4]))
    with pytest.raises(GroundTruthError, match=r"has 4 query rows but the query folder holds 5 images"):
        check_ground_truth_inputs(database, queries, tmp_path / "gt.json")
    with pytest.raises(GroundTruthError):
        evaluate_folders_ground_truth(thumbnail_encoder, database, queries, tmp_path / "gt.json")
    assert thumbnail_encoder.calls == []  # refused before describing anything


def test_calibration_needs_enough_correct_matches(tmp_path: Path, samples: Path, thumbnail_encoder,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """3 correct matches support the threshold of this loop sequence: below the default minimum (20) the run warns
    with the count and the map is left alone; with --min-positives 3 it is calibrated."""
    folder, gt_path = _loop_sequence(tmp_path, samples)
    result = evaluate_loop_closure(thumbnail_encoder, folder, gt_path, exclude_recent=2)
    fingerprint = thumbnail_encoder.fingerprint.to_dict()
    map_path = _one_keyframe_map(tmp_path / "m.dinomap", fingerprint)
    before = read_manifest(map_path)

    report = save_run(result, tmp_path / "run", model=fingerprint, target_precision=1.0, calibrate=map_path)

    cal = report["calibration"]
    assert cal["min_similarity"] is not None and "written_to" not in cal and read_manifest(map_path) == before
    assert cal["min_positives"] == CalibrationConfig().min_positives == 20
    assert cal["warning"].startswith(f"the calibrated min_similarity {cal['min_similarity']:.6f} rests on 3 correct "
                                     "match(es) (3 accepted of 6 queries); at least 20 are needed")
    assert cal["warning"] in caplog.text
    with pytest.raises(CalibrationError, match=r"rests on 3 correct match\(es\).*/m.dinomap was not changed"):
        require_calibration(report, map_path)
    require_calibration(report, map_path, CalibrationConfig(min_positives=3))
    with pytest.raises(ValueError, match=r"calibration.min_positives must be >= 1, got 0"):
        CalibrationConfig(min_positives=0)
