"""Keyframes as fleet rows and back, without a server: every column survives, local features fit the field, pulled
keyframes are marked, never added twice, and a malformed row costs only itself."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from mapfactory import COLUMNS, fingerprint, full_map, unit

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import LocalFeatures
from dinomix_ros.maps.fleet.records import (
    FEATURES_BYTES, PULLED_PREFIX, PulledKeyframes, decode_features, encode_features, keyframe_key, map_uid,
    to_records,
)
from dinomix_ros.maps.geotags import geotag_columns
from dinomix_ros.maps.keyframes import KeyframeMap

VECTOR, MARKER = "descriptor_test", "model_test"
CAMERA = CameraModel(640, 480, np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]]), "plumb_bob",
                     np.array([0.1, -0.05, 0.0, 0.0, 0.01]))


def synthetic_features(rng: np.random.Generator, n: int, kind: str = "orb") -> LocalFeatures:
    width = {"orb": 32, "sift": 128}[kind]
    depths = rng.uniform(0.5, 9.0, n).astype(np.float32)
    depths[::5] = np.nan
    return LocalFeatures(rng.uniform(0, 600, (n, 2)).astype(np.float32), rng.integers(0, 256, (n, width), np.uint8),
                         depths, (640, 480), kind)


def _as_server(records: list[dict]) -> list[dict]:
    """Rows as a server returns them: JSON types only (what a real round trip through Milvus keeps)."""
    return json.loads(json.dumps(records))


def test_every_column_survives_a_round_trip(rng: np.random.Generator) -> None:
    kmap, desc = full_map(rng, 12)
    records, truncated = to_records(kmap, np.arange(len(kmap)), "r1", map_uid(kmap), VECTOR, MARKER)
    assert truncated == 0 and [r["key"] for r in records] == [keyframe_key("r1", map_uid(kmap), i) for i in range(12)]
    assert records[2]["x"] is None and records[5]["lat"] is None and records[6]["alt"] is None  # unknown: null
    assert all(r[MARKER] is True for r in records)
    pulled = PulledKeyframes.from_records(_as_server(records), VECTOR, kmap.descriptor_dim, own_robot="r1")
    assert not pulled.refused and len(pulled) == 12
    copy = KeyframeMap.empty(kmap.fingerprint)
    added = pulled.add_to(copy)
    assert added.ids.tolist() == list(range(12)) and added.present == 0
    for col in COLUMNS:
        if col in ("ids", "sources"):
            continue
        a, b = getattr(kmap, col), getattr(copy, col)
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=col)  # bit for bit, NaN rows included
        else:
            assert a.tolist() == b.tolist(), col
    np.testing.assert_array_equal(kmap.descriptors, copy.descriptors)  # float16 -> float32 -> float16 is exact
    assert copy.sources.tolist() == [PULLED_PREFIX + r["key"] for r in records]
    # another robot's keyframes: its cameras are its own, never mixed with this robot's of the same name
    theirs = PulledKeyframes.from_records(_as_server(records), VECTOR, kmap.descriptor_dim, own_robot="r2")
    assert theirs.columns["cameras"][:2] == ["r1:front", "r1:caméra_arrière"]


def test_pulled_keyframes_are_added_once_and_bad_rows_cost_only_themselves(rng: np.random.Generator) -> None:
    kmap, _ = full_map(rng, 12)
    records = _as_server(to_records(kmap, np.arange(6), "r1", map_uid(kmap), VECTOR, MARKER)[0])
    target = KeyframeMap.empty(kmap.fingerprint)
    assert len(PulledKeyframes.from_records(records[:3], VECTOR, kmap.descriptor_dim, "me").add_to(target).ids) == 3
    again = PulledKeyframes.from_records(records, VECTOR, kmap.descriptor_dim, "me").add_to(target)
    assert (again.ids.tolist(), again.present) == ([3, 4, 5], 3)  # the first three were there already
    assert len(target) == 6

    broken = [dict(r) for r in records]
    broken[0]["key"] = "x/0"
    del broken[0]["stamp_ns"]  # unreadable
    broken[1]["key"] = "x/1"
    broken[1][VECTOR] = broken[1][VECTOR][:-1]  # wrong dimension
    broken[2]["key"] = "x/2"
    broken[2][VECTOR] = [2.0 * v for v in broken[2][VECTOR]]  # not a unit vector: the map refuses it
    broken[3]["key"] = "x/3"
    broken[3]["features"] = "orb:not base64!"
    broken[4]["key"] = "x/4"  # fine
    pulled = PulledKeyframes.from_records(broken[:5], VECTOR, kmap.descriptor_dim, "me")
    assert len(pulled) == 2 and len(pulled.refused) == 3
    assert "stamp_ns" in pulled.refused[0] and "shape" in pulled.refused[1] and "base64" in pulled.refused[2]
    result = pulled.add_to(target)
    assert len(result.ids) == 1 and target.sources[-1] == "fleet:x/4"
    assert any("x/2" in line and "norm" in line for line in result.refused)


@pytest.mark.parametrize("kind,n,kept", [("orb", 400, 400), ("orb", 2000, 1293), ("sift", 400, 366)])
def test_local_features_fit_one_varchar(rng: np.random.Generator, kind: str, n: int, kept: int) -> None:
    kmap = KeyframeMap.empty(fingerprint())
    store = kmap.enable_local_features(kind, n)
    features = synthetic_features(rng, n, kind)
    kmap.add(unit(rng, 1), stamps_ns=[0], cameras="cam", frame_ids="map", features=[features])
    text, truncated = encode_features(store, 0)
    assert len(text.encode()) <= FEATURES_BYTES and text.startswith(f"{kind}:") and truncated == (kept < n)
    back = decode_features(text)
    assert len(back) == kept
    want = store.row(0)
    np.testing.assert_array_equal(back.descriptors, want.descriptors[:kept])  # the strongest first
    np.testing.assert_array_equal(back.keypoints, want.keypoints[:kept])
    np.testing.assert_array_equal(back.depths, want.depths[:kept])
    assert decode_features("") is None
    for bad in ("surf:AAAA", "orb:" + base64.b64encode(b"12345").decode()):
        with pytest.raises(ValueError):
            decode_features(bad)


def test_features_and_intrinsics_travel_with_the_keyframe(rng: np.random.Generator) -> None:
    source = KeyframeMap.empty(fingerprint())
    store = source.enable_local_features("orb", 100)
    store.intrinsics["front"] = CAMERA
    feats = [synthetic_features(rng, 100), None, synthetic_features(rng, 30)]
    source.add(unit(rng, 3), stamps_ns=[1, 2, 3], cameras=["front", "front", "rear"], frame_ids="map", features=feats)
    records = _as_server(to_records(source, np.arange(3), "r7", map_uid(source), VECTOR, MARKER)[0])
    assert records[0]["camera_info"]["intrinsics"] == CAMERA.to_dict()
    assert records[2]["camera_info"] == {"intrinsics": None, "extrinsics": None}
    assert records[1]["features"] == ""
    pulled = PulledKeyframes.from_records(records, VECTOR, source.descriptor_dim, "me")
    fresh = KeyframeMap.empty(source.fingerprint)
    pulled.add_to(fresh, enable_features=True)  # an empty map takes the pulled feature type
    assert (fresh.local_features.kind, fresh.local_features.slots) == ("orb", 100)
    assert fresh.local_features.intrinsics["r7:front"] == CAMERA and "r7:rear" not in fresh.local_features.intrinsics
    for row in (0, 2):
        np.testing.assert_array_equal(fresh.local_features.row(row).descriptors, store.row(row).descriptors)
    assert len(fresh.local_features.row(1)) == 0
    sift_map = KeyframeMap.empty(source.fingerprint)
    sift_map.enable_local_features("sift", 50)
    pulled.add_to(sift_map)  # features of another type: keyframes without features, never refused
    assert len(sift_map) == 3 and all(len(sift_map.local_features.row(i)) == 0 for i in range(3))


def test_utm_positions_move_into_the_map_zone(rng: np.random.Generator) -> None:
    kmap, _ = full_map(rng, 12)  # zone 33 (Lund)
    gps = np.array([[55.70, 11.40, 10.0], [55.71, 11.95, np.nan]])  # zone 32 fixes
    other = KeyframeMap.empty(kmap.fingerprint)
    other.add(unit(rng, 2), stamps_ns=[5, 6], cameras="c", frame_ids="map", gps=gps, **{
        k: v for k, v in geotag_columns(gps).items() if k != "gps"})
    assert other.utm_zones.tolist() == [32, 32]
    records = _as_server(to_records(other, np.arange(2), "r2", map_uid(other), VECTOR, MARKER)[0])
    PulledKeyframes.from_records(records, VECTOR, kmap.descriptor_dim, "me").add_to(kmap)
    want = geotag_columns(gps, zone=33)
    assert kmap.utm_zones[-2:].tolist() == [33, 33] and kmap.utm_bands[-2:].tolist() == want["utm_bands"]
    np.testing.assert_allclose(kmap.utm[-2:], want["utm"], rtol=0, atol=1e-6)
