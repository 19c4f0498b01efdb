"""``dinomix map {build,info,topics,query}`` (and a bag build evaluated and calibrated by ``map eval``) run in-process
through dinomix_ros.cli.main, with random weights.

Seeded random weights make every score meaningless, so the checks are about plumbing: JSON on stdout, files
written, counts, an image finding itself, calibration stored in the map, and errors ending with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bagfactory import Motion, photo_frames, write_camera_bag
from cliutil import MODEL, run, run_error, run_json

from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.maps.loading import load_map


def test_build_info_query_from_a_folder(tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture) -> None:
    corridor = corridor_subset
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
    assert best["similarity"] == pytest.approx(1.0, abs=1e-3) and best["similarity"] <= 1.0  # float16, clamped
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
    kmap = load_map(out)
    np.testing.assert_array_equal(kmap.stamps_ns, bag.image_stamps_ns[[0, 2, 4]])
    np.testing.assert_allclose(kmap.positions[:, 0], [0.0, 0.6, 1.2], atol=1e-9)
    assert kmap.frames == ["odom"] and set(kmap.utm_zones.tolist()) == {33}

    # Every frame as a query; with a 0.1 m radius only the three keyframes have a positive: themselves.
    eval_dir = tmp_path / "eval"
    summary = run_json(capsys, "map", "eval", "--map", out, "--bag", bag.path, "--image-topic", "/camera/image_raw",
                       "--pose-topic", "/odom", "--radius-m", "0.1", "--out", eval_dir, "--calibrate", out,
                       "--min-positives", "3", *MODEL)
    # 3 keyframes: only R@1 says something (R@5 and above would hold the whole map)
    assert summary["recall"] == {"recalls": {"1": 1.0}, "num_queries": 3, "num_without_positives": 3}
    assert summary["note"] == "random weights: scores are meaningless" and summary["num_queries"] == 6
    full = json.loads((eval_dir / "report.json").read_text())
    assert full["frame"] == "odom" and full["skipped"]["no_pose"] == 0
    assert [q["correct"] for q in full["queries_detail"]] == [True, False] * 3
    assert all((eval_dir / name).stat().st_size > 1000 for name in ("recall.png", "pr.png"))
    threshold = summary["calibration"]["min_similarity"]
    assert threshold is not None and threshold > 0.99  # the keyframes find themselves at ~1.0
    calibration = read_manifest(out)["metadata"]["calibration"]
    assert calibration["min_similarity"] == threshold and calibration["target_precision"] == 0.95
    assert calibration["correct_matches"] == 3 and summary["calibration"]["min_positives"] == 3
    assert calibration["setup"] == "bag" and calibration["note"].startswith("random weights")
    assert calibration["report"] == str(eval_dir / "report.json")
    assert read_manifest(out)["files"]["index"]["kind"] == "faiss_hnsw_ip"  # calibrating kept the stored index

    appended = run_json(capsys, "map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw",
                        "--pose-topic", "/odom", "--append", *MODEL)
    assert appended["keyframes"] == 6 and appended["report"]["added"] == 3
    meta = read_manifest(out)["metadata"]
    assert len(meta["builds"]) == 2 and "calibration" in meta  # an append keeps the metadata


def test_map_errors_exit_2_with_a_clear_message(tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture,
                                                caplog: pytest.LogCaptureFixture) -> None:
    corridor = corridor_subset
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2))
    out = tmp_path / "m.dinomap"

    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

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
    # A value a setting refuses is reported with the flag's name, before the model loads.
    assert error("map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw", "--pose-topic", "/odom",
                 "--pose-max-gap-s", "61", *MODEL) == "--pose-max-gap-s must be <= 60, got 61.0"
    assert error("map", "build", out, "--bag", bag.path, "--image-topic", "/camera/image_raw", "--pose-topic", "/odom",
                 "--min-distance-m", "-1", *MODEL) == "--min-distance-m must be >= 0, got -1.0"
    assert not out.exists()

    run_json(capsys, "map", "build", out, "--images", corridor, "--geotags", "none", "--storage-dtype", "float32",
             *MODEL)
    assert read_manifest(out)["descriptor_dtype"] == "float32"
    message = error("map", "query", out, corridor / "1.jpg", "--random-weights", "--seed", "1", "--device", "cpu")
    assert "was built with model dmx-" in message and "descriptors of different models are not comparable" in message
    assert error("map", "query", out, corridor / "1.jpg", "--top-k", "0", *MODEL) == "--top-k must be >= 1, got 0"
    assert f"{out} already holds a map; pass --append" in error(
        "map", "build", out, "--images", corridor, *MODEL)
    assert "no map at" in error("map", "info", tmp_path / "nothing.dinomap")


def test_build_with_images_and_poses_from_two_bags(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    frames = photo_frames(6)
    motion = Motion(velocity=(1.5, 0.0, 0.0))
    camera = write_camera_bag(tmp_path / "camera", frames=frames, image_format="jpeg", motion=motion, pose_kind=None)
    rest = write_camera_bag(tmp_path / "rest", frames=frames, image_topics=("/unused",), motion=motion,
                            gps_topic="/gps/fix")
    built = run_json(capsys, "map", "build", tmp_path / "two.dinomap", "--bag", camera.path, "--pose-bag", rest.path,
                     "--image-topic", "/camera/image_raw", "--pose-topic", "/odom", "--gps-topic", "/gps/fix",
                     *MODEL)
    assert (built["report"]["images_seen"], built["report"]["added"], built["report"]["no_pose"]) == (6, 3, 0)
    kmap = load_map(tmp_path / "two.dinomap")
    np.testing.assert_allclose(kmap.positions[:, 0], [0.0, 0.6, 1.2], atol=1e-9)
    assert set(kmap.utm_zones.tolist()) == {33}
    build = read_manifest(tmp_path / "two.dinomap")["metadata"]["builds"][0]["config"]
    assert (build["bag"], build["pose_bag"]) == (str(camera.path), str(rest.path))

    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

    assert f"pose topic /odom is not in the bag {camera.path}" in error(
        "map", "build", tmp_path / "one.dinomap", "--bag", camera.path, "--image-topic", "/camera/image_raw",
        "--pose-topic", "/odom", *MODEL)
    assert error("map", "build", tmp_path / "one.dinomap", "--images", tmp_path, "--pose-bag", rest.path,
                 *MODEL) == "--pose-bag does not apply to --images (they are bag options)"


def test_messages_about_files_that_are_not_what_was_asked(tmp_path: Path, corridor_subset: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

    image = corridor_subset / "1.jpg"
    assert error("map", "info", image) == \
        f"no map at {image}: it is a file, but a map is a directory holding manifest.json"  # its folder is no map
    run_json(capsys, "map", "build", tmp_path / "m.dinomap", "--images", corridor_subset, "--geotags", "none", *MODEL)
    assert error("map", "info", tmp_path / "m.dinomap" / "manifest.json").endswith(
        f"(pass the map directory {tmp_path / 'm.dinomap'})")
    nested = tmp_path / "nested"
    (nested / "run1").mkdir(parents=True)
    (nested / "run1" / "a.jpg").write_bytes(image.read_bytes())
    message = error("map", "build", tmp_path / "n.dinomap", "--images", nested, *MODEL)
    assert message.endswith(f"; sub-folders are not searched, and {nested / 'run1'} holds images: pass it")
    assert "recursive" not in message
    (tmp_path / "notes.ckpt").write_text("these are my notes\n")
    assert error("model", "info", tmp_path / "notes.ckpt") == (
        f"{tmp_path / 'notes.ckpt'} is not a weights file: it is a text file starting 'these are my notes'; expected "
        "a PyTorch checkpoint (.ckpt/.pth written by torch.save) or a .safetensors file. Check the path")
