"""Every camera in its place: the live map with several cameras, each with its own extrinsic (by image frame_id) and
intrinsics fitted to its images, and camera records stored per keyframe (a changed camera gets a new version).

Scenes are a real photo (Lund) seen as a textured plane; the query is that photo warped by a known camera motion,
so the robot's true pose is known independently of the code under test."""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import pytest

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.camera_pose import CameraMountConfig, rpy_to_matrix
from dinomix_ros.localization.extrinsics import CameraExtrinsics
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.localization.verification import VerificationConfig, rotation_angle_deg, verify_pair
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import quat_to_matrix
from dinomix_ros.maps.loading import load_map

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
DIM = 768
FINGERPRINT = {"id": "dmx-thumbs", "architecture": "thumbnail_32x24", "weights_sha256": "0" * 64,
               "preprocessing": "gray 32x24", "descriptor_dim": DIM}


def mount(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """T_base_cam of an optical frame at (x, y, z) looking along the base's heading ``yaw`` (level)."""
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(-math.pi / 2, 0.0, yaw - math.pi / 2)
    T[:3, 3] = (x, y, z)
    return T


FRONT, REAR, SIDE = mount(1.0, 0.0, 0.5, 0.0), mount(-1.0, 0.0, 0.6, math.pi), mount(0.2, 0.4, 0.7, math.pi / 2)
EXTRINSICS = {"front_optical": FRONT, "rear_optical": REAR, "left_optical": SIDE}


def _thumbnail(gray: np.ndarray) -> np.ndarray:
    x = cv2.resize(gray, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    x -= x.mean()
    return (x / np.linalg.norm(x)).astype(np.float32)


def _pose_matrix(p: PoseSample) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = quat_to_matrix(p.orientation), p.position
    return T


def _matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


class Plane:
    """A photo as a textured plane in front of a camera, its depth image, and views after a known camera motion."""

    def __init__(self, data_dir, size: tuple[int, int] = (640, 480)) -> None:
        img = cv2.imread(str(data_dir / "lund_gps" / "images" / "12.jpg"), cv2.IMREAD_GRAYSCALE)
        self.image = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        w, h = size
        f = 0.55 * w
        self.camera = CameraModel(w, h, np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]))
        self.d, tilt = 3.0, 0.4
        self.n = np.array([math.sin(tilt), 0.0, math.cos(tilt)])
        u = np.arange(w)[None, :].repeat(h, axis=0)
        self.depth_mm = (1000 * self.d / (((u - w / 2) / f) * self.n[0] + self.n[2])).astype(np.uint16)

    def view(self, R: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The image after the camera motion X_q = R X_k + t."""
        K = self.camera.K
        w, h = self.camera.width, self.camera.height
        return cv2.warpPerspective(self.image, K @ (R + np.outer(t, self.n) / self.d) @ np.linalg.inv(K), (w, h))


def _live(extrinsics: CameraExtrinsics | None = None) -> LiveMap:
    return LiveMap(KeyframeMap.empty(FINGERPRINT), matcher=MatcherConfig(min_similarity=-1.0), has_pose_source=True,
                   features=FeatureConfig(), extrinsics=extrinsics)


def test_a_rear_keyframe_matched_by_the_front_and_side_cameras_gives_the_robots_pose(data_dir) -> None:
    plane = Plane(data_dir)
    ex = FeatureExtractor()
    live = _live(CameraExtrinsics(CameraMountConfig().matrix(), EXTRINSICS))
    for topic in ("/rear/image", "/front/image", "/left/image"):
        live.set_camera_model(topic, plane.camera)
    kf_pose = PoseSample(T0, "map", np.array([5.0, 2.0, 0.0]), np.array([0.0, 0.0, math.sin(0.4), math.cos(0.4)]))
    live.start_recording()
    recorded = live.process("/rear/image", T0, _thumbnail(plane.image), kf_pose,
                            features=ex.extract(plane.image, plane.depth_mm), frame_id="rear_optical")
    assert recorded.recorded
    live.stop_recording()
    record = live.kmap.local_features.cameras["/rear/image"]
    assert record.frame_id == "rear_optical" and record.size == (640, 480)
    np.testing.assert_allclose(record.T_base_cam, REAR)

    R, t = rpy_to_matrix(0.02, 0.05, -0.04), np.array([0.3, 0.05, 0.4])  # the query camera's motion
    view = plane.view(R, t)
    T_map_kf = _pose_matrix(kf_pose)
    queries = (("/front/image", "front_optical", FRONT), ("/left/image", "left_optical", SIDE))
    for i, (topic, frame, T_cam) in enumerate(queries, start=1):
        outcome = live.process(topic, T0 + 10 * i * NS, _thumbnail(view), None, features=ex.extract(view),
                               frame_id=frame)
        assert outcome.result.accepted and outcome.prior_case == "metric", outcome.result.rejected_by
        truth = T_map_kf @ REAR @ np.linalg.inv(_matrix(R, t)) @ np.linalg.inv(T_cam)
        prior = outcome.result.prior
        assert np.linalg.norm(prior.position - truth[:3, 3]) < 0.05
        assert rotation_angle_deg(quat_to_matrix(prior.orientation) @ truth[:3, :3].T) < 1.0
        # the relative pose (a loop constraint) is the robot's motion since the keyframe, in its base frame
        motion = np.linalg.inv(T_map_kf) @ truth
        assert np.linalg.norm(outcome.relative.T[:3, 3] - motion[:3, 3]) < 0.05
        assert rotation_angle_deg(outcome.relative.T[:3, :3] @ motion[:3, :3].T) < 1.0
        # one mount for every camera (what main did) is 90-180 degrees and metres off: the check can fail
        naive = T_map_kf @ CameraMountConfig().matrix() @ np.linalg.inv(_matrix(R, t)) @ \
            np.linalg.inv(CameraMountConfig().matrix())
        assert rotation_angle_deg(naive[:3, :3] @ truth[:3, :3].T) > 80.0
        assert np.linalg.norm(naive[:3, 3] - truth[:3, 3]) > 0.5


def test_camera_info_of_another_resolution_is_scaled_to_the_images(data_dir) -> None:
    """camera_info for 1280x960 (K doubled) with 640x480 images: K is scaled; used as it is, the rotation was off."""
    plane = Plane(data_dir)
    cam = plane.camera
    info = CameraModel(1280, 960, np.array([[2 * cam.K[0, 0], 0, 640.0], [0, 2 * cam.K[1, 1], 480.0], [0, 0, 1]]))
    ex = FeatureExtractor()
    live = _live()
    live.set_camera_model("/cam/image", info)
    kf_pose = PoseSample(T0, "map", np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0]))
    live.start_recording()
    assert live.process("/cam/image", T0, _thumbnail(plane.image), kf_pose, features=ex.extract(plane.image),
                        frame_id="cam", image_size=(640, 480)).recorded
    live.stop_recording()
    stored = live.kmap.local_features.intrinsics["/cam/image"]
    assert (stored.width, stored.height) == (640, 480)
    np.testing.assert_allclose(stored.K, info.scaled_to(640, 480).K)
    R = rpy_to_matrix(0.05, 0.3, -0.1)  # a pure rotation of the camera (17 degrees): no depth, rotation case
    view = plane.view(R, np.zeros(3))
    outcome = live.process("/cam/image", T0 + NS, _thumbnail(view), None, features=ex.extract(view),
                           frame_id="cam", image_size=(640, 480))
    assert outcome.result.accepted and outcome.prior_case == "rotation"
    M = CameraMountConfig().matrix()
    truth = (M @ np.linalg.inv(_matrix(R, np.zeros(3))) @ np.linalg.inv(M))[:3, :3]
    error = rotation_angle_deg(quat_to_matrix(outcome.result.prior.orientation) @ truth.T)
    unscaled = verify_pair(ex.extract(view), ex.extract(plane.image), VerificationConfig(), info, info)
    assert error < 0.5 and rotation_angle_deg(unscaled.R @ R.T) > 10 * max(error, 0.1), error


def test_camera_info_of_another_aspect_ratio_is_not_used_and_said_once(data_dir, caplog) -> None:
    plane = Plane(data_dir)
    ex = FeatureExtractor()
    live = _live()
    live.set_camera_model("/cam/image", plane.camera)
    kf_pose = PoseSample(T0, "map", np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
    live.start_recording()
    live.process("/cam/image", T0, _thumbnail(plane.image), kf_pose, features=ex.extract(plane.image))
    live.stop_recording()
    wide = CameraModel(640, 360, np.array([[350.0, 0, 320], [0, 350.0, 180], [0, 0, 1]]))  # 16:9 for 4:3 images
    live.set_camera_model("/cam/image", wide)
    view = plane.view(rpy_to_matrix(0.0, 0.1, 0.0), np.zeros(3))
    with caplog.at_level(logging.INFO, logger="dinomix_ros.localization.live_map"):
        outcomes = [live.process("/cam/image", T0 + k * NS, _thumbnail(view), None, features=ex.extract(view),
                                 image_size=(640, 480)) for k in (1, 2)]
    assert [o.prior_case for o in outcomes] == ["keyframe", "keyframe"]  # verified without intrinsics
    assert all(o.result.accepted and o.relative is None for o in outcomes)
    np.testing.assert_allclose(outcomes[0].result.prior.position, kf_pose.position)
    lines = [r.getMessage() for r in caplog.records if "another aspect ratio" in r.getMessage()]
    assert len(lines) == 1 and "640x360" in lines[0] and "640x480" in lines[0], lines
    assert live.stats()["cameras_intrinsics_unfit"] == "/cam/image"


def test_a_changed_extrinsic_while_recording_starts_a_new_camera_version(data_dir, tmp_path, caplog) -> None:
    plane = Plane(data_dir)
    ex = FeatureExtractor()
    extrinsics = CameraExtrinsics(CameraMountConfig().matrix(), {"front_optical": FRONT})
    live = _live(extrinsics)
    live.set_camera_model("/front/image", plane.camera)
    live.start_recording()

    def record(k: int, frame: str = "front_optical", image: np.ndarray | None = None) -> str:
        img = plane.image if image is None else image
        pose = PoseSample(T0 + k * NS, "map", np.array([float(k), 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
        assert live.process("/front/image", T0 + k * NS, _thumbnail(img), pose, features=ex.extract(img),
                            frame_id=frame).recorded
        return str(live.kmap.cameras[-1])

    assert [record(k) for k in range(2)] == ["/front/image"] * 2
    moved = FRONT.copy()
    moved[0, 3] += 0.2  # the camera was moved 20 cm (re-mounted, re-calibrated)
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.local_features"):
        live.set_mounts(CameraMountConfig(), {"front_optical": moved})
        assert record(2) == "/front/image#2"
    assert "stored as camera /front/image#2" in caplog.text
    assert record(3) == "/front/image#2"  # the same mount again: the same version
    assert record(4, "front_optical_2") == "/front/image#3"  # another frame: another version
    small = cv2.resize(plane.image, (320, 240), interpolation=cv2.INTER_AREA)
    assert record(5, "front_optical_2", small) == "/front/image#4"  # another image size
    live.set_mounts(CameraMountConfig(), {"front_optical": FRONT})
    assert record(6) == "/front/image"  # back to the first mount: its keyframes' version
    live.stop_recording()
    live.save(tmp_path / "m")
    loaded = load_map(tmp_path / "m")
    cameras = loaded.local_features.cameras
    assert sorted(cameras) == ["/front/image", "/front/image#2", "/front/image#3", "/front/image#4"]
    np.testing.assert_allclose(cameras["/front/image#2"].T_base_cam, moved)
    assert cameras["/front/image#4"].size == (320, 240)
    assert loaded.local_features.intrinsics["/front/image#4"] == plane.camera.scaled_to(320, 240)
    assert loaded.cameras.tolist() == ["/front/image"] * 2 + ["/front/image#2"] * 2 + \
        ["/front/image#3", "/front/image#4", "/front/image"]
    # a keyframe's prior uses the extrinsic it was recorded with, whatever the parameters say now
    reloaded = _live(CameraExtrinsics(CameraMountConfig().matrix()))
    reloaded.replace_map(loaded)
    best = reloaded.process("/front/image", T0 + 100 * NS, _thumbnail(plane.image), None).result.candidates
    by_camera = {c.camera: reloaded.keyframe_mount(c) for c in best}
    np.testing.assert_allclose(by_camera["/front/image#2"], moved)
    np.testing.assert_allclose(by_camera["/front/image"], FRONT)


def test_keyframes_of_a_map_without_camera_records_use_camera_mount(data_dir, caplog) -> None:
    plane = Plane(data_dir)
    ex = FeatureExtractor()
    kmap = KeyframeMap.empty(FINGERPRINT)
    store = kmap.enable_local_features("orb", 400)
    kmap.add(_thumbnail(plane.image)[None], stamps_ns=[T0], cameras="/old/image", frame_ids="map",
             positions=np.zeros((1, 3)), orientations=np.array([[0.0, 0.0, 0.0, 1.0]]),
             features=[ex.extract(plane.image)])
    store.intrinsics["/old/image"] = plane.camera  # what a map written before camera records holds
    assert store.cameras == {}
    live = LiveMap(kmap, matcher=MatcherConfig(min_similarity=-1.0), mount=CameraMountConfig(x=0.3),
                   extrinsics=CameraExtrinsics(CameraMountConfig(x=0.3).matrix(), {"cam": FRONT}))
    with caplog.at_level(logging.INFO, logger="dinomix_ros.localization.live_map"):
        cands = [live.process("/new/image", T0 + k * NS, _thumbnail(plane.image), None, frame_id="cam"
                              ).result.candidates[0] for k in (1, 2)]
        mounts = [live.keyframe_mount(c) for c in cands]
    np.testing.assert_allclose(mounts[0], CameraMountConfig(x=0.3).matrix())
    assert caplog.text.count("have no camera record") == 1
    # recording into it: the old keyframes keep their name (and camera_mount.*), the new ones get a record
    live.set_camera_model("/old/image", plane.camera)
    live.start_recording()
    live.process("/old/image", T0 + 5 * NS, _thumbnail(plane.image), None, features=ex.extract(plane.image),
                 frame_id="cam")
    assert kmap.cameras.tolist() == ["/old/image", "/old/image#2"]
    np.testing.assert_allclose(kmap.local_features.cameras["/old/image#2"].T_base_cam, FRONT)


@pytest.mark.parametrize("size", [(640, 480), (1280, 960)])
def test_extrinsic_and_intrinsics_follow_the_frame_not_the_topic(data_dir, size) -> None:
    """Two frame ids on one topic (a driver that switches modes): each keyframe gets its own record."""
    plane = Plane(data_dir, size)
    live = _live(CameraExtrinsics(CameraMountConfig().matrix(), EXTRINSICS))
    live.start_recording()
    ex = FeatureExtractor()
    for k, frame in enumerate(("front_optical", "rear_optical")):
        pose = PoseSample(T0 + k * NS, "map", np.array([2.0 * k, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]))
        assert live.process("/cam", T0 + k * NS, _thumbnail(plane.image), pose, features=ex.extract(plane.image),
                            frame_id=frame).recorded
    records = live.kmap.local_features.cameras
    assert [records[c].frame_id for c in live.kmap.cameras.tolist()] == ["front_optical", "rear_optical"]
    assert all(r.size == size for r in records.values())
