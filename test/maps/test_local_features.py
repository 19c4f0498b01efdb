"""Local features in maps (format 2): packing, storage round trips, appends, checksums, format 1 maps."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from mapfactory import fingerprint, full_map, unit

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor, LocalFeatures
from dinomix_ros.maps.errors import MapError, MapFormatError
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import KeyframeFeatures, pack, slot_dtype, unpack
from dinomix_ros.maps.manifest import manifest_bytes, read_manifest
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

DATA = Path(__file__).resolve().parents[1] / "data"
CAMERA = CameraModel(512, 384, np.array([[400.0, 0, 256], [0, 400.0, 192], [0, 0, 1]]), "plumb_bob",
                     np.array([0.01, -0.02, 0.0, 0.0, 0.0]))


@pytest.fixture(scope="module")
def corridor_features() -> list[LocalFeatures]:
    ex = FeatureExtractor(FeatureConfig(max_features=400))  # the chunks below have 400 slots
    return [ex.extract(cv2.imread(str(DATA / "rtabmap_corridor" / "samples" / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE))
            for i in (1, 2, 3, 41)]


def _equal_features(a: LocalFeatures, b: LocalFeatures) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_allclose(a.keypoints, b.keypoints, atol=0.125 + 1e-6)  # quarter-pixel storage
    np.testing.assert_allclose(a.depths, b.depths, atol=5e-4, equal_nan=True)


def test_pack_unpack_keeps_descriptors_keypoints_and_depths(corridor_features):
    f = corridor_features[0]
    depths = np.linspace(0.3, 12.0, len(f)).astype(np.float32)
    depths[::7] = np.nan
    f = LocalFeatures(f.keypoints, f.descriptors, depths, f.image_size, f.kind)
    records = pack(f, "orb", 400)
    assert records.nbytes == 400 * 38 == 15_200  # the budget is 16 KB per keyframe
    _equal_features(f, unpack(records, "orb"))
    assert len(unpack(pack(None, "orb", 400), "orb")) == 0


def test_pack_refuses_another_feature_type_and_out_of_range_keypoints(corridor_features):
    f = corridor_features[0]
    with pytest.raises(MapError, match="stores orb features, got sift"):
        pack(LocalFeatures(f.keypoints, np.zeros((len(f), 128), np.uint8), f.depths, f.image_size, "sift"), "orb", 10)
    bad = LocalFeatures(f.keypoints + 20000, f.descriptors, f.depths, f.image_size, f.kind)
    with pytest.raises(MapError, match="keypoints must lie in"):
        pack(bad, "orb", 400)


def _map_with_features(features: list[LocalFeatures]) -> tuple[KeyframeMap, np.ndarray]:
    rng = np.random.default_rng(3)
    m = KeyframeMap.empty(fingerprint())
    store = m.enable_local_features("orb", 400)
    store.intrinsics["front"] = CAMERA
    desc = unit(rng, len(features))
    m.add(desc, stamps_ns=np.arange(len(features)), cameras="front", frame_ids="map", features=features)
    return m, desc


def test_save_load_round_trip_with_checksummed_feature_chunks(tmp_path, corridor_features):
    m, _ = _map_with_features(corridor_features[:3])
    save_map(m, tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    assert manifest["version"] == 2
    assert manifest["local_features"]["type"] == "orb" and manifest["local_features"]["slots"] == 400
    assert manifest["local_features"]["intrinsics"]["front"] == CAMERA.to_dict()
    (rec,) = manifest["files"]["features"]
    assert rec["rows"] == 3 and 0 < rec["bytes"] - 3 * 15_200 <= 256  # records + a small .npy header
    loaded = load_map(tmp_path / "m")
    assert loaded.local_features.intrinsics["front"] == CAMERA
    for i in range(3):
        _equal_features(corridor_features[i], loaded.local_features.row(i))
    # a flipped byte in the feature chunk is caught by its sha256, like the descriptor chunks
    path = tmp_path / "m" / rec["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MapFormatError, match="corrupted"):
        load_map(tmp_path / "m")


def test_appending_saves_write_only_the_new_feature_rows(tmp_path, corridor_features):
    m, _ = _map_with_features(corridor_features[:2])
    save_map(m, tmp_path / "m")
    m = load_map(tmp_path / "m")
    m.add(unit(np.random.default_rng(4), 2), stamps_ns=[5, 6], cameras="front", frame_ids="map",
          features=[corridor_features[2], None])
    save_map(m, tmp_path / "m")
    chunks = read_manifest(tmp_path / "m")["files"]["features"]
    assert [c["rows"] for c in chunks] == [2, 2]
    loaded = load_map(tmp_path / "m", mmap=False)
    _equal_features(corridor_features[2], loaded.local_features.row(2))
    assert len(loaded.local_features.row(3)) == 0
    sub = loaded.subset([0, 2])
    _equal_features(corridor_features[2], sub.local_features.row(1))


def test_add_checks_features_before_changing_anything(corridor_features):
    m, _ = _map_with_features(corridor_features[:1])
    with pytest.raises(MapError, match="features has 1 entries for 2 rows"):
        m.add(unit(np.random.default_rng(5), 2), stamps_ns=[1, 2], cameras="front", frame_ids="map",
              features=[None])
    assert len(m) == 1 and len(m.local_features) == 1
    plain = KeyframeMap.empty(fingerprint())
    with pytest.raises(MapError, match="no local-feature store"):
        plain.add(unit(np.random.default_rng(5), 1), stamps_ns=[1], cameras="c", frame_ids="map",
                  features=[corridor_features[0]])


def _as_format_1(directory: Path) -> None:
    """Rewrite a saved map without local features into a format 1 manifest (what older releases wrote)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["local_features"] is None
    manifest["version"] = 1
    del manifest["local_features"]
    del manifest["files"]["features"]
    del manifest["manifest_sha256"]  # older releases did not seal their manifests either
    path.write_text(json.dumps(manifest, indent=2))


def test_format_1_maps_still_load_without_local_features(tmp_path):
    m, _ = full_map(np.random.default_rng(0))
    save_map(m, tmp_path / "v1")
    _as_format_1(tmp_path / "v1")
    loaded = load_map(tmp_path / "v1")
    assert loaded.local_features is None and len(loaded) == len(m)
    # and it can be saved again (as format 2 without features), appending
    loaded.add(unit(np.random.default_rng(1), 1), stamps_ns=[1], cameras="c", frame_ids="map")
    save_map(loaded, tmp_path / "v1")
    assert read_manifest(tmp_path / "v1")["files"]["features"] is None


def test_manifest_with_features_and_no_chunks_is_refused(tmp_path, corridor_features):
    m, _ = _map_with_features(corridor_features[:1])
    save_map(m, tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["features"] = []
    path.write_bytes(manifest_bytes(manifest))  # sealed: a writer's bug, not a hand edit
    with pytest.raises(MapFormatError, match="local-feature chunks hold 0 rows but count is 1"):
        load_map(tmp_path / "m")


def test_store_rejects_bad_arguments():
    with pytest.raises(MapError, match="unknown local feature type"):
        KeyframeFeatures("surf", 10)
    with pytest.raises(MapError, match="positive integer"):
        KeyframeFeatures("orb", 0)
    assert slot_dtype("orb").itemsize == 38 and slot_dtype("sift").itemsize == 134
