"""``dinomix map query`` verifies its candidates as the node does: the same candidates, inliers, order and verified
pose prior as the node's LiveMap on the same map, descriptors and features; the --verification-* flags change the
result; maps without local features and a mismatched calibration are handled with a clear word."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cliutil import DATA, MODEL, run, run_error, run_json

from dinomix_ros.cli.main import main
from dinomix_ros.imaging.camera import camera_from_info_yaml
from dinomix_ros.imaging.decode import read_image_file
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor, to_gray
from dinomix_ros.localization.camera_pose import VerifiedPriorConfig
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.loading import load_map

CORRIDOR = DATA / "rtabmap_corridor" / "samples"
CALIBRATION = DATA / "posed_pairs" / "cameras" / "corridor_assumed.yaml"
QUERIES = {"41.jpg": "1.jpg", "57.jpg": "17.jpg"}  # revisits and the first-pass image they revisit


@pytest.fixture(scope="module")
def posed_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four first-pass corridor images with x/y/yaw poses and the (assumed) intrinsics, built into a map once for the
    module (each test then runs a few commands: every command loads the model, which is slow on a loaded machine)."""
    root = tmp_path_factory.mktemp("query_verified")
    db = root / "db"
    db.mkdir()
    rows = ["image,x,y,yaw"]
    for k, i in enumerate((1, 9, 17, 25)):
        shutil.copy(CORRIDOR / f"{i}.jpg", db / f"{i}.jpg")
        rows.append(f"{i}.jpg,{2.0 * k},{0.5 * k},{0.1 * k}")
    (db / "poses.csv").write_text("\n".join(rows) + "\n")
    assert main(["map", "build", str(root / "m.dinomap"), "--images", str(db), "--geotags", "csv", "--calibration",
                 str(CALIBRATION), *MODEL]) == 0
    return root / "m.dinomap"


def _query(capsys: pytest.CaptureFixture, m: Path, *flags: str | Path) -> dict:
    """The best candidate of the revisit 41.jpg."""
    return run_json(capsys, "map", "query", m, CORRIDOR / "41.jpg", "--top-k", "4", *flags, *MODEL)


def test_query_verifies_its_candidates_as_the_node_does(
        posed_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    queries = [CORRIDOR / name for name in QUERIES]
    result = run_json(capsys, "map", "query", posed_map, *queries, "--top-k", "4", "--calibration", CALIBRATION,
                      *MODEL)
    info = result["verification"]
    assert info["enabled"] and info["query_intrinsics"] and info["keyframe_intrinsics"] == ["images"]
    assert info["features"] == {"type": "orb", "max_features": FeatureConfig().max_features, "max_image_side": 640}

    # the node on the same map, descriptors and features
    assert run(capsys, "describe", *queries, "--out", tmp_path / "q.npy", *MODEL)[0] == 0
    descriptors = np.load(tmp_path / "q.npy")
    live = LiveMap(load_map(posed_map), matcher=MatcherConfig(top_k=4))
    live.set_camera_model("query_cam", camera_from_info_yaml(CALIBRATION))
    extractor = FeatureExtractor()
    cases = []
    for entry, desc, path in zip(result["queries"], descriptors, queries):
        cands = entry["candidates"]
        best = cands[0]
        assert best["source"].endswith(QUERIES[path.name]) and best["verification"]["verified"]
        assert best["verification"]["model"] in ("essential", "homography", "rotation")
        assert best["verification"]["inliers"] >= VerificationConfig().min_inliers
        assert sorted(c["similarity_rank"] for c in cands) == [0, 1, 2, 3]
        # verified, with intrinsics but no depth: position the keyframe's, orientation corrected by the verified
        # rotation, or, where two motions explain the matches (a plane's solutions that disagree), the keyframe's
        # (README table: rotation / keyframe case)
        pose, relative = best["pose"], best["relative_pose"]
        assert pose["case"] == relative["case"] and pose["frame_id"] == "map"
        assert pose["position"] == pytest.approx(best["position"], abs=1e-9)
        cases.append(pose["case"])
        if pose["case"] == "rotation":
            assert pose["covariance_diagonal"][0] == pytest.approx(VerifiedPriorConfig().no_depth_sigma_m ** 2)
            assert abs(np.dot(pose["orientation"], best["orientation"])) < 1 - 1e-6  # turned by the rotation
        else:
            assert pose["case"] == "keyframe" and best["verification"]["model"] == "homography"
            assert pose["orientation"] == pytest.approx(best["orientation"], abs=1e-9)
            assert pose["covariance_diagonal"][0] >= VerifiedPriorConfig().no_depth_sigma_m ** 2
        for other in cands[1:]:
            assert other["verification"] is None or not other["verification"]["verified"] or other["pose"]

        features = extractor.extract(to_gray(*read_image_file(path)))
        outcome = live.process("query_cam", 10**18, desc, features=features)
        node = outcome.result.candidates
        assert [c.keyframe_id for c in node] == [c["keyframe_id"] for c in cands]
        assert [c.inliers for c in node] == [0 if c["verification"] is None else c["verification"]["inliers"]
                                             for c in cands]
        assert outcome.prior_case == pose["case"]
        assert outcome.result.prior.position.tolist() == pytest.approx(pose["position"], abs=1e-9)
        assert outcome.result.prior.orientation.tolist() == pytest.approx(pose["orientation"], abs=1e-7)
        assert np.diag(outcome.result.prior.covariance).tolist() == pytest.approx(pose["covariance_diagonal"], abs=1e-9)
    assert "rotation" in cases, cases  # 41.jpg turned 13 degrees from 1.jpg: a determined rotation


def test_verification_flags_change_the_result(posed_map: Path, capsys: pytest.CaptureFixture) -> None:
    strict = _query(capsys, posed_map, "--calibration", CALIBRATION, "--verification-min-inliers", "100000")
    assert strict["verification"]["settings"]["min_inliers"] == 100000
    cands = strict["queries"][0]["candidates"]
    assert not any(c["verification"]["verified"] for c in cands) and not any("pose" in c for c in cands)
    assert max(c["verification"]["matches"] for c in cands) >= 30  # putative matches, too few for the rule: no fit
    few = _query(capsys, posed_map, "--calibration", CALIBRATION, "--verification-candidates", "1")
    assert sum(c["verification"] is not None for c in few["queries"][0]["candidates"]) == 1


def test_the_camera_mount_changes_the_pose_not_the_verification(
        posed_map: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    default = _query(capsys, posed_map, "--calibration", CALIBRATION)["queries"][0]["candidates"][0]
    level = _query(capsys, posed_map, "--calibration", CALIBRATION, "--camera-mount-roll", "0",
                   "--camera-mount-yaw", "0")["queries"][0]["candidates"][0]  # optical axes = the base's
    assert default["verification"] == {**level["verification"], "seconds": default["verification"]["seconds"]}
    assert default["pose"]["position"] == level["pose"]["position"]  # the rotation case keeps the keyframe's
    assert abs(np.dot(default["pose"]["orientation"], level["pose"]["orientation"])) < 1 - 1e-6
    assert run_error(capsys, caplog, "map", "query", posed_map, CORRIDOR / "41.jpg", "--camera-mount-x", "500",
                     *MODEL) == "--camera-mount-x must be <= 100, got 500.0"


def test_without_intrinsics_or_verification(posed_map: Path, capsys: pytest.CaptureFixture) -> None:
    plain = _query(capsys, posed_map)  # no query intrinsics: the fundamental matrix, the keyframe's pose
    best = plain["queries"][0]["candidates"][0]
    assert plain["verification"]["query_intrinsics"] is False
    assert best["verification"]["model"] == "fundamental" and "relative_pose" not in best
    assert best["pose"]["case"] == "keyframe" and best["pose"]["position"] == pytest.approx(best["position"])
    off = _query(capsys, posed_map, "--no-verification-enabled")
    assert off["verification"]["enabled"] is False and "verification" not in off["queries"][0]["candidates"][0]


def test_a_map_without_features_and_a_calibration_of_another_size(
        posed_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    bare = tmp_path / "bare.dinomap"
    run_json(capsys, "map", "build", bare, "--images", posed_map.parent / "db", "--geotags", "csv",
             "--features-max-features", "0", *MODEL)
    assert "no local features" in _query(capsys, bare)["verification"]["note"]
    other = tmp_path / "other.yaml"
    other.write_text(CALIBRATION.read_text().replace("image_width: 512", "image_width: 640"))
    query = CORRIDOR / "41.jpg"
    message = run_error(capsys, caplog, "map", "query", posed_map, query, "--calibration", other, *MODEL)
    assert message == f"--calibration describes 640x384 images, {query} is 512x384; give the calibration of the " \
                      "camera that took it"
