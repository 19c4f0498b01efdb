"""Issue 16: a keyframe whose keypoints were moved onto one pixel, a line, a tiny patch or far outside the image
still passed verification (a fundamental matrix fitted to such matches explains every one of them). The configuration
checks after model fitting reject it with the reason, through verify_pair and through LiveMap.process on a map whose
feature rows were recorded that way, and LiveMap.stats() counts it (``verification_degenerate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor, LocalFeatures
from dinomix_ros.localization.inlier_spread import spread_problem
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig, verify_pair
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import KeyframeGateConfig

DATA = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"
CAMERA = CameraModel(512, 384, np.array([[420.0, 0, 256], [0, 420.0, 192], [0, 0, 1]]))  # assumed intrinsics
NS = 1_000_000_000
T0 = 1_700_000_000 * NS
FINGERPRINT = {"id": "dmx-thumbs", "architecture": "thumbnail_32x24", "weights_sha256": "0" * 64,
               "preprocessing": "gray 32x24", "descriptor_dim": 768}


def _edit(features: LocalFeatures, how: str) -> LocalFeatures:
    """The same features with their keypoints moved (descriptors untouched: every match survives)."""
    kp = features.keypoints.astype(np.float64)
    if how == "point":
        kp = np.tile([200.0, 150.0], (len(kp), 1))
    elif how == "line":
        kp = np.c_[kp[:, 0], 40.0 + 0.5 * kp[:, 0]]
    elif how == "patch":  # a 12-pixel patch
        kp = 250.0 + 12.0 * (kp - kp.min(axis=0)) / np.ptp(kp, axis=0)
    elif how == "outside":
        kp = kp + 5000.0
    return dataclasses.replace(features, keypoints=kp.astype(np.float32))


@pytest.fixture(scope="module")
def frames() -> list[LocalFeatures]:
    ex = FeatureExtractor()
    return [ex.extract(cv2.imread(str(DATA / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE)) for i in range(1, 41)]


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("how", ["point", "line", "patch", "outside"])
def test_verify_pair_rejects_a_degenerate_keyframe_with_the_reason(frames, how, calibrated) -> None:
    cams = (CAMERA, CAMERA) if calibrated else (None, None)
    query, keyframe = frames[29], frames[28]  # consecutive frames: a true pair
    honest = verify_pair(query, keyframe, VerificationConfig(), *cams)
    assert honest.passed and not honest.degenerate
    stored = dataclasses.replace(_edit(keyframe, how), image_size=(0, 0))  # as a map row loads: size unknown
    edited = verify_pair(query, stored, VerificationConfig(), *cams)
    assert not edited.passed
    assert edited.degenerate.startswith("keyframe"), edited.degenerate
    if how == "outside":
        assert "outside" in edited.degenerate
    # the query side is checked too: a query whose keypoints sit on one point
    flat = verify_pair(_edit(query, "point"), keyframe, VerificationConfig(), *cams)
    assert not flat.passed
    assert flat.degenerate.startswith("query"), flat.degenerate


def test_spread_problem_measures() -> None:
    rng = np.random.default_rng(0)
    spread = rng.uniform([0, 0], [640, 480], (200, 2))
    assert spread_problem(spread, (640, 480), (640, 480), "query") == ""
    assert "line" in spread_problem(np.c_[spread[:, 0], 0.3 * spread[:, 0]], (640, 480), (640, 480), "query")
    assert "patch" in spread_problem(300 + spread / 40, (640, 480), (640, 480), "query")
    assert "concentrated" in spread_problem(np.r_[spread[:60], np.tile([[320.0, 240.0]], (140, 1))], (640, 480),
                                            (640, 480), "query")
    assert "outside the image" in spread_problem(spread + [700, 0], (640, 480), (640, 480), "keyframe")
    # unknown size: the query's image is the reference, and only far beyond it is "outside"
    assert spread_problem(spread + [700, 0], None, (640, 480), "keyframe") == ""
    assert "plausible image" in spread_problem(spread + [6000, 0], None, (640, 480), "keyframe")
    assert "non-finite" in spread_problem(np.r_[spread, [[np.nan, 1.0]]], (640, 480), (640, 480), "query")


def _descriptor(features: LocalFeatures, i: int) -> np.ndarray:
    """A unit 768-d appearance descriptor that makes keyframe i the best candidate of the same frame (one-hot-ish)."""
    d = np.full(768, 0.01, np.float32)
    d[i] = 1.0
    return d / np.linalg.norm(d)


@pytest.mark.parametrize("calibrated", [False, True])
def test_live_map_rejects_and_counts_degenerate_keyframes(frames, calibrated) -> None:
    """A map recorded with the package's own API whose rows 10-13 were recorded with edited keypoints (one pixel, a
    line, a patch, far outside): queried with those frames, the edited keyframes are rejected with the reason and
    counted; an honest neighbour is accepted instead, or nothing."""
    edits = {10: "point", 11: "line", 12: "patch", 13: "outside"}
    live = LiveMap(KeyframeMap.empty(FINGERPRINT), matcher=MatcherConfig(min_similarity=-1.0, top_k=3),
                   gate=KeyframeGateConfig(min_distance_m=0.1, min_rotation_deg=0.0), has_pose_source=True,
                   features=FeatureConfig())
    if calibrated:
        live.set_camera_model("cam", CAMERA)
    live.start_recording()
    for i, f in enumerate(frames):
        pose = PoseSample(T0 + i * NS, "map", np.array([float(i), 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
        recorded = _edit(f, edits[i]) if i in edits else f
        assert live.process("cam", T0 + i * NS, _descriptor(f, i), pose, features=recorded).recorded
    live.stop_recording()
    before = live.stats()["verification_degenerate"]
    for n, (i, how) in enumerate(edits.items()):
        outcome = live.process("cam", T0 + (100 + n) * NS, _descriptor(frames[i], i), None, features=frames[i])
        edited = [c for c in outcome.result.candidates if c.row == i]
        assert edited and edited[0].verification is not None, how
        v = edited[0].verification
        assert not v.passed and v.degenerate.startswith("keyframe"), (how, v)
        if outcome.result.accepted:
            assert outcome.result.best.row != i
    assert live.stats()["verification_degenerate"] - before >= len(edits)


def test_hostile_keypoints_never_raise(frames) -> None:
    """Whatever the keypoints (duplicates, two points, huge or negative coordinates, random, one column at the edge),
    with or without (fisheye) intrinsics and depths, verification returns a result, rejected, and does not raise
    (the node's worker would lose the frame)."""
    from dinomix_ros.imaging.camera import CameraModel as Cam

    fisheye = Cam(512, 384, np.array([[180.0, 0, 256], [0, 180.0, 192], [0, 0, 1]]), "equidistant",
                  np.array([0.01, -0.02, 0.005, 0.0]))
    query, keyframe = frames[29], frames[28]
    rng = np.random.default_rng(0)
    n = len(keyframe)
    hostile = {
        "duplicates": np.repeat(keyframe.keypoints[:8], n // 8 + 1, axis=0)[:n],
        "two points": np.where(np.arange(n)[:, None] % 2 == 0, [10.0, 10.0], [500.0, 380.0]),
        "huge": keyframe.keypoints * 1e4,
        "negative": keyframe.keypoints - 1e3,
        "random": rng.uniform(0, 512, (n, 2)),
        "edge": np.c_[np.full(n, 511.9), rng.uniform(0, 384, n)],
    }
    for name, kp in hostile.items():
        edited = dataclasses.replace(keyframe, keypoints=np.asarray(kp, np.float32), image_size=(0, 0))
        for cams in ((None, None), (CAMERA, CAMERA), (fisheye, fisheye)):
            for depth in (False, True):
                kf = dataclasses.replace(edited, depths=np.full(n, 2.5 if depth else np.nan, np.float32))
                v = verify_pair(query, kf, VerificationConfig(), *cams)
                assert not v.passed, (name, cams[0], depth, v)
