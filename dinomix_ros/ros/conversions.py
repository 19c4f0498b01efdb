"""Core results <-> standard ROS messages (no custom message packages).

``~/matches`` is a ``sensor_msgs/PointCloud2`` with one point per candidate, best first (RViz draws it: its XYZ
transformer needs x, y, z as FLOAT32; colour it by ``similarity``, config/dinomix.rviz does; any PointCloud2 reader
decodes it). Fields, all little-endian, packed in this order (:data:`MATCH_FIELDS`):

=================  ========  =====================================================================
field              type      meaning
=================  ========  =====================================================================
x, y, z            FLOAT32   keyframe position in ``header.frame_id`` (NaN when unknown), for RViz:
                             float32 rounds UTM coordinates to ~0.5 m, use position_* for maths
qx, qy, qz, qw     FLOAT32   keyframe orientation (NaN when unknown)
similarity         FLOAT32   cosine similarity to the query (higher is better)
rank               UINT32    0 for the best candidate
keyframe_id        UINT32    id in the map (``dinomix map info``)
stamp_sec          INT32     keyframe capture stamp, seconds part
stamp_nanosec      UINT32    keyframe capture stamp, nanoseconds part
latitude           FLOAT64   keyframe GPS latitude in degrees (NaN when unknown)
longitude          FLOAT64   keyframe GPS longitude in degrees (NaN when unknown)
altitude           FLOAT64   keyframe GPS altitude in metres (NaN when unknown)
accepted           UINT8     1 on the best candidate when the match passed every rule, else 0
position_x, _y,    FLOAT64   the keyframe position at full precision (NaN when unknown)
_z
inliers            UINT32    geometric verification inliers (0 when not verified)
verified_score     FLOAT32   inliers x inlier ratio (NaN when not verified); candidates are re-ranked by it
=================  ========  =====================================================================

``header.stamp`` is the query image's stamp and ``header.frame_id`` the map frame of the best candidate; an empty
cloud (width 0) means no candidate. :func:`matches_to_array` decodes it into a numpy structured array.

``~/loop_constraint`` is a ``std_msgs/Float64MultiArray`` of :data:`LOOP_CONSTRAINT_SIZE` values whose one layout
dimension is labelled :data:`LOOP_CONSTRAINT_LABEL` (the field names, so a reader can check what it got): the
verified motion between the robot at a keyframe and the robot now, for a pose graph's between-factor. One message
holds both stamps, the transform and its covariance, so they cannot be mismatched (two messages could be), and it
needs no custom message package. :func:`loop_constraint_msg` writes it, :func:`loop_constraint_from_msg` reads it:

=================  =====  ==============================================================================
values             index  meaning
=================  =====  ==============================================================================
query_sec,         0, 1   the query image's stamp (the robot now), exact integers
query_nanosec
match_sec,         2, 3   the matched keyframe's stamp (the robot then)
match_nanosec
keyframe_id        4      the keyframe's id in the map
x, y, z            5-7    ``T``: the query's base frame in the keyframe's base frame (metres) ...
qx, qy, qz, qw     8-11   ... and its rotation (unit quaternion, qw >= 0)
inliers            12     inliers of the verification it comes from
metric             13     1: full 6-DoF (keyframe depths); 0: rotation only, the position is the keyframe's and
                          the covariance's position block says how far off that can be
covariance         14-49  6x6 row-major over (x, y, z, rot_x, rot_y, rot_z) of ``delta`` in the QUERY's base
                          frame: ``T_true = T * exp(delta)`` (ROS order; GTSAM's Pose3 puts rotation first)
=================  =====  ==============================================================================
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Float64MultiArray, Header, MultiArrayDimension, MultiArrayLayout
from visualization_msgs.msg import Marker, MarkerArray

from dinomix_ros.imaging.camera import CameraModel, camera_from_info
from dinomix_ros.localization.camera_pose import RelativePose, matrix_to_quat
from dinomix_ros.localization.matching import MatchResult, PosePrior
from dinomix_ros.maps.sources.poses import quat_to_matrix

__all__ = [
    "MATCH_DTYPE",
    "MATCH_FIELDS",
    "ns_to_time",
    "time_to_ns",
    "pose_prior_msg",
    "matches_msg",
    "matches_to_array",
    "loop_closure_msg",
    "LOOP_CONSTRAINT_LABEL",
    "LOOP_CONSTRAINT_SIZE",
    "LoopConstraint",
    "loop_constraint_msg",
    "loop_constraint_from_msg",
    "markers_msg",
    "diagnostics_msg",
    "diagnostic_values",
    "camera_from_info_msg",
    "msg_class",
]

_TYPES = {PointField.INT32: "<i4", PointField.UINT32: "<u4", PointField.FLOAT32: "<f4", PointField.FLOAT64: "<f8",
          PointField.UINT8: "u1"}
MATCH_FIELDS: list[tuple[str, int]] = [
    ("x", PointField.FLOAT32), ("y", PointField.FLOAT32), ("z", PointField.FLOAT32),
    ("qx", PointField.FLOAT32), ("qy", PointField.FLOAT32), ("qz", PointField.FLOAT32), ("qw", PointField.FLOAT32),
    ("similarity", PointField.FLOAT32), ("rank", PointField.UINT32), ("keyframe_id", PointField.UINT32),
    ("stamp_sec", PointField.INT32), ("stamp_nanosec", PointField.UINT32),
    ("latitude", PointField.FLOAT64), ("longitude", PointField.FLOAT64), ("altitude", PointField.FLOAT64),
    ("accepted", PointField.UINT8),
    ("position_x", PointField.FLOAT64), ("position_y", PointField.FLOAT64), ("position_z", PointField.FLOAT64),
    ("inliers", PointField.UINT32), ("verified_score", PointField.FLOAT32),
]
MATCH_DTYPE = np.dtype([(name, _TYPES[kind]) for name, kind in MATCH_FIELDS])  # packed, no padding


def ns_to_time(stamp_ns: int) -> Time:
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def time_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pose_prior_msg(prior: PosePrior, stamp_ns: int) -> PoseWithCovarianceStamped:
    """The prior in its map frame, stamped with the image stamp."""
    msg = PoseWithCovarianceStamped()
    msg.header = Header(stamp=ns_to_time(stamp_ns), frame_id=prior.frame_id)
    p, q = prior.position, prior.orientation
    msg.pose.pose.position.x, msg.pose.pose.position.y, msg.pose.pose.position.z = map(float, p)
    o = msg.pose.pose.orientation
    o.x, o.y, o.z, o.w = map(float, q)
    msg.pose.covariance = [float(v) for v in prior.covariance.reshape(-1)]
    return msg


def matches_msg(result: MatchResult) -> PointCloud2:
    """Every candidate of one query as a PointCloud2 (layout in the module docstring)."""
    cands = result.candidates
    rows = np.zeros(len(cands), dtype=MATCH_DTYPE)
    for i, c in enumerate(cands):
        sec, nanosec = divmod(c.stamp_ns, 1_000_000_000)
        rows[i] = (*c.position, *c.orientation, c.similarity, c.rank, c.keyframe_id, sec, nanosec, *c.gps,
                   1 if (result.accepted and i == 0) else 0, *c.position, c.inliers, c.verified_score)
    msg = PointCloud2()
    msg.header = Header(stamp=ns_to_time(result.stamp_ns), frame_id=cands[0].frame_id if cands else "")
    msg.height, msg.width = 1, len(cands)
    offsets = [MATCH_DTYPE.fields[name][1] for name, _ in MATCH_FIELDS]
    msg.fields = [PointField(name=name, offset=off, datatype=kind, count=1)
                  for (name, kind), off in zip(MATCH_FIELDS, offsets)]
    msg.is_bigendian = False
    msg.point_step = MATCH_DTYPE.itemsize
    msg.row_step = MATCH_DTYPE.itemsize * len(cands)
    msg.is_dense = False
    msg.data = rows.tobytes()
    return msg


def matches_to_array(msg: PointCloud2) -> np.ndarray:
    """Decode ``~/matches`` into a structured array with the :data:`MATCH_DTYPE` fields (checks the layout)."""
    fields = [(f.name, f.datatype, f.offset) for f in msg.fields]
    expected = [(name, kind, MATCH_DTYPE.fields[name][1]) for name, kind in MATCH_FIELDS]
    if fields != expected or msg.point_step != MATCH_DTYPE.itemsize:
        raise ValueError(f"not a dinomix_ros matches cloud: fields {fields}, point_step {msg.point_step}")
    return np.frombuffer(bytes(msg.data), dtype=MATCH_DTYPE, count=msg.width * msg.height)


def loop_closure_msg(query_stamp_ns: int, match_stamp_ns: int) -> Float64MultiArray:
    """[t_query, t_match] in seconds: the loop-closure message LIO-SAM reads."""
    return Float64MultiArray(data=[query_stamp_ns / 1e9, match_stamp_ns / 1e9])


#: The label of ``~/loop_constraint``'s one layout dimension: its version and field names (module docstring).
LOOP_CONSTRAINT_LABEL = ("dinomix_loop_constraint_v1:query_sec,query_nanosec,match_sec,match_nanosec,keyframe_id,"
                         "x,y,z,qx,qy,qz,qw,inliers,metric,covariance[36]")
LOOP_CONSTRAINT_SIZE = 50
_GTSAM_ORDER = [3, 4, 5, 0, 1, 2]


@dataclass(frozen=True)
class LoopConstraint:
    """A decoded ``~/loop_constraint`` (module docstring: frames and convention).

    Attributes:
        query_stamp_ns: stamp of the query image (the robot now).
        match_stamp_ns: stamp of the matched keyframe (the robot then).
        keyframe_id: the keyframe's id in the map.
        T: (4, 4) the query's base frame in the keyframe's base frame.
        covariance: (6, 6) ROS order (x, y, z, rot_x, rot_y, rot_z), perturbation in the query's base frame.
        inliers: verification inliers.
        metric: full 6-DoF (else rotation only).
    """

    query_stamp_ns: int
    match_stamp_ns: int
    keyframe_id: int
    T: np.ndarray
    covariance: np.ndarray
    inliers: int
    metric: bool

    @property
    def covariance_gtsam(self) -> np.ndarray:
        """The covariance in GTSAM's Pose3 tangent order (rot_x, rot_y, rot_z, x, y, z), for
        ``noiseModel.Gaussian.Covariance`` of a ``BetweenFactorPose3(X(match), X(query), Pose3(T), noise)``."""
        return self.covariance[np.ix_(_GTSAM_ORDER, _GTSAM_ORDER)]


def loop_constraint_msg(query_stamp_ns: int, match_stamp_ns: int, keyframe_id: int,
                        relative: RelativePose) -> Float64MultiArray:
    """``~/loop_constraint``: the verified relative pose between the keyframe's and the query's robot, both stamps,
    the keyframe id and the covariance (layout in the module docstring)."""
    q_sec, q_ns = divmod(int(query_stamp_ns), 1_000_000_000)
    m_sec, m_ns = divmod(int(match_stamp_ns), 1_000_000_000)
    T = np.asarray(relative.T, dtype=np.float64)
    data = [q_sec, q_ns, m_sec, m_ns, int(keyframe_id), *T[:3, 3], *matrix_to_quat(T[:3, :3]),
            int(relative.inliers), 1.0 if relative.case == "metric" else 0.0,
            *np.asarray(relative.covariance, dtype=np.float64).reshape(36)]
    layout = MultiArrayLayout(dim=[MultiArrayDimension(label=LOOP_CONSTRAINT_LABEL, size=LOOP_CONSTRAINT_SIZE,
                                                       stride=LOOP_CONSTRAINT_SIZE)], data_offset=0)
    return Float64MultiArray(layout=layout, data=[float(v) for v in data])


def loop_constraint_from_msg(msg: Float64MultiArray) -> LoopConstraint:
    """Decode ``~/loop_constraint`` (checks the label and the size).

    Raises:
        ValueError: not a dinomix_ros loop constraint (another layout or size).
    """
    dims = list(msg.layout.dim)
    data = np.asarray(msg.data, dtype=np.float64)
    if len(dims) != 1 or dims[0].label != LOOP_CONSTRAINT_LABEL or data.shape != (LOOP_CONSTRAINT_SIZE,) \
            or msg.layout.data_offset != 0:
        raise ValueError(f"not a dinomix_ros loop constraint: layout {[d.label for d in dims]}, "
                         f"{data.size} values; expected {LOOP_CONSTRAINT_LABEL!r} and {LOOP_CONSTRAINT_SIZE}")
    if not np.isfinite(data).all() or abs(np.linalg.norm(data[8:12]) - 1.0) > 1e-6:
        raise ValueError("a loop constraint with non-finite values or a quaternion that is not a unit quaternion")
    T = np.eye(4)
    T[:3, :3] = quat_to_matrix(data[8:12])
    T[:3, 3] = data[5:8]
    return LoopConstraint(int(data[0]) * 1_000_000_000 + int(data[1]), int(data[2]) * 1_000_000_000 + int(data[3]),
                          int(data[4]), T, data[14:].reshape(6, 6).copy(), int(data[12]), bool(data[13]))


_GREEN = ColorRGBA(r=0.1, g=0.9, b=0.2, a=0.9)
_YELLOW = ColorRGBA(r=1.0, g=0.8, b=0.1, a=0.7)
_GREY = ColorRGBA(r=0.6, g=0.6, b=0.6, a=0.6)
_WHITE = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)


def markers_msg(result: MatchResult, namespace: str = "dinomix") -> MarkerArray:
    """Spheres on the candidate keyframes (green: accepted best, yellow: best, grey: others; size ~ similarity),
    lines from the best to the other candidates, and the score as text. Candidates without a position are skipped.
    """
    header = Header(stamp=ns_to_time(result.stamp_ns), frame_id=result.best.frame_id if result.best else "")
    markers = [Marker(header=header, ns=namespace, action=Marker.DELETEALL)]
    placed = [c for c in result.candidates if c.has_position and c.frame_id == header.frame_id]
    for c in placed:
        sphere = Marker(header=header, ns=namespace, id=1 + c.rank, type=Marker.SPHERE, action=Marker.ADD)
        sphere.pose.position = Point(x=float(c.position[0]), y=float(c.position[1]), z=float(c.position[2]))
        sphere.pose.orientation.w = 1.0
        size = 0.2 + 0.8 * max(0.0, c.similarity)
        sphere.scale.x = sphere.scale.y = sphere.scale.z = size
        sphere.color = (_GREEN if result.accepted else _YELLOW) if c.rank == 0 else _GREY
        markers.append(sphere)
    if placed and placed[0].rank == 0:
        best = placed[0]
        links = Marker(header=header, ns=namespace, id=100, type=Marker.LINE_LIST, action=Marker.ADD)
        links.pose.orientation.w = 1.0
        links.scale.x = 0.03
        links.color = _GREY
        for c in placed[1:]:
            links.points += [Point(x=float(best.position[0]), y=float(best.position[1]), z=float(best.position[2])),
                             Point(x=float(c.position[0]), y=float(c.position[1]), z=float(c.position[2]))]
        if links.points:
            markers.append(links)
        text = Marker(header=header, ns=namespace, id=101, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD)
        text.pose.position = Point(x=float(best.position[0]), y=float(best.position[1]),
                                   z=float(best.position[2]) + 1.0)
        text.pose.orientation.w = 1.0
        text.scale.z = 0.4
        text.color = _WHITE
        status = "accepted" if result.accepted else "rejected: " + ",".join(result.rejected_by)
        text.text = f"kf {best.keyframe_id}  sim {best.similarity:.3f}  {status}"
        markers.append(text)
    return MarkerArray(markers=markers)


def diagnostics_msg(stamp_ns: int, name: str, hardware_id: str, level: int, message: str,
                    values: dict[str, object]) -> DiagnosticArray:
    """One DiagnosticStatus; values are formatted as strings (floats with 4 significant digits)."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    status = DiagnosticStatus(level=bytes([level]), name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=fmt(v)) for k, v in values.items()])
    return DiagnosticArray(header=Header(stamp=ns_to_time(stamp_ns)), status=[status])


def diagnostic_values(msg: DiagnosticArray) -> dict[str, str]:
    """Key/values of the first status of a DiagnosticArray (what :func:`diagnostics_msg` wrote)."""
    return {kv.key: kv.value for kv in msg.status[0].values}


def camera_from_info_msg(msg: object) -> CameraModel:
    """The intrinsics of the images a ``sensor_msgs/CameraInfo`` describes (its ROI and binning applied:
    :func:`~dinomix_ros.imaging.camera.camera_from_info`).

    Raises:
        CameraModelError: an uncalibrated camera (K all zero), an unsupported distortion model, or values that no
            camera has (bounds: :mod:`dinomix_ros.imaging.camera`).
    """
    return camera_from_info(msg)


def msg_class(msgtype: str) -> type:
    """rclpy message class of a type name like ``sensor_msgs/msg/Image``."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)
