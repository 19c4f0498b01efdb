"""Synthetic ROS 2 bags for tests: camera images cut from real photos, poses along a known motion, GNSS fixes.

A helper module, not a test file: tests import it from the test directory (``from bagfactory import ...``). Bags are
written with the pure-Python ``rosbags`` library (metadata version 9, mcap or sqlite3 storage, the ROS 2 Kilted
typestore), so no ROS installation is needed to make them, and a ROS 2 ``ros2 bag play`` can replay them.

Layers, from high to low:

* :func:`write_camera_bag` writes a whole scenario (cameras, a pose topic of any supported type, optional GNSS) and
  returns a :class:`CameraBag` that says what went in: image stamps, the frames, and the true pose at any stamp.
* :func:`write_bag` writes any list of :class:`BagMessage` (use it for custom topics or message orders).
* ``*_msg`` functions build single messages (``image_msg``, ``compressed_msg``, ``odometry_msg``,
  ``pose_stamped_msg``, ``pose_cov_msg``, ``navsatfix_msg``); :func:`pose_msg` picks one by kind.
* :class:`Motion` is the ground truth: constant velocity and yaw rate, so linear interpolation in position and
  slerp in orientation between any two samples are exact, and a pose interpolated at an image stamp must equal
  ``motion.position(stamp)`` to floating-point precision. :class:`GeoOrigin` places the local east/north/up frame
  of the motion on the globe (default: the first photo of test/data/lund_gps).
* :func:`photo_frames` gives distinct small RGB frames cut from the real photos in test/data, so that different
  places look different to the model.

Stamps are int64 nanoseconds. Each message is received (bag timestamp) a fixed delay after its header stamp
(``receive_delay_ns``), and messages are written in receive order, as a recorder would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from dinomix_ros.maps.sources.geo import UTMCoord, latlon_to_utm, utm_to_latlon_arrays
from dinomix_ros.maps.sources.imagefolder import list_images

__all__ = [
    "TYPESTORE",
    "STAMP0_NS",
    "DATA",
    "STORAGES",
    "IMAGE",
    "COMPRESSED_IMAGE",
    "ODOMETRY",
    "POSE_STAMPED",
    "POSE_COV",
    "NAVSATFIX",
    "POSE_KINDS",
    "RAW_FORMATS",
    "COMPRESSED_FORMATS",
    "Motion",
    "GeoOrigin",
    "BagMessage",
    "CameraBag",
    "photo_frames",
    "convert_rgb",
    "header",
    "image_msg",
    "compressed_msg",
    "odometry_msg",
    "pose_stamped_msg",
    "pose_cov_msg",
    "navsatfix_msg",
    "pose_msg",
    "write_bag",
    "write_camera_bag",
]

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
#: Default start of every synthetic recording: a ROS-epoch stamp that float64 seconds cannot hold exactly.
STAMP0_NS = 1_700_000_000_123_456_789
DATA = Path(__file__).resolve().parent / "data"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
ODOMETRY = "nav_msgs/msg/Odometry"
POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
POSE_COV = "geometry_msgs/msg/PoseWithCovarianceStamped"
NAVSATFIX = "sensor_msgs/msg/NavSatFix"
#: Short names of the pose message types :func:`pose_msg` and :func:`write_camera_bag` accept.
POSE_KINDS = {"odometry": ODOMETRY, "pose_stamped": POSE_STAMPED, "pose_cov": POSE_COV, "navsatfix": NAVSATFIX}
#: Raw ``sensor_msgs/Image`` encodings :func:`image_msg` can produce from RGB frames.
RAW_FORMATS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16")
#: ``image_format`` values of :func:`write_camera_bag` that give a CompressedImage.
COMPRESSED_FORMATS = ("jpeg", "png")

_NS = 1_000_000_000
_T = TYPESTORE.types


# --------------------------------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class Motion:
    """Planar constant-velocity motion with a constant yaw rate: the ground truth of a synthetic recording.

    ``position(t) = origin + velocity * t`` and ``yaw(t) = yaw0 + yaw_rate * t``, with ``t`` the seconds since
    ``start_ns`` (computed from integer nanoseconds). The orientation is a rotation about +z (x, y, z, w).

    Attributes:
        start_ns: stamp of t = 0.
        origin: position at t = 0, metres (east, north, up in a :class:`GeoOrigin` frame).
        velocity: metres per second.
        yaw0: heading at t = 0, radians.
        yaw_rate: radians per second.
    """

    start_ns: int = STAMP0_NS
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    velocity: tuple[float, float, float] = (1.0, 0.0, 0.0)
    yaw0: float = 0.0
    yaw_rate: float = 0.0

    def seconds(self, stamps_ns: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Seconds since ``start_ns`` (the difference is taken in integers)."""
        return (np.asarray(stamps_ns, dtype=np.int64) - self.start_ns) / _NS

    def position(self, stamps_ns: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """(N, 3) positions at the stamps ((3,) for a scalar stamp)."""
        t = self.seconds(stamps_ns)
        return np.asarray(self.origin) + t[..., None] * np.asarray(self.velocity)

    def yaw(self, stamps_ns: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Headings in radians at the stamps."""
        return self.yaw0 + self.yaw_rate * self.seconds(stamps_ns)

    def orientation(self, stamps_ns: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """(N, 4) quaternions x, y, z, w at the stamps (rotation about +z), w >= 0 for |yaw| < pi."""
        half = 0.5 * self.yaw(stamps_ns)
        zeros = np.zeros_like(half)
        return np.stack([zeros, zeros, np.sin(half), np.cos(half)], axis=-1)

    def stamps(self, rate_hz: float, duration_s: float, offset_s: float = 0.0) -> np.ndarray:
        """int64 stamps ``start + offset + k / rate`` for ``k = 0 .. floor(duration * rate)``, rounded to ns."""
        count = int(math.floor(duration_s * rate_hz + 1e-9)) + 1
        k = np.arange(count, dtype=np.int64)
        return self.start_ns + int(round(offset_s * _NS)) + np.round(k * (_NS / rate_hz)).astype(np.int64)


@dataclass(frozen=True)
class GeoOrigin:
    """Where the local east/north/up frame of a :class:`Motion` lies on the globe.

    A local position (x, y, z) is the UTM position ``(easting + x, northing + y)`` in the origin's zone at altitude
    ``alt + z``, so the UTM coordinates of a synthetic GNSS fix are known exactly.

    Attributes:
        lat: latitude of the local origin, degrees.
        lon: longitude, degrees.
        alt: altitude, metres.
    """

    lat: float = 55.6981667  # test/data/lund_gps/images/01.jpg
    lon: float = 13.1953889
    alt: float = 37.0

    @property
    def utm(self) -> UTMCoord:
        """UTM position of the origin."""
        return latlon_to_utm(self.lat, self.lon)

    def utm_of(self, positions: np.ndarray) -> np.ndarray:
        """(N, 2) UTM easting/northing of local positions (N, 2 or 3)."""
        p = np.atleast_2d(np.asarray(positions, dtype=np.float64))
        return np.stack([self.utm.easting + p[:, 0], self.utm.northing + p[:, 1]], axis=1)

    def latlon_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latitude and longitude (degrees) of local positions (N, 2 or 3)."""
        en = self.utm_of(positions)
        return utm_to_latlon_arrays(en[:, 0], en[:, 1], self.utm.zone, northern=self.utm.northern)

    @property
    def frame_id(self) -> str:
        """The frame bagio gives a NavSatFix track around this origin: ``utm`` (the zone is the map's)."""
        return "utm"


# --------------------------------------------------------------------------------------------------- images


def photo_frames(
    n: int,
    size: tuple[int, int] = (64, 48),
    dataset: str = "rtabmap_corridor",
    first: int = 0,
    step: int = 3,
) -> list[np.ndarray]:
    """``n`` distinct RGB uint8 frames (H, W, 3) cut from real photos of test/data.

    Photo ``first + i * step`` (natural order, wrapping around) gives frame i: its central 3/4 is cropped and
    resized to ``size`` (width, height) with area averaging, so frames are small (fast to describe) but as varied
    as the places in the photos.

    Args:
        n: number of frames.
        size: (width, height) in pixels.
        dataset: a folder of test/data with images ("rtabmap_corridor" or "lund_gps").
        first: index of the first photo.
        step: photos skipped between frames (> 0 keeps neighbouring frames different).
    """
    folder = DATA / dataset
    photos = list_images(folder / "samples" if (folder / "samples").is_dir() else folder / "images")
    frames = []
    for i in range(n):
        bgr = cv2.imread(str(photos[(first + i * step) % len(photos)]), cv2.IMREAD_COLOR)
        h, w = bgr.shape[:2]
        crop = bgr[h // 8:h - h // 8, w // 8:w - w // 8]
        frames.append(np.ascontiguousarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA)[:, :, ::-1]))
    return frames


def convert_rgb(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """An RGB uint8 frame in one of :data:`RAW_FORMATS` (mono16 = grey * 257, so 255 -> 65535)."""
    if encoding == "rgb8":
        return rgb
    if encoding == "bgr8":
        return rgb[:, :, ::-1]
    if encoding in ("rgba8", "bgra8"):
        colour = rgb if encoding == "rgba8" else rgb[:, :, ::-1]
        return np.concatenate([colour, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if encoding == "mono8":
        return grey
    if encoding == "mono16":
        return grey.astype(np.uint16) * 257
    raise ValueError(f"encoding {encoding!r} is not one of {RAW_FORMATS}")


# --------------------------------------------------------------------------------------------------- messages


def header(stamp_ns: int, frame_id: str) -> object:
    """std_msgs/Header with the stamp split into sec/nanosec."""
    stamp_ns = int(stamp_ns)
    return _T["std_msgs/msg/Header"](
        stamp=_T["builtin_interfaces/msg/Time"](sec=stamp_ns // _NS, nanosec=stamp_ns % _NS), frame_id=frame_id)


def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera", encoding: str = "rgb8",
              row_padding: int = 0, truncate: bool = False) -> object:
    """sensor_msgs/Image of an RGB uint8 frame converted to ``encoding`` (see :data:`RAW_FORMATS`).

    Args:
        rgb: (H, W, 3) uint8 RGB.
        stamp_ns: header stamp.
        frame_id: header frame.
        encoding: one of :data:`RAW_FORMATS`; 16-bit data are little-endian.
        row_padding: extra bytes at the end of each row (``step`` > width * pixel size), as some drivers send.
        truncate: drop the last row's bytes (an invalid message: decoding must fail).
    """
    pixels = convert_rgb(rgb, encoding)
    h, w = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).view(np.uint8).reshape(h, -1)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((h, row_padding), np.uint8)], axis=1)
    data = rows.reshape(-1)
    if truncate:
        data = data[:-rows.shape[1]]
    return _T[IMAGE](header=header(stamp_ns, frame_id), height=h, width=w, encoding=encoding, is_bigendian=0,
                     step=rows.shape[1], data=np.ascontiguousarray(data))


def compressed_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera", fmt: str = "jpeg", quality: int = 95,
                   truncate: bool = False) -> object:
    """sensor_msgs/CompressedImage (JPEG or PNG of the BGR frame, ``format`` as image_transport writes it).

    Args:
        rgb: (H, W, 3) uint8 RGB.
        stamp_ns: header stamp.
        frame_id: header frame.
        fmt: "jpeg" or "png".
        quality: JPEG quality.
        truncate: cut the data in half (a corrupt message: decoding must fail).
    """
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"fmt {fmt!r} is not 'jpeg' or 'png'")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} frame as {fmt}")
    data = buf.reshape(-1)
    if truncate:
        data = data[:data.size // 2]
    return _T[COMPRESSED_IMAGE](header=header(stamp_ns, frame_id), format=f"bgr8; {fmt} compressed bgr8",
                                data=np.ascontiguousarray(data))


def _pose(position: Sequence[float], orientation: Sequence[float]) -> object:
    x, y, z = (float(v) for v in position)
    qx, qy, qz, qw = (float(v) for v in orientation)
    return _T["geometry_msgs/msg/Pose"](position=_T["geometry_msgs/msg/Point"](x=x, y=y, z=z),
                                        orientation=_T["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))


def _pose_cov(position: Sequence[float], orientation: Sequence[float]) -> object:
    return _T["geometry_msgs/msg/PoseWithCovariance"](pose=_pose(position, orientation),
                                                      covariance=np.eye(6).reshape(-1) * 0.01)


def odometry_msg(stamp_ns: int, position: Sequence[float], orientation: Sequence[float], frame_id: str = "odom",
                 child_frame_id: str = "base_link") -> object:
    """nav_msgs/Odometry with the pose (covariance 0.01 on the diagonal) and zero twist."""
    v3 = _T["geometry_msgs/msg/Vector3"]
    twist = _T["geometry_msgs/msg/TwistWithCovariance"](
        twist=_T["geometry_msgs/msg/Twist"](linear=v3(x=0.0, y=0.0, z=0.0), angular=v3(x=0.0, y=0.0, z=0.0)),
        covariance=np.zeros(36))
    return _T[ODOMETRY](header=header(stamp_ns, frame_id), child_frame_id=child_frame_id,
                        pose=_pose_cov(position, orientation), twist=twist)


def pose_stamped_msg(stamp_ns: int, position: Sequence[float], orientation: Sequence[float],
                     frame_id: str = "map") -> object:
    """geometry_msgs/PoseStamped."""
    return _T[POSE_STAMPED](header=header(stamp_ns, frame_id), pose=_pose(position, orientation))


def pose_cov_msg(stamp_ns: int, position: Sequence[float], orientation: Sequence[float],
                 frame_id: str = "map") -> object:
    """geometry_msgs/PoseWithCovarianceStamped (covariance 0.01 on the diagonal), as AMCL publishes."""
    return _T[POSE_COV](header=header(stamp_ns, frame_id), pose=_pose_cov(position, orientation))


def navsatfix_msg(stamp_ns: int, lat: float, lon: float, alt: float = math.nan, status: int = 0,
                  frame_id: str = "gps") -> object:
    """sensor_msgs/NavSatFix; ``status`` -1 is STATUS_NO_FIX (a reader must drop it), 0 STATUS_FIX."""
    return _T[NAVSATFIX](header=header(stamp_ns, frame_id),
                         status=_T["sensor_msgs/msg/NavSatStatus"](status=int(status), service=1),
                         latitude=float(lat), longitude=float(lon), altitude=float(alt),
                         position_covariance=np.eye(3).reshape(-1) * 4.0, position_covariance_type=2)


def pose_msg(kind: str, stamp_ns: int, position: Sequence[float], orientation: Sequence[float],
             frame_id: str = "odom", geo: GeoOrigin | None = None) -> tuple[str, object]:
    """(message type, message) of a pose of kind ``"odometry"``, ``"pose_stamped"``, ``"pose_cov"`` or ``"navsatfix"``.

    For ``"navsatfix"`` the local position is placed on the globe with ``geo`` (default :class:`GeoOrigin`) and the
    orientation is dropped (a fix has none); ``frame_id`` is the fix's header frame.
    """
    if kind == "odometry":
        return ODOMETRY, odometry_msg(stamp_ns, position, orientation, frame_id)
    if kind == "pose_stamped":
        return POSE_STAMPED, pose_stamped_msg(stamp_ns, position, orientation, frame_id)
    if kind == "pose_cov":
        return POSE_COV, pose_cov_msg(stamp_ns, position, orientation, frame_id)
    if kind == "navsatfix":
        geo = geo or GeoOrigin()
        lat, lon = geo.latlon_of(np.asarray(position)[None])
        return NAVSATFIX, navsatfix_msg(stamp_ns, float(lat[0]), float(lon[0]), geo.alt + float(position[2]),
                                        frame_id=frame_id)
    raise ValueError(f"pose kind {kind!r} is not one of {sorted(POSE_KINDS)}")


# --------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class BagMessage:
    """One message to write: topic, type, bag receive time (the bag's timestamp) and the rosbags message."""

    topic: str
    msgtype: str
    receive_ns: int
    msg: object


def write_bag(path: str | Path, messages: Iterable[BagMessage], storage: str = "mcap") -> Path:
    """Write messages into a new ROS 2 bag directory (metadata version 9), in receive-time order.

    Connections are created per topic in order of first appearance (a topic has one type). Equal receive times keep
    the given order.

    Args:
        path: bag directory to create (must not exist).
        messages: the messages, any order.
        storage: "mcap" or "sqlite3".

    Returns:
        ``path``.
    """
    path = Path(path)
    msgs = sorted(messages, key=lambda m: m.receive_ns)  # stable: ties keep their order
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        conns: dict[str, object] = {}
        for m in msgs:
            if m.topic not in conns:
                conns[m.topic] = writer.add_connection(m.topic, m.msgtype, typestore=TYPESTORE)
            writer.write(conns[m.topic], int(m.receive_ns), TYPESTORE.serialize_cdr(m.msg, m.msgtype))
    return path


@dataclass(frozen=True)
class CameraBag:
    """What :func:`write_camera_bag` wrote, with the ground truth to check readers against.

    Attributes:
        path: the bag directory.
        storage: "mcap" or "sqlite3".
        image_topics: camera topics (all cameras share the image stamps).
        image_msgtype: sensor_msgs Image or CompressedImage type.
        image_format: raw encoding or "jpeg"/"png".
        image_stamps_ns: (N,) header stamps of the frames (before any zeroing), per camera.
        frames: topic -> the N RGB frames written (before encoding).
        bad_indices: frames written as undecodable messages.
        pose_topic: pose topic ("" when none was written).
        pose_kind: key of :data:`POSE_KINDS`.
        pose_stamps_ns: header stamps of the poses written (fixes with no fix included).
        pose_frame_id: the frame a reader should report: the header frame, or ``utm_<zone><band>`` for NavSatFix.
        no_fix_stamps_ns: stamps of the pose/GPS fixes written with status -1 (to be dropped by readers).
        gps_topic: separate NavSatFix topic ("" when none).
        gps_stamps_ns: header stamps of its fixes.
        motion: the ground-truth motion.
        geo: the globe placement of the motion's local frame.
        receive_delay_ns: receive time minus header stamp of every message.
        zero_header_stamps: all header stamps were written as zero (readers fall back to receive times).
    """

    path: Path
    storage: str
    image_topics: tuple[str, ...]
    image_msgtype: str
    image_format: str
    image_stamps_ns: np.ndarray
    frames: dict[str, list[np.ndarray]]
    bad_indices: tuple[int, ...]
    pose_topic: str
    pose_kind: str
    pose_stamps_ns: np.ndarray
    pose_frame_id: str
    no_fix_stamps_ns: np.ndarray
    gps_topic: str
    gps_stamps_ns: np.ndarray
    motion: Motion
    geo: GeoOrigin
    receive_delay_ns: int
    zero_header_stamps: bool = False

    def expected_positions(self, stamps_ns: np.ndarray) -> np.ndarray:
        """(N, 3) true positions at the stamps in the pose frame (UTM + altitude for a NavSatFix pose topic)."""
        local = self.motion.position(stamps_ns)
        if self.pose_kind != "navsatfix":
            return local
        en = self.geo.utm_of(local)
        return np.stack([en[:, 0], en[:, 1], self.geo.alt + local[:, 2]], axis=1)

    def expected_orientations(self, stamps_ns: np.ndarray) -> np.ndarray:
        """(N, 4) true orientations at the stamps (all NaN for a NavSatFix pose topic)."""
        q = self.motion.orientation(stamps_ns)
        return np.full_like(q, np.nan) if self.pose_kind == "navsatfix" else q

    def expected_gps(self, stamps_ns: np.ndarray) -> np.ndarray:
        """(N, 3) latitude, longitude, altitude of the motion at the stamps."""
        local = self.motion.position(stamps_ns)
        lat, lon = self.geo.latlon_of(local)
        return np.stack([lat, lon, self.geo.alt + local[:, 2]], axis=1)


def write_camera_bag(
    path: str | Path,
    *,
    storage: str = "mcap",
    frames: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]] | None = None,
    n_frames: int = 10,
    image_rate_hz: float = 5.0,
    image_topics: Sequence[str] = ("/camera/image_raw",),
    image_format: str = "rgb8",
    camera_frame_id: str = "camera_optical_frame",
    bad_indices: Sequence[int] = (),
    motion: Motion | None = None,
    pose_kind: str | None = "odometry",
    pose_topic: str = "/odom",
    pose_rate_hz: float = 50.0,
    pose_span_s: tuple[float, float] | None = None,
    pose_frame_id: str | None = None,
    no_fix_every: int = 0,
    gps_topic: str = "",
    gps_rate_hz: float = 5.0,
    geo: GeoOrigin | None = None,
    zero_header_stamps: bool = False,
    receive_delay_ns: int = 2_000_000,
    extra_messages: Sequence[BagMessage] = (),
) -> CameraBag:
    """Write a recording: camera frames at ``image_rate_hz``, poses along ``motion``, optionally GNSS fixes.

    Frame i of every camera has header stamp ``motion.start_ns + i / image_rate_hz``. Poses are sampled at
    ``pose_rate_hz`` over ``pose_span_s`` (seconds relative to ``motion.start_ns``; default: from 0.1037 s before the
    first frame, so that no pose stamp equals an image stamp, to about 0.1 s after the last), so a span shorter than
    the images leaves frames without a pose.

    Args:
        path: bag directory to create.
        storage: "mcap" or "sqlite3".
        frames: RGB frames for all cameras, or topic -> frames; default :func:`photo_frames` (``n_frames``).
        n_frames: number of frames when ``frames`` is None.
        image_rate_hz: camera rate.
        image_topics: camera topics.
        image_format: a raw encoding of :data:`RAW_FORMATS` (sensor_msgs/Image) or "jpeg"/"png" (CompressedImage).
        camera_frame_id: header frame of the images.
        bad_indices: frames written as undecodable messages (truncated data).
        motion: ground truth (default :class:`Motion`: 1 m/s along +x, no rotation).
        pose_kind: a key of :data:`POSE_KINDS`, or None for no pose topic.
        pose_topic: pose topic name.
        pose_rate_hz: pose rate.
        pose_span_s: (first, last) pose time relative to ``motion.start_ns``.
        pose_frame_id: header frame of the poses (default "odom" for odometry, "map" for poses, "gps" for fixes).
        no_fix_every: with NavSatFix poses or a GPS topic, every n-th fix (n > 0) is written with status -1 and
            garbage coordinates (0, 0); readers must drop it.
        gps_topic: also write a NavSatFix topic of the motion at ``gps_rate_hz`` ("" for none).
        gps_rate_hz: GNSS rate.
        geo: globe placement of the motion (default :class:`GeoOrigin`).
        zero_header_stamps: write every header stamp as 0 (readers must fall back to the receive time).
        receive_delay_ns: bag receive time minus header stamp, for every message.
        extra_messages: further messages to write as they are.

    Returns:
        What was written (see :class:`CameraBag`).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} is not one of {sorted(STORAGES)}")
    if image_format not in RAW_FORMATS + COMPRESSED_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {RAW_FORMATS + COMPRESSED_FORMATS}")
    if pose_kind is not None and pose_kind not in POSE_KINDS:
        raise ValueError(f"pose_kind {pose_kind!r} is not one of {sorted(POSE_KINDS)}")
    motion = motion or Motion()
    geo = geo or GeoOrigin()
    topics = tuple(image_topics)
    if frames is None:
        frames = photo_frames(n_frames)
    per_topic = {t: list(frames[t]) for t in topics} if isinstance(frames, Mapping) else \
        {t: list(frames) for t in topics}
    n = len(per_topic[topics[0]])
    if any(len(f) != n for f in per_topic.values()):
        raise ValueError("every camera needs the same number of frames")
    image_stamps = motion.stamps(image_rate_hz, (n - 1) / image_rate_hz)[:n]

    def stamp_of(s: int) -> int:
        return 0 if zero_header_stamps else int(s)

    messages: list[BagMessage] = []
    compressed = image_format in COMPRESSED_FORMATS
    msgtype = COMPRESSED_IMAGE if compressed else IMAGE
    for i, s in enumerate(image_stamps):
        for t in topics:
            bad = i in bad_indices
            if compressed:
                msg = compressed_msg(per_topic[t][i], stamp_of(s), camera_frame_id, image_format, truncate=bad)
            else:
                msg = image_msg(per_topic[t][i], stamp_of(s), camera_frame_id, image_format, truncate=bad)
            messages.append(BagMessage(t, msgtype, int(s) + receive_delay_ns, msg))

    pose_stamps = np.zeros(0, np.int64)
    no_fix: list[int] = []
    frame = ""
    if pose_kind is not None:
        # Default: 0.1037 s before the first frame, so pose and image stamps never coincide (interpolation runs).
        first, last = pose_span_s if pose_span_s is not None else \
            (-0.1037, (image_stamps[-1] - motion.start_ns) / _NS + 0.1)
        pose_stamps = motion.stamps(pose_rate_hz, last - first, offset_s=first)
        header_frame = pose_frame_id or {"odometry": "odom", "navsatfix": "gps"}.get(pose_kind, "map")
        for k, s in enumerate(pose_stamps):
            if pose_kind == "navsatfix" and no_fix_every and k % no_fix_every == no_fix_every - 1:
                messages.append(BagMessage(pose_topic, NAVSATFIX, int(s) + receive_delay_ns,
                                           navsatfix_msg(stamp_of(s), 0.0, 0.0, status=-1, frame_id=header_frame)))
                no_fix.append(int(s))
                continue
            mtype, msg = pose_msg(pose_kind, stamp_of(s), motion.position(s), motion.orientation(s), header_frame,
                                  geo)
            messages.append(BagMessage(pose_topic, mtype, int(s) + receive_delay_ns, msg))
        frame = geo.frame_id if pose_kind == "navsatfix" else header_frame

    gps_stamps = np.zeros(0, np.int64)
    if gps_topic:
        gps_stamps = motion.stamps(gps_rate_hz, (image_stamps[-1] - motion.start_ns) / _NS + 0.4, offset_s=-0.2)
        for k, s in enumerate(gps_stamps):
            if no_fix_every and k % no_fix_every == no_fix_every - 1:
                msg = navsatfix_msg(stamp_of(s), 0.0, 0.0, status=-1)
                no_fix.append(int(s))
            else:
                _, msg = pose_msg("navsatfix", stamp_of(s), motion.position(s), (0, 0, 0, 1), "gps", geo)
            messages.append(BagMessage(gps_topic, NAVSATFIX, int(s) + receive_delay_ns, msg))

    messages.extend(extra_messages)
    write_bag(path, messages, storage)
    return CameraBag(
        path=Path(path), storage=storage, image_topics=topics, image_msgtype=msgtype, image_format=image_format,
        image_stamps_ns=image_stamps, frames=per_topic, bad_indices=tuple(bad_indices),
        pose_topic=pose_topic if pose_kind else "", pose_kind=pose_kind or "", pose_stamps_ns=pose_stamps,
        pose_frame_id=frame, no_fix_stamps_ns=np.asarray(no_fix, np.int64), gps_topic=gps_topic,
        gps_stamps_ns=gps_stamps, motion=motion, geo=geo, receive_delay_ns=receive_delay_ns,
        zero_header_stamps=zero_header_stamps,
    )
