"""Offline builds store local features per keyframe and intrinsics per camera (bag camera_info, calibration YAML)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from bagfactory import TYPESTORE, BagMessage, header, photo_frames, write_camera_bag

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag
from dinomix_ros.maps.build_folder import build_map_from_folder
from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.maps.sources.bags import read_camera_info
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

DATA = Path(__file__).resolve().parents[1] / "data"
K = [300.0, 0.0, 160.0, 0.0, 301.0, 120.0, 0.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32", batch_size=3, workers=2))


def _camera_info(stamp_ns: int, k: list[float]) -> object:
    T = TYPESTORE.types
    return T["sensor_msgs/msg/CameraInfo"](
        header=header(stamp_ns, "camera_optical_frame"), height=240, width=320, distortion_model="plumb_bob",
        d=np.array([-0.1, 0.01, 0.0, 0.0, 0.0]), k=np.array(k), r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0,
        binning_y=0, roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                               do_rectify=False))


def test_bag_build_stores_features_and_the_bags_intrinsics(tmp_path, encoder) -> None:
    frames = photo_frames(4, size=(320, 240), step=10)
    infos = [BagMessage("/camera/camera_info", "sensor_msgs/msg/CameraInfo", 1_700_000_000_000_000_000 + i,
                        _camera_info(1_700_000_000_000_000_000 + i, [0.0] * 9 if i == 0 else K)) for i in range(2)]
    bag = write_camera_bag(tmp_path / "bag", frames=frames, image_format="jpeg",
                           image_topics=("/camera/image_raw/compressed",), extra_messages=infos)
    camera = read_camera_info(bag.path, "/camera/image_raw/compressed")  # the uncalibrated first one is skipped
    assert camera is not None and camera.K[0, 0] == 300.0 and camera.distortion_model == "plumb_bob"
    config = BagMapConfig(image_topics=("/camera/image_raw/compressed",), pose_topic="/odom",
                          gate=KeyframeGateConfig(min_distance_m=0.0, min_rotation_deg=0.0, max_interval_s=0.01))
    kmap, report = build_map_from_bag(bag.path, encoder, config, progress=False, features=FeatureConfig())
    assert report.added == 4 and len(kmap.local_features) == 4
    assert kmap.local_features.intrinsics == {"/camera/image_raw/compressed": camera}
    assert all(len(kmap.local_features.row(i)) > 100 for i in range(4))
    save_map(kmap, tmp_path / "m")
    assert read_manifest(tmp_path / "m")["local_features"]["slots"] == FeatureConfig().max_features
    # without features: a map without verification (and no feature chunks)
    plain, _ = build_map_from_bag(bag.path, encoder, config, progress=False)
    assert plain.local_features is None


def test_folder_build_with_a_calibration_and_appending_to_a_map_without_features(tmp_path, encoder, caplog) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in (1, 9, 17):
        shutil.copy(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg", folder / f"{i}.jpg")
    camera = CameraModel(512, 384, np.array([[420.0, 0, 256], [0, 420.0, 192], [0, 0, 1]]), "equidistant",
                         np.array([0.01, 0.0, 0.0, 0.0]))
    kmap, report = build_map_from_folder(folder, encoder, "none", progress=False, camera="front",
                                         features=FeatureConfig(max_features=200), intrinsics=camera)
    assert report.added == 3 and kmap.local_features.slots == 200
    assert kmap.local_features.intrinsics == {"front": camera}
    assert all(150 <= len(kmap.local_features.row(i)) <= 200 for i in range(3))
    save_map(kmap, tmp_path / "m")
    assert load_map(tmp_path / "m").local_features.intrinsics["front"] == camera
    # a map without local features (format 1) keeps none when appended to, and says so
    old, _ = build_map_from_folder(folder, encoder, "none", progress=False)
    with caplog.at_level("WARNING"):
        old, _ = build_map_from_folder(folder, encoder, "none", kmap=old, progress=False, features=FeatureConfig())
    assert old.local_features is None and len(old) == 6 and "no local features" in caplog.text


def test_bag_build_stores_camera_records_and_scales_a_full_resolution_calibration(tmp_path, encoder) -> None:
    """camera_info of 640x480 (binned 2x2 by the driver's config, not said in the message) with 320x240 images: K is
    scaled; the record carries the images' frame, size and the --extrinsic given for that frame."""
    from dinomix_ros.localization.camera_pose import CameraMountConfig
    from dinomix_ros.localization.extrinsics import CameraExtrinsics, parse_extrinsics

    full = [2 * K[0], 0.0, 2 * K[2] + 0.5, 0.0, 2 * K[4], 2 * K[5] + 0.5, 0.0, 0.0, 1.0]
    info = _camera_info(1_700_000_000_000_000_000, full)
    info.width, info.height = 640, 480
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(3, size=(320, 240), step=10), image_format="jpeg",
                           image_topics=("/rear/image_raw/compressed",), camera_frame_id="rear_optical",
                           extra_messages=[BagMessage("/rear/camera_info", "sensor_msgs/msg/CameraInfo",
                                                      1_700_000_000_000_000_000, info)])
    config = BagMapConfig(image_topics=("/rear/image_raw/compressed",), pose_topic="/odom", camera_names=("rear",),
                          gate=KeyframeGateConfig(min_distance_m=0.0, min_rotation_deg=0.0, max_interval_s=0.01))
    extrinsics = CameraExtrinsics(CameraMountConfig().matrix(),
                                  parse_extrinsics(["rear_optical: -1 0 0.6 -1.5707963 0 1.5707963"]))
    kmap, report = build_map_from_bag(bag.path, encoder, config, progress=False, features=FeatureConfig(),
                                      extrinsics=extrinsics)
    assert report.added == 3 and kmap.cameras.tolist() == ["rear"] * 3
    stored = kmap.local_features.intrinsics["rear"]
    assert (stored.width, stored.height) == (320, 240)
    np.testing.assert_allclose(stored.K.reshape(-1), K, atol=1e-9)  # pixel centres: (2c + 0.5 + 0.5) / 2 - 0.5
    record = kmap.local_features.cameras["rear"]
    assert (record.frame_id, record.size) == ("rear_optical", (320, 240))
    np.testing.assert_allclose(record.T_base_cam[:3, 3], [-1.0, 0.0, 0.6])
    save_map(kmap, tmp_path / "m")
    assert load_map(tmp_path / "m").local_features.cameras["rear"] == record
