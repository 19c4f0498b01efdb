"""ROS 2 bags (mcap or sqlite3) read with the pure-Python ``rosbags`` library: images and pose sources.

ROS-free: messages are rosbags dataclasses with the same field names as rclpy messages, so image decoding goes
through :func:`dinomix_ros.imaging.decode.decode_image_msg` like the live node. Stamps are the messages' header stamps
(capture time) in int64 nanoseconds; a zero header stamp falls back to the bag's receive time with a warning.

Pose sources (``nav_msgs/Odometry``, ``geometry_msgs/PoseStamped``, ``geometry_msgs/PoseWithCovarianceStamped``,
``sensor_msgs/NavSatFix``) are parsed by :mod:`dinomix_ros.maps.sources.posemsg`, the parser the live node uses:
messages without a usable pose (no GNSS fix, non-finite or absurd positions) are dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel, CameraModelError, camera_from_info, camera_info_topic
from dinomix_ros.imaging.decode import DEFAULT_MAX_PIXELS, decode_image_msg
from dinomix_ros.maps.sources.posemsg import POSE_KINDS, PoseMessageError, PoseSample, kind_of_msgtype, pose_from_msg
from dinomix_ros.maps.sources.poses import PoseTrack
from dinomix_ros.util.stamps import header_stamp_ns

__all__ = [
    "IMAGE_TYPES",
    "POSE_TYPES",
    "NAVSATFIX_TYPE",
    "BagError",
    "BagImage",
    "GpsFixes",
    "bag_topics",
    "read_pose_track",
    "read_gps_fixes",
    "iter_images",
    "open_reader",
    "count_messages",
    "read_camera_info",
]

_logger = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPES = tuple(POSE_KINDS.values())
NAVSATFIX_TYPE = POSE_KINDS["navsatfix"]


class BagError(ValueError):
    """A bag, topic or message that cannot be used as asked."""


@contextlib.contextmanager
def open_reader(path: str | Path) -> Iterator:
    """An open rosbags AnyReader over one bag directory (or file), with the Kilted typestore for bags without types
    (loaded only for those).

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
    # AnyReader uses a default typestore only for a bag without message definitions of its own; building the
    # Kilted one costs 0.3 s, which `dinomix map topics` would otherwise pay on every bag.
    reader = AnyReader([path])
    try:
        try:
            reader.open()
        except AnyReaderError as exc:
            if "no type definitions" not in str(exc):
                raise
            reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
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


def _connections(reader: Any, topics: Sequence[str], allowed: Sequence[str]) -> list:
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
    ns = header_stamp_ns(msg)
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


def _pose_samples(path: str | Path, topic: str, allowed: Sequence[str],
                  utm_zone: int | None = None) -> tuple[str, list[PoseSample]]:
    """(kind, samples) of a pose topic, parsed by :func:`~dinomix_ros.maps.sources.posemsg.pose_from_msg`; refused
    messages are counted in the log. NavSatFix samples are all projected in the zone of the first usable fix (or
    ``utm_zone``), so distances stay consistent."""
    samples: list[PoseSample] = []
    refused: list[str] = []
    warned: set = set()
    with open_reader(path) as reader:
        conns = _connections(reader, [topic], allowed)
        kind = kind_of_msgtype(conns[0].msgtype)
        zone = utm_zone
        for conn, receive_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            try:
                sample = pose_from_msg(msg, kind, utm_zone=zone, fallback_stamp_ns=_stamp_ns(msg, receive_ns, warned,
                                                                                             topic))
            except PoseMessageError as exc:
                refused.append(str(exc))
                continue
            if kind == "navsatfix" and zone is None:
                zone = sample.utm_zone
            samples.append(sample)
    if refused:
        _logger.info("%s: dropped %d of %d messages without a usable pose (first: %s)", topic, len(refused),
                     len(refused) + len(samples), refused[0])
    if not samples:
        raise BagError(f"{topic} has no usable pose ({len(refused)} messages, all refused"
                       + (f"; first: {refused[0]})" if refused else ")"))
    return kind, samples


def read_gps_fixes(path: str | Path, topic: str) -> GpsFixes:
    """All valid fixes (status >= 0, finite lat/lon) of a NavSatFix topic, in stamp order."""
    _, samples = _pose_samples(path, topic, (NAVSATFIX_TYPE,))
    order = np.argsort(np.asarray([s.stamp_ns for s in samples], np.int64), kind="stable")
    gps = np.stack([samples[i].gps for i in order])
    stamps = np.asarray([samples[i].stamp_ns for i in order], np.int64)
    return GpsFixes(stamps, gps[:, 0].copy(), gps[:, 1].copy(), gps[:, 2].copy())


def read_pose_track(path: str | Path, topic: str, *, utm_zone: int | None = None) -> PoseTrack:
    """Every usable pose of ``topic`` as a :class:`~dinomix_ros.maps.sources.poses.PoseTrack` in the message frame.

    Messages are parsed like the live node parses them (:func:`~dinomix_ros.maps.sources.posemsg.pose_from_msg`):
    an all-zero quaternion means "orientation unknown", a message without a usable position is dropped and counted.

    Args:
        path: bag directory or file.
        topic: an Odometry, PoseStamped, PoseWithCovarianceStamped or NavSatFix topic.
        utm_zone: for NavSatFix, force this UTM zone (default: the zone of the first fix).

    Raises:
        BagError: missing topic, wrong type, no usable pose, or poses in several frames.
        FileNotFoundError: missing bag.
    """
    kind, samples = _pose_samples(path, topic, POSE_TYPES, utm_zone)
    if kind == "navsatfix":
        frame = samples[0].frame_id  # utm: every fix projected in the first fix's zone
    else:
        frames = {s.frame_id for s in samples}
        if len(frames) > 1:
            raise BagError(f"{topic} has poses in several frames {sorted(frames)}; expected one map frame")
        frame = frames.pop()
    return PoseTrack(np.asarray([s.stamp_ns for s in samples], np.int64), np.stack([s.position for s in samples]),
                     np.stack([s.orientation for s in samples]), frame_id=frame)


@dataclass
class BagImage:
    """One image message from a bag, decoded on demand."""

    topic: str
    stamp_ns: int
    receive_ns: int
    frame_id: str
    msg: object

    def decode(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
        """(array, encoding); raises ImageDecodeError for a bad message or one of more than ``max_pixels`` pixels."""
        return decode_image_msg(self.msg, max_pixels)


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


CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"


def read_camera_info(path: str | Path, image_topic: str) -> CameraModel | None:
    """The intrinsics of the camera of ``image_topic``: the first valid ``sensor_msgs/CameraInfo`` on its
    camera_info topic (image_transport naming: the image topic's namespace + ``camera_info``), None when the bag has
    none (or only uncalibrated ones: K all zero)."""
    topic = camera_info_topic(image_topic)
    with open_reader(path) as reader:
        if not any(c.topic == topic and c.msgtype == CAMERA_INFO_TYPE for c in reader.connections):
            return None
        for conn, _, raw in reader.messages(connections=_connections(reader, [topic], (CAMERA_INFO_TYPE,))):
            msg = reader.deserialize(raw, conn.msgtype)
            try:
                return camera_from_info(msg)
            except CameraModelError as exc:
                _logger.warning("%s: camera_info skipped: %s", topic, exc)
    return None
