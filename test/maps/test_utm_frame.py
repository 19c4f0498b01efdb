"""GPS-geotagged keyframes live in the frame ``utm`` (robot_localization's navsat_transform broadcasts it), with the
zone stored per keyframe; maps of older versions with ``utm_<zone><band>`` frames load renamed when that is exact."""

from __future__ import annotations

import numpy as np
import pytest

from dinomix_ros.maps.geotags import geotag_columns, rename_legacy_utm_frames
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.sources import geo
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.storage import save_map


def test_frame_names() -> None:
    assert geo.UTM_FRAME == geo.utm_frame_id() == "utm"
    assert geo.parse_utm_frame("utm_33U") == (33, "U") and geo.parse_utm_frame("utm") is None
    assert geo.is_utm_frame("utm") and geo.is_utm_frame("utm_7C") and not geo.is_utm_frame("map")
    assert not geo.is_utm_frame("utm_33I")  # I and O are no band letters


def _map(frames: list[str], fingerprint: dict, zones: list[int]) -> KeyframeMap:
    n = len(frames)
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(n, fingerprint["descriptor_dim"])).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kmap = KeyframeMap.empty(fingerprint)
    columns = geotag_columns(np.tile([55.705, 13.19, np.nan], (n, 1)), zone=33)
    columns["utm_zones"] = np.array(zones)
    kmap.add(desc, stamps_ns=np.arange(1, n + 1, dtype=np.int64) * 10**9, cameras="cam", frame_ids=frames,
             positions=np.c_[columns["utm"], np.zeros(n)], **columns)
    return kmap


@pytest.fixture
def fingerprint() -> dict:
    from dinomix_ros.model.encoder import Encoder, EncoderConfig

    return Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32")).fingerprint.to_dict()


def test_a_legacy_map_loads_in_the_utm_frame_and_saves_so(tmp_path, fingerprint) -> None:
    legacy = _map(["utm_33U", "utm_33U", "map"], fingerprint, [33, 33, 33])
    path = save_map(legacy, tmp_path / "legacy.dinomap")
    loaded = load_map(path, expected_fingerprint=fingerprint)
    assert loaded.frames == ["map", "utm"] and loaded.frame_ids.tolist() == ["utm", "utm", "map"]
    assert loaded.utm_zones.tolist() == [33, 33, 33]
    save_map(loaded, tmp_path / "again.dinomap")
    again = load_map(tmp_path / "again.dinomap", expected_fingerprint=fingerprint)
    assert again.frames == ["map", "utm"]


def test_legacy_frames_that_would_change_meaning_stay_as_they_are() -> None:
    two_zones = np.array(["utm_33U", "utm_34U"], dtype=object)
    assert rename_legacy_utm_frames(two_zones, np.array([33, 34])) is two_zones
    other_zone_stored = np.array(["utm_33U", "utm_33U"], dtype=object)
    assert rename_legacy_utm_frames(other_zone_stored, np.array([33, 32])) is other_zone_stored
    no_zone_stored = np.array(["utm_33U", "odom"], dtype=object)
    assert rename_legacy_utm_frames(no_zone_stored, np.array([0, 0])).tolist() == ["utm", "odom"]
    plain = np.array(["map"], dtype=object)
    assert rename_legacy_utm_frames(plain, np.array([0])) is plain
