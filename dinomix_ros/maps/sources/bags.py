"""ROS 2 bags (mcap or sqlite3) read with the pure-Python ``rosbags`` library: images and pose sources.

ROS-free: messages are rosbags dataclasses with the same field names as rclpy messages, so image decoding goes
through :func:`dinomix_ros.imaging.decode.decode_image_msg` like the live node. Stamps are the messages' header stamps
(capture time) in int64 nanoseconds; a zero header stamp falls back to the bag's receive time with a warning.

Pose sources: ``nav_msgs/Odometry``, ``geometry_msgs/PoseStamped``, ``geometry_msgs/PoseWithCovarianceStamped``
(positions in their header frame) and ``sensor_msgs/NavSatFix`` (projected to UTM, frame ``utm_<zone><band>``,
no orientation; fixes with status < 0, i.e. no fix, are dropped).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinomix_ros.maps.sources.geo import latlon_to_utm, latlon_to_utm_arrays, utm_frame_id
from dinomix_ros.imaging.decode import decode_image_msg
from dinomix_ros.maps.sources.poses import PoseTrack

__all__ = [
    "IMAGE_TYPES",
    "POSE_TYPES",
    "BagError",
    "BagImage",
    "GpsFixes",
    "bag_topics",
    "read_pose_track",
    "read_gps_fixes",
    "iter_images",
    "open_reader",
    "count_messages",
]

_logger = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPES = (
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "sensor_msgs/msg/NavSatFix",
)


class BagError(ValueError):
    """A bag, topic or message that cannot be used as asked."""


@contextlib.contextmanager
def open_reader(path: str | Path) -> Iterator:
    """An open rosbags AnyReader over one bag directory (or file), with the Kilted typestore for bags without types.

    Raises:
        FileNotFoundError: no such bag.
        BagError: a bag rosbags cannot open (corrupt metadata, unknown storage, a ROS 2 directory named *.bag).
    """
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    if path.is_dir() and path.suffix == ".bag":
        raise BagError(f"{path} is a ROS 2 bag directory named *.bag, which the rosbags library reads as a ROS 1 bag "
                       "file; rename the directory (e.g. without the .bag suffix)")
    reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
    try:
        reader.open()
    except AnyReaderError as exc:
        raise BagError(f"cannot read bag {path}: {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """Topic -> (message type, message count)."""
    with open_reader(path) as reader:
        out: dict[str, tuple[str, int]] = {}
        for conn in reader.connections:
            msgtype, count = out.get(conn.topic, (conn.msgtype, 0))
            out[conn.topic] = (msgtype, count + conn.msgcount)
        return out


def _connections(reader, topics: Sequence[str], allowed: Sequence[str]) -> list:  # noqa: ANN001
    found = {c.topic: c.msgtype for c in reader.connections}
    conns = []
    for topic in topics:
        if topic not in found:
            raise BagError(f"topic {topic} is not in the bag; it has: {', '.join(sorted(found)) or 'no topics'}")
        if found[topic] not in allowed:
            raise BagError(f"topic {topic} carries {found[topic]}; expected one of {', '.join(allowed)}")
        conns += [c for c in reader.connections if c.topic == topic]
    return conns


def _stamp_ns(msg: object, receive_ns: int, warned: set, topic: str) -> int:
    stamp = msg.header.stamp  # type: ignore[attr-defined]
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    if ns == 0:
        if topic not in warned:
            warned.add(topic)
            _logger.warning("%s: header stamps are zero; using the bag's receive time instead", topic)
        return int(receive_ns)
    return ns


@dataclass(frozen=True)
class GpsFixes:
    """GNSS fixes: stamps_ns (N,) int64, lat/lon (N,) degrees, alt (N,) metres (NaN when unknown)."""

    stamps_ns: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    alt: np.ndarray

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])


def read_gps_fixes(path: str | Path, topic: str) -> GpsFixes:
    """All valid fixes (status >= 0, finite lat/lon) of a NavSatFix topic, in stamp order."""
    stamps, lat, lon, alt = [], [], [], []
    warned: set = set()
    dropped = 0
    with open_reader(path) as reader:
        conns = _connections(reader, [topic], ("sensor_msgs/msg/NavSatFix",))
        for conn, receive_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            if msg.status.status < 0 or not (np.isfinite(msg.latitude) and np.isfinite(msg.longitude)):
                dropped += 1
                continue
            stamps.append(_stamp_ns(msg, receive_ns, warned, topic))
            lat.append(msg.latitude)
            lon.append(msg.longitude)
            alt.append(msg.altitude)
    if dropped:
        _logger.info("%s: dropped %d fixes without a fix (status < 0 or NaN)", topic, dropped)
    if not stamps:
        raise BagError(f"{topic} has no valid GNSS fix (all {dropped} had status < 0 or NaN coordinates)")
    order = np.argsort(np.asarray(stamps, np.int64), kind="stable")
    arr = [np.asarray(v)[order] for v in (stamps, lat, lon, alt)]
    return GpsFixes(arr[0].astype(np.int64), arr[1].astype(float), arr[2].astype(float), arr[3].astype(float))


def read_pose_track(path: str | Path, topic: str, *, utm_zone: int | None = None) -> PoseTrack:
    """Every pose of ``topic`` as a :class:`~dinomix_ros.maps.sources.poses.PoseTrack` in the message frame.

    Args:
        path: bag directory or file.
        topic: an Odometry, PoseStamped, PoseWithCovarianceStamped or NavSatFix topic.
        utm_zone: for NavSatFix, force this UTM zone (default: the zone of the first fix).

    Raises:
        BagError: missing topic, wrong type, no poses, or poses in several frames.
        FileNotFoundError: missing bag.
    """
    with open_reader(path) as reader:
        msgtype = {c.topic: c.msgtype for c in reader.connections}.get(topic)
    if msgtype == "sensor_msgs/msg/NavSatFix":
        fixes = read_gps_fixes(path, topic)
        first = latlon_to_utm(float(fixes.lat[0]), float(fixes.lon[0]), zone=utm_zone)
        east, north = latlon_to_utm_arrays(fixes.lat, fixes.lon, first.zone, northern=first.northern)
        alt = np.where(np.isfinite(fixes.alt), fixes.alt, 0.0)
        return PoseTrack(fixes.stamps_ns, np.stack([east, north, alt], axis=1), None,
                         frame_id=utm_frame_id(first.zone, first.band))
    stamps, positions, orientations, frames = [], [], [], set()
    warned: set = set()
    with open_reader(path) as reader:
        conns = _connections(reader, [topic], POSE_TYPES)
        for conn, receive_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            pose = msg.pose.pose if conn.msgtype != "geometry_msgs/msg/PoseStamped" else msg.pose
            stamps.append(_stamp_ns(msg, receive_ns, warned, topic))
            positions.append((pose.position.x, pose.position.y, pose.position.z))
            orientations.append((pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w))
            frames.add(msg.header.frame_id)
    if not stamps:
        raise BagError(f"{topic} has no messages")
    if len(frames) > 1:
        raise BagError(f"{topic} has poses in several frames {sorted(frames)}; expected one map frame")
    return PoseTrack(np.asarray(stamps, np.int64), np.asarray(positions), np.asarray(orientations),
                     frame_id=frames.pop())


@dataclass
class BagImage:
    """One image message from a bag, decoded on demand."""

    topic: str
    stamp_ns: int
    receive_ns: int
    frame_id: str
    msg: object

    def decode(self) -> tuple[np.ndarray, str]:
        """(array, encoding); raises ImageDecodeError for a bad message."""
        return decode_image_msg(self.msg)


def iter_images(path: str | Path, topics: Sequence[str]) -> Iterator[BagImage]:
    """Image messages of the given topics in bag (receive-time) order, with header stamps."""
    if not topics:
        raise BagError("no image topic given; list the bag's topics with `dinomix map topics BAG`")
    warned: set = set()
    with open_reader(path) as reader:
        conns = _connections(reader, topics, IMAGE_TYPES)
        for conn, receive_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            yield BagImage(conn.topic, _stamp_ns(msg, receive_ns, warned, conn.topic), int(receive_ns),
                           msg.header.frame_id, msg)


def count_messages(path: str | Path, topics: Sequence[str]) -> int:
    """How many messages the topics hold (for progress bars)."""
    counts = bag_topics(path)
    return sum(counts[t][1] for t in topics if t in counts)
