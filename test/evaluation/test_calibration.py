"""Tests for dinomix_ros.evaluation.calibration and the report helpers it relies on: a threshold is stored only in
a map of the same model, only when one reaches the target precision, and the map is otherwise left unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dinomix_ros.evaluation.calibration import (
    CalibrationConfig,
    CalibrationError,
    check_calibration_target,
    check_same_model,
    require_calibration,
    store_calibration,
)
from dinomix_ros.evaluation.curves import precision_recall_curve
from dinomix_ros.evaluation.reports import REPORT_FILE, RunResult, assemble_report, json_ready, summarize
from dinomix_ros.evaluation.retrieval import RecallResult
from dinomix_ros.evaluation.runs import save_run
from dinomix_ros.maps.keyframes import KeyframeMap, MapMismatchError, MapNotFoundError
from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map


def fingerprint(model_id: str) -> dict:
    return {"id": model_id, "architecture": "dinomix_vits14", "weights_sha256": "ef" * 32,
            "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": 8}


def small_map(path: Path, model_id: str = "dmx-00000000000000aa") -> Path:
    kmap = KeyframeMap.empty(fingerprint(model_id))
    kmap.add(np.eye(8, dtype=np.float32)[:2], stamps_ns=[1, 2], cameras="front", frame_ids="map")
    save_map(kmap, path)
    return path


def folder_result(scores: list[float], correct: list[bool]) -> RunResult:
    curve = precision_recall_curve(np.array(scores), np.array(correct), np.ones(len(scores), bool))
    recall = RecallResult({1: float(np.mean(correct))}, len(scores), 0)
    return RunResult("folders", {"radius_m": 25.0, "num_queries": len(scores), "num_database": 2}, curve, recall,
                     seconds=0.25)


def test_store_calibration_records_threshold_and_summary(tmp_path: Path) -> None:
    path = small_map(tmp_path / "m.dinomap")
    model = fingerprint("dmx-00000000000000aa")
    report = assemble_report(folder_result([0.9, 0.8, 0.4], [True, True, False]), model=model, target_precision=1.0)
    assert report["calibration"]["min_similarity"] == 0.8 and report["calibration"]["recall_at_target"] == 2 / 3

    record = store_calibration(path, model, report, tmp_path / "run" / REPORT_FILE, CalibrationConfig(min_positives=2))

    stored = read_manifest(path)["metadata"]["calibration"]
    assert stored == record and "note" not in stored
    assert (stored["min_similarity"], stored["target_precision"], stored["setup"], stored["radius_m"]) == \
        (0.8, 1.0, "folders", 25.0)
    assert stored["summary"]["num_queries"] == 3 and stored["summary"]["operating_point"]["accepted"] == 2
    assert stored["report"] == str(tmp_path / "run" / REPORT_FILE) and stored["model"] == model["id"]
    assert len(load_map(path)) == 2  # the keyframes are kept


def test_calibration_refuses_another_model_and_missing_maps(tmp_path: Path) -> None:
    path = small_map(tmp_path / "m.dinomap")
    other = fingerprint("dmx-00000000000000bb")
    assert check_calibration_target(path)["count"] == 2
    with pytest.raises(MapMismatchError, match="was built with model dmx-00000000000000aa .* the model in use is "
                                               "dmx-00000000000000bb"):
        check_same_model(path, other)
    check_same_model(path, fingerprint("dmx-00000000000000aa"))
    with pytest.raises(MapNotFoundError):
        check_calibration_target(tmp_path / "none.dinomap")


def test_unreachable_precision_leaves_the_map_unchanged(tmp_path: Path) -> None:
    path = small_map(tmp_path / "m.dinomap")
    before = read_manifest(path)
    model = fingerprint("dmx-00000000000000aa")
    result = folder_result([0.9, 0.5], [False, True])  # precision 0 then 0.5: 0.9 is out of reach

    report = save_run(result, tmp_path / "run", model=model, target_precision=0.9, calibrate=path)

    assert report["calibration"]["min_similarity"] is None and "written_to" not in report["calibration"]
    assert read_manifest(path) == before
    assert json.loads((tmp_path / "run" / REPORT_FILE).read_text())["calibration"]["min_similarity"] is None
    with pytest.raises(CalibrationError, match=r"no similarity threshold reaches precision 0.9 \(best: 0.500\); "
                                               r".*m.dinomap was not changed"):
        require_calibration(report, path)
    with pytest.raises(CalibrationError):
        store_calibration(path, model, report, tmp_path / "run" / REPORT_FILE)


def test_json_ready_and_summary() -> None:
    value = {1: np.float32(0.5), "nan": math.nan, "arr": np.arange(2), "path": Path("/x"), "t": (np.int64(3), None)}
    assert json_ready(value) == {"1": 0.5, "nan": None, "arr": [0, 1], "path": "/x", "t": [3, None]}
    report = assemble_report(folder_result([0.9], [True]), model=fingerprint("dmx-00000000000000aa"),
                             target_precision=0.95, random_weights=True)
    summary = summarize(report, Path("/runs/r/report.json"))
    assert list(summary) == ["setup", "note", "num_queries", "num_database", "radius_m", "recall",
                             "average_precision", "calibration", "seconds", "report"]
    assert summary["report"] == "/runs/r/report.json" and summary["seconds"] == 0.25
    json.dumps(summary, allow_nan=False)
