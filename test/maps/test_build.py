"""dinomix_ros.maps.build, build_bag and build_folder: maps from synthetic bags and real image folders, and appending
to a saved map.

The encoder has seeded random weights (descriptors carry no place information), so these tests check the pipeline:
which frames become keyframes, their poses, geotags, stamps and sources, and that row i describes image i.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from bagfactory import GeoOrigin, Motion, photo_frames, write_camera_bag

from dinomix_ros.maps.build import BuildReport, MapBuildError
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag, check_bag_config
from dinomix_ros.maps.build_folder import build_map_from_folder
from dinomix_ros.maps.geotags import NO_POSE_FRAME, GpsTrack
from dinomix_ros.maps.keyframes import KeyframeMap, MapMismatchError
from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.maps.sources.bags import BagError
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, quat_angle, select_keyframes, yaw_to_quat
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

LUND = Path(__file__).resolve().parents[1] / "data" / "lund_gps"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32", batch_size=3, workers=2))


def expected_keyframes(stamps: np.ndarray, positions: np.ndarray, orientations: np.ndarray | None,
                       gate: KeyframeGateConfig = KeyframeGateConfig()) -> np.ndarray:
    """Reference: a fresh gate over the true poses (the gate itself is tested in test_poses)."""
    return select_keyframes(stamps, positions, orientations, gate.min_distance_m, gate.min_rotation_deg,
                            gate.min_interval_s, gate.max_interval_s)


def assert_report_adds_up(report: BuildReport) -> None:
    assert report.images_seen == report.no_pose + report.not_keyframes + report.bad + report.added
    assert report.seconds > 0 and report.images_per_s == pytest.approx(report.images_seen / report.seconds)


# ------------------------------------------------------------------------------------------------ bags


@pytest.mark.parametrize(("storage", "image_format", "pose_kind", "gps_topic"), [
    ("mcap", "rgb8", "odometry", "/gps/fix"),
    ("sqlite3", "jpeg", "navsatfix", None),  # a NavSatFix pose topic also geotags the keyframes
])
def test_bag_map_keyframes_poses_and_geotags(tmp_path: Path, encoder: Encoder, storage: str, image_format: str,
                                             pose_kind: str, gps_topic: str | None) -> None:
    motion = Motion(origin=(1.0, 2.0, 0.0), velocity=(0.8, 0.6, 0.0), yaw0=0.3, yaw_rate=0.2)  # 1 m/s
    frames = photo_frames(10)
    # Poses end 1.45 s after the first frame: frame 8 (1.6 s) is within the 0.2 s gap, frame 9 (1.8 s) is not.
    bag = write_camera_bag(tmp_path / "bag", storage=storage, frames=frames, image_format=image_format,
                           motion=motion, pose_kind=pose_kind, pose_topic="/pose", pose_span_s=(-0.1037, 1.45),
                           gps_topic=gps_topic or "", gps_rate_hz=4.0)
    config = BagMapConfig(image_topics=["/camera/image_raw"], pose_topic="/pose", gps_topic=gps_topic)
    kmap, report = build_map_from_bag(bag.path, encoder, config, progress=False)

    with_pose = bag.image_stamps_ns[:9]
    keep = expected_keyframes(with_pose, motion.position(with_pose),
                              motion.orientation(with_pose) if pose_kind != "navsatfix" else None)
    stamps = with_pose[keep]
    assert np.flatnonzero(keep).tolist() == [0, 3, 6]  # 0.2 m apart, 0.5 m gate; 7 deg of turn stays below 15
    assert (report.images_seen, report.no_pose, report.bad, report.added) == (10, 1, 0, len(stamps))
    assert_report_adds_up(report)
    assert report.frame_id == bag.pose_frame_id and kmap.frames == [bag.pose_frame_id]
    np.testing.assert_array_equal(kmap.stamps_ns, stamps)
    np.testing.assert_array_equal(kmap.ids, np.arange(len(stamps)))
    assert kmap.sources.tolist() == [f"bag:/camera/image_raw@{s}" for s in stamps]
    assert kmap.camera_names == ["/camera/image_raw"] and report.per_camera == {"/camera/image_raw": len(stamps)}
    tolerance = 1e-3 if pose_kind == "navsatfix" else 1e-9  # UTM <-> lat/lon round trip: sub-millimetre
    np.testing.assert_allclose(kmap.positions, bag.expected_positions(stamps), atol=tolerance, rtol=0)
    if pose_kind == "navsatfix":
        assert np.isnan(kmap.orientations).all()
    else:
        assert np.max(quat_angle(kmap.orientations, motion.orientation(stamps))) < 1e-7
    # Geotags: lat/lon/alt interpolated between fixes, UTM in zone 33 band U (Lund).
    np.testing.assert_allclose(kmap.gps, bag.expected_gps(stamps), atol=1e-8, rtol=0)
    np.testing.assert_allclose(kmap.utm, GeoOrigin().utm_of(motion.position(stamps)), atol=1e-3, rtol=0)
    assert set(kmap.utm_zones.tolist()) == {33} and set(kmap.utm_bands.tolist()) == {"U"}
    assert report.no_geotag == 0
    # Row i describes keyframe image i (batches of 3 keep their order); float16 storage.
    expected = encoder.describe([frames[i] for i in np.flatnonzero(keep)], encoding="rgb8")
    cosine = np.sum(kmap.descriptors_f32() * expected, axis=1)
    assert cosine.min() > (0.9999 if image_format == "rgb8" else 0.98)


def test_images_from_one_bag_poses_and_gps_from_another(tmp_path: Path, encoder: Encoder) -> None:
    """A camera bag and a bag with the rest of the drive (odometry, GNSS), recorded at the same time, give the map
    that one bag holding everything gives."""
    motion = Motion(velocity=(1.0, 0.0, 0.0))
    frames = photo_frames(8)
    together = write_camera_bag(tmp_path / "together", frames=frames, motion=motion, gps_topic="/gps/fix")
    images = write_camera_bag(tmp_path / "camera", frames=frames, motion=motion, pose_kind=None)
    # The pose bag has images too, on another topic: only its pose and GPS topics may be read.
    poses = write_camera_bag(tmp_path / "rest", frames=frames[::-1], motion=motion, image_topics=("/other/image",),
                             gps_topic="/gps/fix")
    config = BagMapConfig(image_topics="/camera/image_raw", pose_topic="/odom", gps_topic="/gps/fix")
    expected, expected_report = build_map_from_bag(together.path, encoder, config, progress=False)
    kmap, report = build_map_from_bag(images.path, encoder, config, progress=False, pose_bag=poses.path)

    assert report.added == expected_report.added == 3 and report.no_pose == 0 and report.no_geotag == 0
    assert report.source == f"bag:{images.path} poses:{poses.path}"
    np.testing.assert_array_equal(kmap.stamps_ns, expected.stamps_ns)
    np.testing.assert_array_equal(kmap.positions, expected.positions)
    np.testing.assert_array_equal(kmap.gps, expected.gps)
    np.testing.assert_array_equal(kmap.descriptors_f32(), expected.descriptors_f32())
    assert kmap.frames == ["odom"] and kmap.sources.tolist() == expected.sources.tolist()

    # The pose topic is looked up in the pose bag only, and the message names that bag.
    with pytest.raises(BagError, match=rf"pose topic /odom is not in the bag {images.path}"):
        check_bag_config(images.path, config)
    with pytest.raises(BagError, match=rf"image topic /camera/image_raw is not in the bag {poses.path}"):
        check_bag_config(poses.path, config, pose_bag=poses.path)
    assert check_bag_config(images.path, config, pose_bag=poses.path)["/gps/fix"][0] == "sensor_msgs/msg/NavSatFix"


def test_two_cameras_gate_separately(tmp_path: Path, encoder: Encoder) -> None:
    # Turning on the spot at 40 deg/s, 5 Hz: 8 deg per frame, so every second frame passes the 15 deg rule.
    motion = Motion(velocity=(0.0, 0.0, 0.0), yaw_rate=np.radians(40.0))
    frames = {"/left/image": photo_frames(5), "/right/image": photo_frames(5, first=40)}
    bag = write_camera_bag(tmp_path / "bag", frames=frames, image_topics=list(frames), image_format="mono8",
                           motion=motion, pose_kind="pose_stamped", pose_topic="/pose", pose_frame_id="map")
    config = BagMapConfig(image_topics=list(frames), pose_topic="/pose", camera_names=("left", "right"))
    kmap, report = build_map_from_bag(bag.path, encoder, config, progress=False)
    keep = expected_keyframes(bag.image_stamps_ns, None, motion.orientation(bag.image_stamps_ns))
    assert np.flatnonzero(keep).tolist() == [0, 2, 4]
    assert report.per_camera == {"left": 3, "right": 3} and report.not_keyframes == 4 and report.added == 6
    assert kmap.cameras.tolist() == ["left", "right"] * 3  # bag order; both cameras share the stamps
    np.testing.assert_array_equal(kmap.stamps_ns, np.repeat(bag.image_stamps_ns[keep], 2))
    assert kmap.frames == ["map"] and np.isnan(kmap.gps).all() and (kmap.utm_zones == 0).all()
    left, right = kmap.descriptors_f32()[0], kmap.descriptors_f32()[1]
    assert float(left @ right) < 0.9999  # different pictures, different descriptors


def test_an_undecodable_keyframe_is_counted_and_gives_its_gate_slot_back(
        tmp_path: Path, encoder: Encoder, caplog: pytest.LogCaptureFixture) -> None:
    # 0.2 m per frame and a 0.5 m gate: keyframes 0, 3, 6. Frame 3 is corrupt, so frame 4 takes its place.
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(8), image_format="jpeg", bad_indices=[3],
                           motion=Motion(velocity=(1.0, 0.0, 0.0)))
    config = BagMapConfig(image_topics=["/camera/image_raw"], pose_topic="/odom")
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.build_bag"):
        kmap, report = build_map_from_bag(bag.path, encoder, config, progress=False)
    assert (report.bad, report.added, report.no_pose) == (1, 3, 0)
    assert_report_adds_up(report)
    np.testing.assert_array_equal(kmap.stamps_ns, bag.image_stamps_ns[[0, 4, 7]])
    assert any("skipping undecodable image bag:/camera/image_raw@" in r.getMessage() for r in caplog.records)


def test_append_to_a_saved_map_and_refuse_another_model(tmp_path: Path, encoder: Encoder) -> None:
    first = write_camera_bag(tmp_path / "first", frames=photo_frames(4), motion=Motion(velocity=(2.0, 0, 0)),
                             pose_kind="pose_cov", pose_frame_id="map")
    config = BagMapConfig(image_topics=["/camera/image_raw"], pose_topic="/odom",
                          gate=KeyframeGateConfig(min_distance_m=0.7))
    kmap, report = build_map_from_bag(first.path, encoder, config, progress=False)
    assert report.added == 2  # 0.4 m per frame: frames 0 and 2
    save_map(kmap, tmp_path / "office.dinomap")
    later = Motion(start_ns=first.motion.start_ns + 60_000_000_000, origin=(5.0, 0.0, 0.0), velocity=(2.0, 0, 0))
    second = write_camera_bag(tmp_path / "second", frames=photo_frames(3, first=50), motion=later,
                              pose_kind="pose_cov", pose_frame_id="map", image_format="png")
    loaded = load_map(tmp_path / "office.dinomap", expected_fingerprint=encoder.fingerprint.to_dict())
    appended, report2 = build_map_from_bag(second.path, encoder, config, kmap=loaded, progress=False)
    assert appended is loaded and report2.added == 2 and len(appended) == 4
    np.testing.assert_array_equal(appended.ids, np.arange(4))
    np.testing.assert_array_equal(appended.stamps_ns[2:], second.image_stamps_ns[[0, 2]])
    np.testing.assert_allclose(appended.positions[:, 0], [0.0, 0.8, 5.0, 5.8], atol=1e-9)
    save_map(appended, tmp_path / "office.dinomap")
    assert read_manifest(tmp_path / "office.dinomap")["count"] == 4

    other = KeyframeMap.empty({**encoder.fingerprint.to_dict(), "id": "dmx-0000000000000000"})
    with pytest.raises(MapMismatchError, match=r"built with model dmx-0000000000000000 .* model in use is dmx-"):
        build_map_from_bag(tmp_path / "not-even-read", encoder, config, kmap=other, progress=False)
    with pytest.raises(MapMismatchError, match=r"descriptors of different models are not comparable"):
        build_map_from_folder(tmp_path / "not-even-read", encoder, kmap=other, progress=False)
    assert len(other) == 0


# ------------------------------------------------------------------------------------------------ folders


def test_lund_exif_folder_map_matches_the_csv(tmp_path: Path, encoder: Encoder) -> None:
    folder = tmp_path / "lund"
    folder.mkdir()
    names = ["01.jpg", "02.jpg", "05.jpg", "09.jpg", "14.jpg", "20.jpg"]
    for name in names:
        shutil.copy(LUND / "images" / name, folder / name)  # a byte copy: the EXIF GPS tags come along
    kmap, report = build_map_from_folder(folder, encoder, geotag_source="exif", progress=False)
    assert (report.images_seen, report.added, report.bad, report.no_geotag) == (6, 6, 0, 0)
    rows = {r[0]: r for r in (line.split(",") for line in (LUND / "gps_from_exif.csv").read_text().splitlines()[1:])}
    csv = np.array([[float(v) for v in rows[n][3:6] + rows[n][7:9]] for n in names])  # lat lon alt east north
    np.testing.assert_allclose(kmap.gps, csv[:, :3], atol=1e-6, rtol=0)  # the CSV rounds to 7 decimals
    np.testing.assert_allclose(kmap.utm, csv[:, 3:], atol=0.5, rtol=0)
    np.testing.assert_allclose(kmap.positions, csv[:, [3, 4, 2]], atol=0.5, rtol=0)  # easting, northing, altitude
    assert kmap.frames == ["utm"] and set(kmap.utm_bands.tolist()) == {"U"} and set(kmap.utm_zones.tolist()) == {33}
    assert np.isnan(kmap.orientations).all()
    assert (kmap.stamps_ns == 0).all()  # documented: folder images have no capture time
    assert kmap.sources.tolist() == [str(folder / n) for n in names] and kmap.camera_names == ["images"]


def test_xy_csv_folder_untagged_folder_and_bad_files(tmp_path: Path, encoder: Encoder) -> None:
    folder = tmp_path / "xy"
    folder.mkdir()
    for i, rgb in enumerate(photo_frames(3)):
        cv2.imwrite(str(folder / f"f{i}.png"), rgb[:, :, ::-1])
    (folder / "poses.csv").write_text("image,x,y,yaw\nf0.png,1.5,2.0,0.5\nf1.png,3.0,-1.0,\nf2.png,0,0,3.0\n")
    kmap, report = build_map_from_folder(folder, encoder, camera="front", progress=False)  # auto: the one CSV
    assert report.added == 3 and report.no_geotag == 0 and kmap.frames == ["map"]
    np.testing.assert_allclose(kmap.positions, [[1.5, 2.0, 0.0], [3.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(kmap.orientations[[0, 2]], yaw_to_quat(np.array([0.5, 3.0])), atol=1e-12)
    assert np.isnan(kmap.orientations[1]).all() and np.isnan(kmap.gps).all()

    # No geotags: still a map (retrieval works), in the documented "none" frame; a broken file is skipped.
    (folder / "f1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    appended, report2 = build_map_from_folder(folder, encoder, geotag_source="none", kmap=kmap, progress=False)
    assert (report2.images_seen, report2.added, report2.bad, report2.no_geotag) == (3, 2, 1, 2)
    assert report2.frame_id == NO_POSE_FRAME and appended.frames == ["map", NO_POSE_FRAME]
    assert np.isnan(appended.positions[3:]).all() and appended.sources[3:].tolist() == [str(folder / "f0.png"),
                                                                                        str(folder / "f2.png")]
    # The same image described twice (once per build) gives the same descriptor.
    assert float(appended.descriptors_f32()[0] @ appended.descriptors_f32()[3]) > 0.9999


# ------------------------------------------------------------------------------------------------ configuration


def test_config_and_topic_checks(tmp_path: Path) -> None:
    with pytest.raises(MapBuildError, match=r"2 camera names \['a', 'b'\] for 1 image topics"):
        BagMapConfig(image_topics=["/cam"], pose_topic="/odom", camera_names=("a", "b"))
    with pytest.raises(MapBuildError, match=r"image_topics is \[\]; expected one or more topic names"):
        BagMapConfig(image_topics=[], pose_topic="/odom")
    with pytest.raises(MapBuildError, match=r"name a topic twice"):
        BagMapConfig(image_topics=["/cam", "/cam"], pose_topic="/odom")
    with pytest.raises(ValueError, match=r"max_gps_gap_s must be >= 0, got -1"):
        BagMapConfig(image_topics="/cam", pose_topic="/odom", max_gps_gap_s=-1)
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2), gps_topic="/fix")
    ok = BagMapConfig(image_topics="/camera/image_raw", pose_topic="/odom", gps_topic="/fix")
    assert check_bag_config(bag.path, ok)["/odom"] == ("nav_msgs/msg/Odometry", len(bag.pose_stamps_ns))
    with pytest.raises(BagError, match=r"image topic /cam is not in the bag .*it has: /camera/image_raw, /fix, /odom"):
        check_bag_config(bag.path, BagMapConfig(image_topics="/cam", pose_topic="/odom"))
    with pytest.raises(BagError, match=r"pose topic /camera/image_raw carries sensor_msgs/msg/Image"):
        check_bag_config(bag.path, BagMapConfig(image_topics="/camera/image_raw", pose_topic="/camera/image_raw"))
    with pytest.raises(BagError, match=r"GPS topic /odom carries nav_msgs/msg/Odometry; expected one of sensor_msgs"):
        check_bag_config(bag.path, BagMapConfig(image_topics="/camera/image_raw", pose_topic="/odom",
                                                gps_topic="/odom"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.yaml").write_text("not: [a bag")
    with pytest.raises(BagError, match=r"cannot read bag .*junk"):
        check_bag_config(tmp_path / "junk", ok)


def test_gps_track_interpolates_and_leaves_gaps_and_unknown_altitude_empty() -> None:
    geo = GeoOrigin()
    stamps = np.array([0, 1_000_000_000, 2_000_000_000, 6_000_000_000], np.int64)
    lat, lon = geo.latlon_of(np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [60.0, 0.0]]))
    track = GpsTrack(stamps, lat, lon, np.array([37.0, np.nan, 39.0, 40.0]))
    tags = track.geotag(np.array([500_000_000, 1_500_000_000, 3_500_000_000], np.int64), max_gap_s=1.6)
    assert tags["valid"].tolist() == [True, True, False]  # 3.5 s lies in a 4 s hole between fixes
    np.testing.assert_allclose(tags["utm"][:2], geo.utm_of(np.array([[5.0, 0.0], [15.0, 0.0]])), atol=1e-3)
    np.testing.assert_allclose(tags["gps"][:2, 2], [37.5, 38.5])  # altitude over the fixes that have one
    assert np.isnan(tags["gps"][2]).all() and tags["utm_zones"].tolist() == [33, 33, 0]
    assert tags["utm_bands"] == ["U", "U", ""]
