"""The live map with geometric verification, on the real corridor: record the first pass with local features, then
revisit it: only verified matches are accepted, candidates are re-ranked, priors say how they were made; maps without
local features keep working with verification off."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth
from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.maps.loading import load_map

DATA = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor"
NS = 1_000_000_000
T0 = 1_700_000_000 * NS
DIM = 768
FINGERPRINT = {"id": "dmx-thumbs", "architecture": "thumbnail_32x24", "weights_sha256": "0" * 64,
               "preprocessing": "gray 32x24", "descriptor_dim": DIM}
CAMERA = CameraModel(512, 384, np.array([[420.0, 0, 256], [0, 420.0, 192], [0, 0, 1]]))  # assumed intrinsics


def _thumbnail(gray: np.ndarray) -> np.ndarray:
    """A 768-d appearance descriptor (32x24 thumbnail, mean removed, unit norm): weak, like random weights."""
    x = cv2.resize(gray, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    x -= x.mean()
    return (x / np.linalg.norm(x)).astype(np.float32)


@pytest.fixture(scope="module")
def corridor() -> list[tuple[np.ndarray, object]]:
    ex = FeatureExtractor()
    frames = [cv2.imread(str(DATA / "samples" / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE) for i in range(1, 85)]
    return [(_thumbnail(g), ex.extract(g)) for g in frames]


def _pose(i: int) -> PoseSample:
    return PoseSample(T0 + i * NS, "map", np.array([float(i), 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))


def _recorded_first_pass(corridor, **kwargs) -> LiveMap:
    live = LiveMap(KeyframeMap.empty(FINGERPRINT), matcher=MatcherConfig(min_similarity=-1.0, top_k=5),
                   gate=KeyframeGateConfig(min_distance_m=0.5, min_rotation_deg=0.0), has_pose_source=True,
                   features=FeatureConfig(), **kwargs)
    live.start_recording()
    for i in range(40):
        desc, feats = corridor[i]
        assert live.process("cam", T0 + i * NS, desc, _pose(i), features=feats).recorded
    live.stop_recording()
    return live


def test_revisits_are_accepted_only_when_verified(corridor) -> None:
    live = _recorded_first_pass(corridor)
    assert live.verifying and len(live.kmap.local_features) == 40
    gt = load_loop_closure_ground_truth(DATA / "samples_GT.bmp")
    before = live.stats()  # the first pass was matched too (against its own past keyframes)
    accepted = correct = reranked = 0
    for i in range(40, 80):
        desc, feats = corridor[i]
        outcome = live.process("cam", T0 + (100 + i) * NS, desc, None, features=feats)
        result = outcome.result
        best = result.best
        assert [c.rank for c in result.candidates] == list(range(len(result.candidates)))
        assert best.verification is not None  # the best is always one of the verified candidates
        reranked += best.row != max(result.candidates, key=lambda c: c.similarity).row
        if result.accepted:
            assert best.verified and "verification" not in result.rejected_by
            assert outcome.publish_loop_closure  # to a keyframe recorded in this run (scope: session)
            assert outcome.publish_prior and outcome.prior_case == "keyframe"  # no intrinsics: keyframe pose
            accepted += 1
            correct += bool(gt[i, best.row])
        else:
            assert "verification" in result.rejected_by
            assert not outcome.publish_loop_closure and not outcome.publish_prior
    assert accepted >= 25 and correct / accepted >= 0.95, (accepted, correct)
    assert reranked >= 5  # re-ranking changed the best candidate of several revisits
    stats = live.stats()
    verified = stats["verified_matches"] - before["verified_matches"]
    rejected = stats["verification_rejected"] - before["verification_rejected"]
    assert stats["verification"] == "on" and verified == accepted and verified + rejected == 40
    assert stats["verification_p50_ms"] > 0 and stats["verification_p95_ms"] >= stats["verification_p50_ms"]


def test_with_intrinsics_the_prior_rotation_is_corrected_and_intrinsics_are_stored(corridor, tmp_path) -> None:
    live = LiveMap(KeyframeMap.empty(FINGERPRINT), matcher=MatcherConfig(min_similarity=-1.0),
                   gate=KeyframeGateConfig(min_distance_m=0.5, min_rotation_deg=0.0), has_pose_source=True,
                   features=FeatureConfig())
    live.start_recording()
    live.set_camera_model("cam", CAMERA)
    for i in range(40):
        live.process("cam", T0 + i * NS, corridor[i][0], _pose(i), features=corridor[i][1])
    live.stop_recording()
    assert live.kmap.local_features.intrinsics == {"cam": CAMERA}
    outcomes = [live.process("cam", T0 + (100 + i) * NS, corridor[i][0], None, features=corridor[i][1])
                for i in range(40, 80)]
    cases = [o.prior_case for o in outcomes]
    # the verified rotation corrects the orientation, or, where two motions explain the matches (the corridor's
    # walls are planes; a plane seen without depth has two solutions), no orientation is claimed: the keyframe's
    # pose (README table). Measured 2026-12-06 (accepted: rotation / ambiguous): 30: 13 / 17 with 400 features,
    # 29: 20 / 9 with 1000 and min_inliers 45 (the intrinsics are assumed, not calibrated)
    assert cases.count("rotation") >= 10 and set(cases) <= {"rotation", "keyframe"}, cases
    for o in outcomes:
        if o.result.accepted and o.prior_case == "keyframe":
            assert o.result.best.verified and o.result.best.verification.ambiguous, o.result.best.verification
    live.save(tmp_path / "m")
    loaded = load_map(tmp_path / "m")
    assert loaded.local_features.intrinsics == {"cam": CAMERA} and len(loaded.local_features) == 40


def test_a_frame_without_features_is_not_accepted_by_a_verifying_map(corridor) -> None:
    live = _recorded_first_pass(corridor)
    outcome = live.process("cam", T0 + 500 * NS, corridor[40][0], None, features=None)
    assert not outcome.result.accepted and "verification" in outcome.result.rejected_by
    off = _recorded_first_pass(corridor, verification=VerificationConfig(enabled=False))
    assert not off.verifying and off.stats()["verification"] == "off"
    assert off.process("cam", T0 + 500 * NS, corridor[40][0], None).result.accepted  # appearance alone


def test_a_map_without_local_features_runs_with_verification_off(corridor, tmp_path, caplog) -> None:
    kmap = KeyframeMap.empty(FINGERPRINT)  # what a format 1 map loads as: no local-feature store
    kmap.add(np.stack([corridor[i][0] for i in range(40)]), stamps_ns=T0 + np.arange(40) * NS, cameras="cam",
             frame_ids="map", positions=np.c_[np.arange(40.0), np.zeros((40, 2))])
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.localization.live_map"):
        live = LiveMap(kmap, matcher=MatcherConfig(min_similarity=-1.0), features=FeatureConfig())
    assert "no local features" in caplog.text and "verification is OFF" in caplog.text
    assert not live.verifying and live.stats()["verification"] == "off: the map has no local features"
    outcome = live.process("cam", T0 + 200 * NS, corridor[45][0], None, features=corridor[45][1])
    assert outcome.result.accepted and outcome.result.best.verification is None
    assert outcome.result.best.inliers == 0 and np.isnan(outcome.result.best.verified_score)


def test_keyframes_with_depth_give_metric_priors_of_the_robot(data_dir) -> None:
    """A keyframe recorded with an aligned depth image (a textured plane 3 m away), then the camera moves by a known
    motion (the photo warped accordingly): the prior is the robot's new pose, metric, not the keyframe's."""
    import math

    from dinomix_ros.localization.camera_pose import CameraMountConfig, rpy_to_matrix
    from dinomix_ros.localization.verification import rotation_angle_deg
    from dinomix_ros.maps.sources.poses import quat_to_matrix

    img = cv2.imread(str(data_dir / "lund_gps" / "images" / "12.jpg"), cv2.IMREAD_GRAYSCALE)
    h, w = img.shape
    f = 0.55 * w
    cam = CameraModel(w, h, np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]))
    d, tilt = 3.0, 0.4
    n = np.array([math.sin(tilt), 0.0, math.cos(tilt)])
    R, t = rpy_to_matrix(0.01, 0.04, -0.03), np.array([0.5, 0.1, 0.4])  # camera motion: X_q = R X_k + t
    query = cv2.warpPerspective(img, cam.K @ (R + np.outer(t, n) / d) @ np.linalg.inv(cam.K), (w, h))
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    depth_mm = (1000 * d / (((u - w / 2) / f) * n[0] + n[2])).astype(np.uint16)  # a 16UC1 depth image
    ex = FeatureExtractor()
    descriptor = _thumbnail(img)
    live = LiveMap(KeyframeMap.empty(FINGERPRINT), matcher=MatcherConfig(min_similarity=-1.0),
                   has_pose_source=True, features=FeatureConfig())
    live.set_camera_model("cam", cam)
    live.start_recording()
    yaw = 0.3
    heading = np.array([0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)])
    kf_pose = PoseSample(T0, "map", np.array([2.0, 1.0, 0.0]), heading)
    assert live.process("cam", T0, descriptor, kf_pose, features=ex.extract(img, depth_mm)).recorded
    live.stop_recording()
    outcome = live.process("cam", T0 + 10 * NS, descriptor, None, features=ex.extract(query))
    assert outcome.result.accepted and outcome.publish_prior and outcome.prior_case == "metric"
    T_map_kf = np.eye(4)
    T_map_kf[:3, :3], T_map_kf[:3, 3] = quat_to_matrix(kf_pose.orientation), kf_pose.position
    T_base_cam = CameraMountConfig().matrix()
    T_q_k = np.eye(4)
    T_q_k[:3, :3], T_q_k[:3, 3] = R, t
    expected = T_map_kf @ T_base_cam @ np.linalg.inv(T_q_k) @ np.linalg.inv(T_base_cam)
    prior = outcome.result.prior
    assert np.linalg.norm(prior.position - expected[:3, 3]) < 0.05 * np.linalg.norm(t)
    assert rotation_angle_deg(quat_to_matrix(prior.orientation) @ expected[:3, :3].T) < 1.0
    assert np.linalg.norm(expected[:3, 3] - kf_pose.position) > 0.5  # the robot moved: not the keyframe's pose
    assert 0.05 ** 2 <= prior.covariance[0, 0] < 0.2 ** 2  # metric: a few cm, not no_depth_sigma_m
    # the loop-closure constraint: the robot's motion in the keyframe's base frame
    motion = np.linalg.inv(T_map_kf) @ expected
    assert outcome.relative is not None and outcome.relative.case == "metric"
    assert np.linalg.norm(outcome.relative.T[:3, 3] - motion[:3, 3]) < 0.05 * np.linalg.norm(t)
