"""One pose parser, live and offline: the same messages give the same samples from rclpy (the node) and from a bag
(rosbags), and the node's pose buffer gives the poses a bag's track gives at the same stamps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bagfactory import NAVSATFIX, ODOMETRY, TYPESTORE, BagMessage, navsatfix_msg, pose_msg, write_bag
from rclpy.serialization import deserialize_message

from dinomix_ros.localization.pose_buffer import PoseBuffer
from dinomix_ros.maps.sources.bags import read_gps_fixes, read_pose_track
from dinomix_ros.maps.sources.posemsg import MAX_ABS_POSITION_M, PoseMessageError, pose_from_msg
from dinomix_ros.maps.sources.poses import PosePairingConfig
from dinomix_ros.ros.conversions import msg_class

T0 = 1_700_000_000_000_000_000
NS = 1_000_000_000


def as_rclpy(msgtype: str, msg: object) -> object:
    """The same message as the node receives it: rosbags CDR is byte-identical to rclpy's."""
    return deserialize_message(bytes(TYPESTORE.serialize_cdr(msg, msgtype)), msg_class(msgtype))


CASES = [
    ("odometry", (1.0, 2.0, 3.0), (0.0, 0.0, 0.0, 2.0), "unit"),  # normalised
    ("odometry", (1.0, 2.0, 3.0), (0.0, 0.0, 0.0, 0.0), "unknown"),  # position-only sources send zeros
    ("pose_stamped", (1.0, 2.0, 0.0), (math.nan, 0.0, 0.0, 1.0), "unknown"),
    ("pose_cov", (-5.0, 0.5, 0.0), (0.0, 0.0, 0.7071068, 0.7071068), "unit"),
    ("odometry", (math.inf, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "non-finite position"),
    ("pose_stamped", (1e300, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), "absurd position"),
    ("pose_cov", (0.0, -2 * MAX_ABS_POSITION_M, 0.0), (0.0, 0.0, 0.0, 1.0), "absurd position"),
]


@pytest.mark.parametrize("kind, position, orientation, expect", CASES)
def test_poses_parse_the_same_live_and_offline(kind: str, position: tuple, orientation: tuple, expect: str) -> None:
    msgtype, bag_msg = pose_msg(kind, T0, position, orientation, frame_id="map")
    results = []
    for msg in (bag_msg, as_rclpy(msgtype, bag_msg)):
        try:
            results.append(pose_from_msg(msg, kind))
        except PoseMessageError as exc:
            results.append(str(exc))
    if isinstance(results[0], str):
        assert results[0] == results[1]  # the same refusal both ways
    if expect in ("unit", "unknown"):
        bag_sample, live_sample = results
        assert bag_sample.stamp_ns == live_sample.stamp_ns == T0
        assert bag_sample.frame_id == live_sample.frame_id == "map"
        np.testing.assert_array_equal(bag_sample.position, live_sample.position)
        np.testing.assert_array_equal(bag_sample.orientation, live_sample.orientation)
        assert bag_sample.has_orientation == (expect == "unit")
        if expect == "unit":
            assert np.linalg.norm(bag_sample.orientation) == pytest.approx(1.0)
    else:
        assert expect in results[0]


@pytest.mark.parametrize("lat, lon, alt, status, expect", [
    (55.705, 13.19, 42.0, 0, "fix"),
    (55.705, 13.19, math.nan, 0, "fix, unknown altitude"),
    (55.705, 13.19, 42.0, -1, "without a fix"),
    (math.nan, 13.19, 42.0, 0, "without a fix"),
    (89.0, 13.19, 42.0, 0, "cannot be projected to UTM"),
])
def test_gnss_fixes_parse_the_same_live_and_offline(lat: float, lon: float, alt: float, status: int,
                                                    expect: str) -> None:
    bag_msg = navsatfix_msg(T0, lat, lon, alt, status=status)
    results = []
    for msg in (bag_msg, as_rclpy(NAVSATFIX, bag_msg)):
        try:
            results.append(pose_from_msg(msg, "navsatfix"))
        except PoseMessageError as exc:
            results.append(str(exc))
    if expect.startswith("fix"):
        a, b = results
        assert a.frame_id == b.frame_id == "utm" and a.utm_zone == b.utm_zone == 33
        np.testing.assert_array_equal(a.position, b.position)
        np.testing.assert_array_equal(a.gps, b.gps)
        assert not a.has_orientation
        if "unknown altitude" in expect:
            assert a.position[2] == 0.0 and math.isnan(a.gps[2])  # position finite, geotag altitude unknown
        else:
            assert a.position[2] == 42.0 and a.gps[2] == 42.0
    else:
        assert results[0] == results[1] and expect in results[0]


def test_zero_stamp_takes_the_fallback() -> None:
    _, msg = pose_msg("odometry", 0, (1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    assert pose_from_msg(msg, "odometry").stamp_ns == 0
    assert pose_from_msg(msg, "odometry", fallback_stamp_ns=123).stamp_ns == 123


def test_a_bag_track_and_the_live_buffer_agree(tmp_path) -> None:
    """The same odometry (with a zero quaternion and a corrupt pose in it) offline and live: same poses."""
    poses = []
    for k in range(20):
        position = (0.5 * k, 0.1 * k, 0.0) if k != 7 else (1e300, 0.0, 0.0)
        orientation = (0.0, 0.0, math.sin(0.05 * k), math.cos(0.05 * k)) if k != 3 else (0.0, 0.0, 0.0, 0.0)
        poses.append(pose_msg("odometry", T0 + k * NS // 10, position, orientation, frame_id="odom")[1])
    write_bag(tmp_path / "bag", [BagMessage("/odom", ODOMETRY, T0 + k, m) for k, m in enumerate(poses)])
    track = read_pose_track(tmp_path / "bag", "/odom")  # offline: a zero quaternion is no longer an error
    assert len(track) == 19 and track.frame_id == "odom"  # the 1e300 pose is dropped
    assert not track.has_orientation[3]
    buffer = PoseBuffer(PosePairingConfig(max_gap_s=0.2, buffer_s=60.0))
    for msg in poses:
        try:
            buffer.add(pose_from_msg(as_rclpy(ODOMETRY, msg), "odometry"))
        except PoseMessageError:
            pass
    queries = np.array([T0 + k * NS // 20 for k in range(1, 38)], np.int64)
    offline = track.interpolate(queries, 0.2)
    for i, stamp in enumerate(queries):
        live = buffer.at(int(stamp))
        assert (live is not None) == bool(offline.valid[i]), stamp
        if live is not None:
            np.testing.assert_array_equal(live.position, offline.positions[i])
            np.testing.assert_array_equal(live.orientation, offline.orientations[i])


def test_gps_geotags_agree_offline_and_live(tmp_path) -> None:
    """Fixes with an unknown altitude in between: the bag builder's geotags and the live buffer's agree."""
    from dinomix_ros.maps.geotags import GpsTrack

    fixes = [navsatfix_msg(T0 + k * NS, 55.70 + 1e-5 * k, 13.19, 40.0 + k if k not in (2, 3) else math.nan)
             for k in range(5)]
    fixes.append(navsatfix_msg(T0 + 9 * NS, 0.0, 0.0, status=-1))
    write_bag(tmp_path / "gps", [BagMessage("/fix", NAVSATFIX, T0 + k, m) for k, m in enumerate(fixes)])
    offline = read_gps_fixes(tmp_path / "gps", "/fix")
    assert len(offline) == 5 and math.isnan(offline.alt[2])
    buffer = PoseBuffer(PosePairingConfig(max_gap_s=1.0, buffer_s=60.0))
    for msg in fixes[:5]:
        buffer.add(pose_from_msg(as_rclpy(NAVSATFIX, msg), "navsatfix"))
    queries = np.array([T0 + k * NS // 4 for k in range(17)], np.int64)
    tags = GpsTrack.from_fixes(offline).geotag(queries, 1.0)
    for i, stamp in enumerate(queries):
        live = buffer.at(int(stamp))
        np.testing.assert_array_equal(live.gps, tags["gps"][i])
    assert math.isnan(buffer.at(T0 + 2 * NS).gps[2])  # altitudes 1 s and 2 s away: unknown, not made up
    assert buffer.at(T0 + NS).gps[2] == pytest.approx(41.0)  # a fix with its altitude
    assert math.isfinite(buffer.at(T0 + 2 * NS).gps[0])  # the fix itself is known
