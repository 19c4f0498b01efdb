"""``dinomix map {build,info,topics,query,eval}`` run in-process through dinomix_ros.cli.main, with random weights.

Seeded random weights make every score meaningless, so the checks are about plumbing: JSON on stdout, files
written, counts, an image finding itself, calibration stored in the map, and errors ending with exit code 2.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from bagfactory import Motion, photo_frames, write_camera_bag
from PIL import Image

from dinomix_ros.cli.main import main
from dinomix_ros.evaluation.metrics import load_loop_closure_ground_truth
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.manifest import read_manifest

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = ["--random-weights", "--device", "cpu", "--batch-size", "4", "--quiet"]


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture, *argv: str | Path) -> dict:
    code, out = run(capsys, *argv)
    assert code == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def corridor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corridor")
    for i in (1, 9, 17, 25):
        shutil.copy(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg", folder / f"{i}.jpg")
    return folder


def test_build_info_query_from_a_folder(tmp_path: Path, corridor: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "corridor.dinomap"
    built = run_json(capsys, "map", "build", out, "--images", corridor, "--geotags", "none", "--camera", "front",
                     *MODEL)
    assert built["keyframes"] == 4 and built["frames"] == ["none"] and built["note"] == "random weights: scores " \
        "are meaningless"
    assert built["report"]["added"] == 4 and built["report"]["no_geotag"] == 4 and built["report"]["images_per_s"] > 0
    assert read_manifest(out)["count"] == 4

    info = run_json(capsys, "map", "info", out, "--json")
    assert (info["name"], info["keyframes"], info["cameras"], info["frames"]) == ("corridor", 4, ["front"], ["none"])
    assert info["model"]["architecture"] == "dinomix_vits14" and info["index"] is None and info["calibration"] is None
    code, text = run(capsys, "map", "info", out)
    assert code == 0 and "keyframes    4 (next id 4, generation 1)" in text and "calibration  none" in text

    result = run_json(capsys, "map", "query", out, corridor / "17.jpg", "--top-k", "3", *MODEL)
    (query,) = result["queries"]
    best, *others = query["candidates"]
    assert (best["rank"], best["keyframe_id"], best["source"]) == (0, 2, str(corridor / "17.jpg"))
    assert best["similarity"] == pytest.approx(1.0, abs=1e-3)  # float16 storage
    assert [c["rank"] for c in others] == [1, 2] and all(c["similarity"] < best["similarity"] for c in others)
    assert best["position"] is None and best["gps"] is None and result["note"].startswith("random weights")


def test_bag_topics_build_append_eval_and_calibrate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 0.3 m per frame, 0.5 m gate: frames 0, 2, 4 of 6 become keyframes.
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(6), image_format="jpeg",
                           motion=Motion(velocity=(1.5, 0.0, 0.0)), gps_topic="/gps/fix")
    code, table = run(capsys, "map", "topics", bag.path)
    assert code == 0 and table.splitlines()[0].split() == ["topic", "type", "count", "usable", "as"]
    listed = run_json(capsys, "map", "topics", bag.path, "--json")["topics"]
    assert {r["topic"]: r["usable_as"] for r in listed} == {"/camera/image_raw": ["image"], "/gps/fix": ["pose", "gps"],
                                                            "/odom": ["pose"]}
    out = tmp_path / "run.dinomap"
    built = run_json(capsys, "map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw",
                     "--pose-topic", "/odom", "--gps-topic", "/gps/fix", "--index", "hnsw", "--name", "lab", *MODEL)
    report = built["report"]
    assert (report["images_seen"], report["added"], report["not_keyframes"], report["no_pose"]) == (6, 3, 3, 0)
    manifest = read_manifest(out)
    assert manifest["files"]["index"]["kind"] == "faiss_hnsw_ip" and manifest["metadata"]["name"] == "lab"
    kmap = KeyframeMap.load(out)
    np.testing.assert_array_equal(kmap.stamps_ns, bag.image_stamps_ns[[0, 2, 4]])
    np.testing.assert_allclose(kmap.positions[:, 0], [0.0, 0.6, 1.2], atol=1e-9)
    assert kmap.frames == ["odom"] and set(kmap.utm_zones.tolist()) == {33}

    # Every frame as a query; with a 0.1 m radius only the three keyframes have a positive: themselves.
    eval_dir = tmp_path / "eval"
    summary = run_json(capsys, "map", "eval", "--map", out, "--bag", bag.path, "--image-topic", "/camera/image_raw",
                       "--pose-topic", "/odom", "--radius-m", "0.1", "--out", eval_dir, "--calibrate", out, *MODEL)
    assert summary["recall"] == {"recalls": {"1": 1.0, "5": 1.0, "10": 1.0, "20": 1.0}, "num_queries": 3,
                                 "num_without_positives": 3}
    assert summary["note"] == "random weights: scores are meaningless" and summary["num_queries"] == 6
    full = json.loads((eval_dir / "report.json").read_text())
    assert full["frame"] == "odom" and full["skipped"]["no_pose"] == 0
    assert [q["correct"] for q in full["queries_detail"]] == [True, False] * 3
    assert all((eval_dir / name).stat().st_size > 1000 for name in ("recall.png", "pr.png"))
    threshold = summary["calibration"]["min_similarity"]
    assert threshold is not None and threshold > 0.99  # the keyframes find themselves at ~1.0
    calibration = read_manifest(out)["metadata"]["calibration"]
    assert calibration["min_similarity"] == threshold and calibration["target_precision"] == 0.95
    assert calibration["setup"] == "bag" and calibration["note"].startswith("random weights")
    assert calibration["report"] == str(eval_dir / "report.json")
    assert read_manifest(out)["files"]["index"]["kind"] == "faiss_hnsw_ip"  # calibrating kept the stored index

    appended = run_json(capsys, "map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw",
                        "--pose-topic", "/odom", "--append", *MODEL)
    assert appended["keyframes"] == 6 and appended["report"]["added"] == 3
    meta = read_manifest(out)["metadata"]
    assert len(meta["builds"]) == 2 and "calibration" in meta  # an append keeps the metadata


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
    assert set(summary["recall"]["recalls"]) == {"1", "5", "10", "20"}
    assert summary["recall"]["recalls"]["5"] == 1.0  # 4 database images: the top 5 holds all of them
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["frame"] == "utm_33U" and report["radius_m"] == 25.0
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
                       "--exclude-recent", "2", "--out", tmp_path / "ev", *MODEL)
    assert summary["setup"] == "loop_closure" and set(summary["recall"]["recalls"]) == {"1", "5", "10"}
    assert summary["recall"]["num_queries"] == 6  # frames 6..11 have a true loop among their candidates
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert (report["num_frames"], report["first_pass_end"], report["exclude_recent"]) == (12, 6, 2)
    assert report["num_queries"] == 9  # frames 3..11 have at least one candidate (j < i - 2)
    assert [f["best"] is None for f in report["frames_detail"]] == [True] * 3 + [False] * 9
    for name in ("recall.png", "pr.png", "similarity.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000


def test_errors_exit_2_with_a_clear_message(tmp_path: Path, corridor: Path, capsys: pytest.CaptureFixture,
                                            caplog: pytest.LogCaptureFixture) -> None:
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2))
    out = tmp_path / "m.dinomap"

    def error(*argv: str | Path) -> str:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dinomix"):
            code, stdout = run(capsys, *argv)
        assert code == 2 and stdout == ""
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        return record.getMessage()

    assert "image topic /cam/missing is not in the bag" in error(
        "map", "build", out, "--bag", bag.path, "--image-topic", "/cam/missing", "--pose-topic", "/odom", *MODEL)
    assert "pose topic /camera/image_raw carries sensor_msgs/msg/Image" in error(
        "map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw", "--pose-topic",
        "/camera/image_raw", *MODEL)
    assert "--bag needs --image-topic (once per camera) and --pose-topic" in error(
        "map", "build", out, "--bag", bag.path, *MODEL)
    assert "--append: there is no map at" in error("map", "build", out, "--images", corridor, "--append", *MODEL)
    assert "--csv does not apply to --bag" in error(
        "map", "build", out, "--bag", bag.path, "--csv", "x.csv", "--image-topic", "/camera/image_raw", *MODEL)
    assert "--images needs --loop-gt" in error("map", "eval", "--images", corridor, *MODEL)
    assert not out.exists() and not list(tmp_path.glob("runs"))

    run_json(capsys, "map", "build", out, "--images", corridor, "--geotags", "none", *MODEL)
    message = error("map", "query", out, corridor / "1.jpg", "--random-weights", "--seed", "1", "--device", "cpu")
    assert "was built with model dmx-" in message and "descriptors of different models are not comparable" in message
    assert f"{out} already holds a map; pass --append" in error(
        "map", "build", out, "--images", corridor, *MODEL)
    assert "no map at" in error("map", "info", tmp_path / "nothing.dinomap")
    assert "holds 4 images" in error("map", "eval", "--images", corridor, "--loop-gt",
                                     DATA / "rtabmap_corridor" / "samples_GT.bmp", "--out", tmp_path / "ev", *MODEL)
