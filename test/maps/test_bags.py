"""dinomix_ros.maps.sources.bags on the real T265 bag (checked against kapture's own export) and on synthetic bags.

The real bag (test/data/t265_office_bag, see its SOURCE.md) exists as mcap and sqlite3; both must read the same.
Synthetic bags come from test/bagfactory.py: every image encoding and pose message type, in both storages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from bagfactory import (
    NAVSATFIX,
    ODOMETRY,
    BagMessage,
    GeoOrigin,
    Motion,
    convert_rgb,
    image_msg,
    navsatfix_msg,
    odometry_msg,
    photo_frames,
    write_bag,
    write_camera_bag,
)

from dinomix_ros.maps.sources.bags import BagError, bag_topics, iter_images, read_gps_fixes, read_pose_track
from dinomix_ros.imaging.decode import ImageDecodeError
from dinomix_ros.maps.sources.poses import quat_angle, quat_to_matrix

T265 = Path(__file__).resolve().parents[1] / "data" / "t265_office_bag"
STORAGE_DIRS = {"mcap": T265 / "ros2_mcap", "sqlite3": T265 / "ros2_sqlite3"}
CAMS = ("/camera/fisheye1/image_raw", "/camera/fisheye2/image_raw")
ODOM = "/camera/odom/sample"
# (x, y, z)_odom = (z, -x, -y)_kapture (SOURCE.md): a proper rotation (det +1) of both the world and the body axes.
KAPTURE_TO_ODOM = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def kapture_rows(name: str) -> list[list[str]]:
    lines = (T265 / "kapture_export" / "sensors" / name).read_text().splitlines()
    return [[c.strip() for c in line.split(",")] for line in lines if line and not line.startswith("#")]


def kapture_poses() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamps, odometry-frame camera centres (N, 3) and odometry-frame rotation matrices (N, 3, 3)."""
    stamps, centres, rotations = [], [], []
    for row in kapture_rows("trajectories.txt"):
        qw, qx, qy, qz, tx, ty, tz = map(float, row[2:])
        r_wc = quat_to_matrix(np.array([qx, qy, qz, qw]))  # world-to-device rotation
        centre = -r_wc.T @ np.array([tx, ty, tz])  # C = -R^T t
        stamps.append(int(row[0]))
        centres.append(KAPTURE_TO_ODOM @ centre)
        rotations.append(KAPTURE_TO_ODOM @ r_wc.T @ KAPTURE_TO_ODOM.T)
    return np.array(stamps, np.int64), np.array(centres), np.array(rotations)


# ------------------------------------------------------------------------------------------------ the real T265 bag


@pytest.mark.parametrize("storage", sorted(STORAGE_DIRS))
def test_real_bag_topics(storage: str) -> None:
    assert bag_topics(STORAGE_DIRS[storage]) == {
        "/camera/fisheye1/image_raw": ("sensor_msgs/msg/Image", 3),
        "/camera/fisheye2/image_raw": ("sensor_msgs/msg/Image", 3),
        "/camera/odom/sample": ("nav_msgs/msg/Odometry", 19),
        "/camera/gyro/sample": ("sensor_msgs/msg/Imu", 19),
        "/camera/accel/sample": ("sensor_msgs/msg/Imu", 6),
    }


@pytest.mark.parametrize("storage", sorted(STORAGE_DIRS))
def test_real_bag_images_are_mono8_fisheye_pairs_with_kapture_stamps(storage: str) -> None:
    images = list(iter_images(STORAGE_DIRS[storage], CAMS))
    assert [im.topic for im in images] == [CAMS[0], CAMS[1]] * 3  # bag (receive) order: left, then right
    by_cam = {cam: [im for im in images if im.topic == cam] for cam in CAMS}
    left_stamps = [im.stamp_ns for im in by_cam[CAMS[0]]]
    assert left_stamps == [im.stamp_ns for im in by_cam[CAMS[1]]]  # a stereo pair shares its stamp
    assert left_stamps == [int(r[0]) for r in kapture_rows("records_camera.txt") if r[1] == "cam001"]
    assert all(im.receive_ns > im.stamp_ns for im in images)  # header stamp = capture, before reception
    for im in images:
        array, encoding = im.decode()
        assert encoding == "mono8" and array.shape == (800, 848) and array.dtype == np.uint8
        assert im.frame_id == f"camera_fisheye{1 if im.topic == CAMS[0] else 2}_optical_frame"
        assert 10.0 < float(array.std())  # a real picture, not a blank buffer
    left, right = (by_cam[c][0].decode()[0].astype(float) for c in CAMS)
    assert np.abs(left - right).mean() > 5.0  # two different cameras


@pytest.mark.parametrize("storage", sorted(STORAGE_DIRS))
def test_real_bag_odometry_matches_the_kapture_export(storage: str) -> None:
    track = read_pose_track(STORAGE_DIRS[storage], ODOM)
    assert len(track) == 19 and track.frame_id == "camera_odom_frame"
    stamps, centres, rotations = kapture_poses()
    # kapture took, for each image, the odometry sample nearest in time (10.2 ms after the first image, which
    # precedes the track; 2.0 ms after the second; 1.3 ms before the third): equal to ~1e-15 m.
    nearest = np.abs(track.stamps_ns[None, :] - stamps[:, None]).argmin(axis=1)
    assert nearest.tolist() == [0, 5, 11]
    np.testing.assert_allclose(track.positions[nearest], centres, atol=1e-6, rtol=0)
    for q, r in zip(track.orientations[nearest], rotations):
        np.testing.assert_allclose(quat_to_matrix(q), r, atol=1e-6)
    # Interpolating at the exact image stamps moves the pose by at most the motion within a few ms.
    poses = track.interpolate(stamps, max_gap_s=0.2)
    assert poses.valid.all()
    assert np.abs(poses.positions - centres).max() < 5e-4
    for q, r in zip(poses.orientations, rotations):
        assert np.degrees(np.arccos(np.clip((np.trace(quat_to_matrix(q).T @ r) - 1) / 2, -1, 1))) < 0.2


def test_real_bag_storages_hold_the_same_messages() -> None:
    mcap, sqlite = (STORAGE_DIRS[s] for s in ("mcap", "sqlite3"))
    for a, b in zip(iter_images(mcap, CAMS), iter_images(sqlite, CAMS), strict=True):
        assert (a.topic, a.stamp_ns, a.receive_ns) == (b.topic, b.stamp_ns, b.receive_ns)
        np.testing.assert_array_equal(a.decode()[0], b.decode()[0])
    ta, tb = read_pose_track(mcap, ODOM), read_pose_track(sqlite, ODOM)
    np.testing.assert_array_equal(ta.stamps_ns, tb.stamps_ns)
    np.testing.assert_array_equal(ta.positions, tb.positions)


# ------------------------------------------------------------------------------------------------ synthetic bags


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("image_format", ["rgb8", "bgr8", "rgba8", "mono8", "mono16", "jpeg", "png"])
def test_synthetic_images_decode_to_what_was_written(tmp_path: Path, storage: str, image_format: str) -> None:
    frames = photo_frames(3)
    bag = write_camera_bag(tmp_path / "bag", storage=storage, frames=frames, image_format=image_format)
    images = list(iter_images(bag.path, bag.image_topics))
    assert [im.stamp_ns for im in images] == bag.image_stamps_ns.tolist()
    assert [im.receive_ns - im.stamp_ns for im in images] == [bag.receive_delay_ns] * 3
    for im, rgb in zip(images, frames):
        array, encoding = im.decode()
        assert im.frame_id == "camera_optical_frame"
        if image_format == "jpeg":
            assert encoding == "bgr8" and array.shape == rgb.shape
            assert np.abs(array[:, :, ::-1].astype(int) - rgb).mean() < 4.0  # lossy, but the same picture
        elif image_format == "png":
            assert encoding == "bgr8"
            np.testing.assert_array_equal(array[:, :, ::-1], rgb)
        else:
            assert encoding == image_format
            np.testing.assert_array_equal(array, convert_rgb(rgb, image_format))


def test_row_padding_is_honoured(tmp_path: Path) -> None:
    rgb = photo_frames(1)[0]
    msg = image_msg(rgb, 5, encoding="mono16", row_padding=6)
    assert msg.step == 64 * 2 + 6
    write_bag(tmp_path / "bag", [BagMessage("/cam", "sensor_msgs/msg/Image", 10, msg)])
    (image,) = iter_images(tmp_path / "bag", ["/cam"])
    np.testing.assert_array_equal(image.decode()[0], convert_rgb(rgb, "mono16"))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
@pytest.mark.parametrize("pose_kind", ["odometry", "pose_stamped", "pose_cov"])
def test_synthetic_pose_tracks(tmp_path: Path, storage: str, pose_kind: str) -> None:
    motion = Motion(origin=(2.0, -1.0, 0.5), velocity=(0.8, 0.3, 0.05), yaw0=0.4, yaw_rate=0.5)
    bag = write_camera_bag(tmp_path / "bag", storage=storage, frames=photo_frames(4), motion=motion,
                           pose_kind=pose_kind, pose_frame_id="map" if pose_kind != "odometry" else None)
    track = read_pose_track(bag.path, bag.pose_topic)
    assert track.frame_id == ("odom" if pose_kind == "odometry" else "map")
    np.testing.assert_array_equal(track.stamps_ns, bag.pose_stamps_ns)
    np.testing.assert_allclose(track.positions, motion.position(bag.pose_stamps_ns), atol=1e-12)
    assert np.max(quat_angle(track.orientations, motion.orientation(bag.pose_stamps_ns))) < 1e-7
    # Image stamps fall between pose samples; the motion is linear, so interpolation is exact.
    assert not np.isin(bag.image_stamps_ns, bag.pose_stamps_ns).any()
    poses = track.interpolate(bag.image_stamps_ns, max_gap_s=0.2)
    np.testing.assert_allclose(poses.positions, motion.position(bag.image_stamps_ns), atol=1e-9)
    assert np.max(quat_angle(poses.orientations, motion.orientation(bag.image_stamps_ns))) < 1e-7


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_navsatfix_track_is_utm_without_the_no_fix_messages(tmp_path: Path, storage: str) -> None:
    geo = GeoOrigin()
    motion = Motion(velocity=(3.0, 4.0, 0.0))
    bag = write_camera_bag(tmp_path / "bag", storage=storage, frames=photo_frames(3), motion=motion,
                           pose_kind="navsatfix", pose_topic="/fix", pose_rate_hz=10.0, no_fix_every=4)
    track = read_pose_track(bag.path, "/fix")
    assert track.frame_id == "utm" == geo.frame_id
    assert len(bag.no_fix_stamps_ns) >= 1
    assert len(track) == len(bag.pose_stamps_ns) - len(bag.no_fix_stamps_ns)
    assert not np.isin(track.stamps_ns, bag.no_fix_stamps_ns).any()
    expected = bag.expected_positions(track.stamps_ns)
    np.testing.assert_allclose(track.positions, expected, atol=1e-3, rtol=0)  # projection round trip: sub-mm
    assert expected[:, 0].min() > 386_000 and expected[:, 1].min() > 6_173_000  # really UTM 33U, near Lund
    assert not track.has_orientation.any()


def test_gps_fixes_from_a_separate_topic(tmp_path: Path) -> None:
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(3), gps_topic="/gps/fix", gps_rate_hz=10.0,
                           no_fix_every=3)
    fixes = read_gps_fixes(bag.path, "/gps/fix")
    kept = ~np.isin(bag.gps_stamps_ns, bag.no_fix_stamps_ns)
    np.testing.assert_array_equal(fixes.stamps_ns, bag.gps_stamps_ns[kept])
    expected = bag.expected_gps(fixes.stamps_ns)
    np.testing.assert_allclose(np.stack([fixes.lat, fixes.lon, fixes.alt], axis=1), expected, atol=1e-9)


def test_zero_header_stamps_fall_back_to_the_receive_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(3), zero_header_stamps=True)
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.sources.bags"):
        images = list(iter_images(bag.path, bag.image_topics))
        track = read_pose_track(bag.path, bag.pose_topic)
    assert [im.stamp_ns for im in images] == (bag.image_stamps_ns + bag.receive_delay_ns).tolist()
    assert [im.stamp_ns for im in images] == [im.receive_ns for im in images]
    np.testing.assert_array_equal(track.stamps_ns, bag.pose_stamps_ns + bag.receive_delay_ns)
    warned = [r.getMessage() for r in caplog.records if "header stamps are zero" in r.getMessage()]
    assert len(warned) == 2  # once per topic, not once per message


# ------------------------------------------------------------------------------------------------ errors


def test_missing_topics_and_wrong_types_are_refused(tmp_path: Path) -> None:
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2), gps_topic="/fix")
    with pytest.raises(BagError, match=r"topic /nope is not in the bag; it has: /camera/image_raw, /fix, /odom"):
        list(iter_images(bag.path, ["/nope"]))
    with pytest.raises(BagError, match=r"topic /odom carries nav_msgs/msg/Odometry; expected one of sensor_msgs"):
        list(iter_images(bag.path, ["/odom"]))
    with pytest.raises(BagError, match=r"no image topic given"):
        list(iter_images(bag.path, []))
    with pytest.raises(BagError, match=r"topic /camera/image_raw carries sensor_msgs/msg/Image; expected one of nav"):
        read_pose_track(bag.path, "/camera/image_raw")
    with pytest.raises(BagError, match=r"topic /nope is not in the bag"):
        read_pose_track(bag.path, "/nope")
    with pytest.raises(BagError, match=r"topic /odom carries nav_msgs/msg/Odometry; expected one of sensor_msgs/msg/N"):
        read_gps_fixes(bag.path, "/odom")
    with pytest.raises(FileNotFoundError, match=r"bag .*missing does not exist"):
        bag_topics(tmp_path / "missing")


def test_bad_messages_are_refused(tmp_path: Path) -> None:
    frames = photo_frames(2)
    bag = write_camera_bag(tmp_path / "bag", frames=frames, image_format="jpeg", bad_indices=[1])
    good, bad = iter_images(bag.path, bag.image_topics)
    assert good.decode()[0].shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError, match=r"no end-of-image marker: truncated"):
        bad.decode()
    raw = write_camera_bag(tmp_path / "raw", frames=frames, image_format="rgb8", bad_indices=[0])
    with pytest.raises(ImageDecodeError, match=r"image buffer holds 9024 bytes, rgb8 64x48 with step 192 needs 9216"):
        next(iter_images(raw.path, raw.image_topics)).decode()
    nofix = [BagMessage("/fix", NAVSATFIX, 10 + k, navsatfix_msg(5 + k, 0.0, 0.0, status=-1)) for k in range(3)]
    write_bag(tmp_path / "nofix", nofix)
    with pytest.raises(BagError, match=r"/fix has no usable pose \(3 messages, all refused; first: NavSatFix without"):
        read_pose_track(tmp_path / "nofix", "/fix")
    two_frames = [BagMessage("/odom", ODOMETRY, 10 + k, odometry_msg(5 + k, (k, 0, 0), (0, 0, 0, 1), frame))
                  for k, frame in enumerate(["odom", "map"])]
    write_bag(tmp_path / "frames", two_frames, storage="sqlite3")
    with pytest.raises(BagError, match=r"/odom has poses in several frames \['map', 'odom'\]"):
        read_pose_track(tmp_path / "frames", "/odom")
