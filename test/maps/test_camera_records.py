"""Camera records in maps (local_features.cameras: frame, extrinsic, image size per camera name): round trips,
versions of a changed camera, maps written before records existed, manifest checks, and the load-time checks of
stored keypoints against their camera's image."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from mapfactory import fingerprint, unit

from dinomix_ros.imaging.camera import MAX_IMAGE_SIDE, CameraModel
from dinomix_ros.imaging.features import FeatureExtractor, LocalFeatures
from dinomix_ros.localization.camera_pose import rpy_to_matrix
from dinomix_ros.maps.errors import MapError, MapFormatError
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import (
    MAX_CAMERA_VERSIONS, CameraRecord, KeyframeFeatures, check_feature_rows, pack,
)
from dinomix_ros.maps.manifest import manifest_bytes, read_manifest
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.storage import save_map

DATA = Path(__file__).resolve().parents[1] / "data"
CAMERA = CameraModel(512, 384, np.array([[400.0, 0, 256], [0, 400.0, 192], [0, 0, 1]]))


def _mount(x: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = rpy_to_matrix(-math.pi / 2, 0.0, yaw - math.pi / 2), (x, 0.0, 0.5)
    return T


REAR = CameraRecord("rear_optical", _mount(-1.0, math.pi), 512, 384)


@pytest.fixture(scope="module")
def corridor_features() -> list[LocalFeatures]:
    ex = FeatureExtractor()
    return [ex.extract(cv2.imread(str(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE))
            for i in (1, 2, 3)]


def _map(features: list[LocalFeatures], cameras: list[str], records: dict | None = None) -> KeyframeMap:
    m = KeyframeMap.empty(fingerprint())
    store = m.enable_local_features("orb", 400)
    store.cameras.update(records or {})
    m.add(unit(np.random.default_rng(3), len(features)), stamps_ns=np.arange(len(features)), cameras=cameras,
          frame_ids="map", features=features)
    return m


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_bytes(manifest_bytes(manifest))  # resealed: only the checks behind the seal can refuse it


def test_records_round_trip_through_save_load_and_subset(tmp_path, corridor_features) -> None:
    m = _map(corridor_features, ["rear", "rear", "front"], {"rear": REAR})
    m.local_features.intrinsics["rear"] = CAMERA
    save_map(m, tmp_path / "m")
    entry = read_manifest(tmp_path / "m")["local_features"]
    assert entry["cameras"] == {"rear": REAR.to_dict()} and len(entry["cameras"]["rear"]["T_base_cam"]) == 16
    loaded = load_map(tmp_path / "m")
    assert loaded.local_features.cameras == {"rear": REAR}
    np.testing.assert_array_equal(loaded.local_features.cameras["rear"].T_base_cam, REAR.T_base_cam)  # bit-exact
    assert loaded.subset([2]).local_features.cameras == {"rear": REAR}


def test_record_versions_of_a_changed_camera() -> None:
    store = KeyframeFeatures("orb", 10)
    none = set
    assert store.record_name("cam", REAR, CAMERA, none) == "cam"
    nudged = REAR.T_base_cam.copy()
    nudged[0, 3] += 1e-6  # numeric noise (a TF round trip): the same mount
    assert store.record_name("cam", CameraRecord("rear_optical", nudged, 512, 384), None, none) == "cam"
    moved = REAR.T_base_cam.copy()
    moved[0, 3] += 0.01
    assert store.record_name("cam", CameraRecord("rear_optical", moved, 512, 384), CAMERA, none) == "cam#2"
    recal = CameraModel(512, 384, np.array([[410.0, 0, 256], [0, 410.0, 192], [0, 0, 1]]))
    assert store.record_name("cam", REAR, recal, none) == "cam#3"  # re-calibrated
    assert store.record_name("cam", REAR, CAMERA, none) == "cam"
    assert store.record_name("cam", REAR, None, none) == "cam"  # intrinsics unknown now: the same camera
    # a name with keyframes but no record (a map written before records) is left to them
    assert store.record_name("old", REAR, None, lambda: {"old"}) == "old#2"
    for i in range(MAX_CAMERA_VERSIONS - 3):
        T = REAR.T_base_cam.copy()
        T[1, 3] += 0.01 * (i + 1)
        store.record_name("cam", CameraRecord("rear_optical", T, 512, 384), None, none)
    with pytest.raises(MapError, match=f"has {MAX_CAMERA_VERSIONS} versions"):
        store.record_name("cam", CameraRecord("elsewhere", REAR.T_base_cam, 512, 384), None, none)


def _without_records(directory: Path) -> None:
    """What a map written before camera records existed holds: no local_features.cameras."""
    _edit_manifest(directory, lambda m: m["local_features"].pop("cameras"))


def test_a_map_without_camera_records_loads_and_bounds_keypoints_by_its_intrinsics(tmp_path, corridor_features,
                                                                                   caplog) -> None:
    m = _map(corridor_features[:2], ["cam", "nocalib"])
    m.local_features.intrinsics["cam"] = CAMERA
    save_map(m, tmp_path / "m")
    _without_records(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="dinomix_ros.maps.loading"):
        loaded = load_map(tmp_path / "m")
    assert loaded.local_features.cameras == {} and len(loaded) == 2
    assert "have no camera record" in caplog.text and "intrinsics' image size where known" in caplog.text
    # the intrinsics' size bounds the keypoints of a map without records
    small = CameraModel(256, 192, np.array([[200.0, 0, 128], [0, 200.0, 96], [0, 0, 1]]))
    _edit_manifest(tmp_path / "m", lambda man: man["local_features"]["intrinsics"].update(cam=small.to_dict()))
    with pytest.raises(MapFormatError, match=r"row 0 \(map row 0\) has a keypoint at .* outside its camera's "
                                             r"256x192 image"):
        load_map(tmp_path / "m")
    assert len(load_map(tmp_path / "m", verify=False)) == 2  # verify=False skips the row checks


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(T_base_cam=[1.0] * 16), "bottom row"),
    (lambda c: c.update(T_base_cam=[2.0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1]), "not a rotation matrix"),
    (lambda c: c.update(T_base_cam=[1.0, 0, 0, 1e6, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]), "more than 100 m"),
    (lambda c: c.update(T_base_cam=[1.0] * 9), "16 numbers"),
    (lambda c: c.update(T_base_cam="eye"), "16 numbers"),
    (lambda c: c.update(width=0), "width is 0"),
    (lambda c: c.update(height=MAX_IMAGE_SIDE + 1), "height is 16385"),
    (lambda c: c.update(width=512.5), "width is 512.5"),
    (lambda c: c.update(frame_id="a\nb"), "printable"),
    (lambda c: c.pop("frame_id"), "has the keys"),
    (lambda c: c.update(extra=1), "has the keys"),
    (lambda c: c.update(width=640), "intrinsics are for 512x384 images, its record says 640x384"),
])
def test_bad_camera_records_are_refused_at_load(tmp_path, corridor_features, edit, message) -> None:
    m = _map(corridor_features[:1], ["rear"], {"rear": REAR})
    m.local_features.intrinsics["rear"] = CAMERA
    save_map(m, tmp_path / "m")
    _edit_manifest(tmp_path / "m", lambda man: edit(man["local_features"]["cameras"]["rear"]))
    with pytest.raises(MapFormatError, match=message) as info:
        load_map(tmp_path / "m")
    assert "\n" not in str(info.value)


def _records(points: np.ndarray) -> np.ndarray:
    f = LocalFeatures(points.astype(np.float32), np.zeros((len(points), 32), np.uint8),
                      np.full(len(points), np.nan, np.float32), (512, 384))
    return pack(f, "orb", 400)[None]


def test_row_checks_refuse_concentrated_and_collinear_keypoints_and_keep_real_ones(corridor_features) -> None:
    bounds = np.array([[512.0, 384.0]])

    def where(i):
        return f"row {i}"

    rng = np.random.default_rng(0)
    for pts, ok in [(np.full((50, 2), 100.0), False),  # every keypoint at one point
                    (np.c_[np.linspace(10, 500, 60), np.full(60, 200.0)], False),  # on one line
                    (np.c_[np.linspace(10, 300, 60), np.linspace(20, 310, 60)], False),  # on a diagonal line
                    (np.full((7, 2), 100.0), True),  # too few to judge (and to verify)
                    (np.repeat(rng.uniform(0, 380, (40, 2)), 3, axis=0), True),  # SIFT-like: one point, 3 angles
                    (np.r_[np.full((40, 2), 100.0), rng.uniform(0, 380, (40, 2))], True)]:  # half at one point
        if ok:
            check_feature_rows(_records(pts), bounds, where)
        else:
            with pytest.raises(MapError, match="all at one point or on one line"):
                check_feature_rows(_records(pts), bounds, where)
    for f in corridor_features:
        check_feature_rows(pack(f, "orb", 400)[None], bounds, where)
    with pytest.raises(MapError, match=r"row 0 has a keypoint at \(600, 10\), outside its camera's 512x384 image"):
        check_feature_rows(_records(np.r_[rng.uniform(0, 380, (20, 2)), [[600.0, 10.0]]]), bounds, where)
