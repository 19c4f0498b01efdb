"""Pose tracks, interpolation at image stamps, and keyframe gating.

Quaternions follow ROS order ``(x, y, z, w)``. Stamps are int64 nanoseconds throughout: a float64 holds a
1.7e18 ns stamp only to about 256 ns, so differences are taken in integers and only then converted to seconds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dinomix_ros.settings import check, setting

__all__ = [
    "PoseTrackError",
    "quat_normalize",
    "quat_slerp",
    "quat_angle",
    "yaw_to_quat",
    "quat_to_yaw",
    "quat_to_matrix",
    "InterpolatedPoses",
    "PoseTrack",
    "KeyframeGateConfig",
    "PosePairingConfig",
    "KeyframeGate",
    "select_keyframes",
]

logger = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
_SLERP_LINEAR_BELOW = 1e-6  # sin(half-angle) below which slerp == nlerp to ~1e-18


class PoseTrackError(ValueError):
    """Bad input to a pose track: wrong shapes or dtypes, non-finite positions, an empty track."""


def _as_quat(q: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(q, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(f"{name} has shape {arr.shape}; expected (..., 4) quaternions in ROS order (x, y, z, w)")
    return arr


def quat_normalize(q: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4); rows with a NaN/inf component come back as all-NaN (unknown orientation).

    Raises:
        ValueError: for a shape not ending in 4, or a finite row of (near-)zero norm.
    """
    q = _as_quat(q, "quaternion")
    finite = np.all(np.isfinite(q), axis=-1)
    norm = np.linalg.norm(np.where(finite[..., None], q, 0.0), axis=-1)
    if np.any(finite & (norm < 1e-12)):
        raise ValueError("a quaternion has zero norm; expected a rotation (identity is (0, 0, 0, 1) in x, y, z, w)")
    safe = np.where(finite, norm, 1.0)
    return np.where(finite[..., None], q / safe[..., None], np.nan)


def _half_angle(q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    # Angle between unit 4-vectors, accurate for tiny and near-pi angles (unlike arccos of the dot product).
    return 2.0 * np.arctan2(np.linalg.norm(q0 - q1, axis=-1), np.linalg.norm(q0 + q1, axis=-1))


def quat_slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Spherical linear interpolation along the shorter arc, vectorised with broadcasting.

    ``q`` and ``-q`` are the same rotation: ``q1`` is flipped when the dot product is negative so the result turns
    by at most 180 degrees. For nearly parallel inputs the normalised linear interpolation is used (identical to
    double precision there). NaN inputs give NaN outputs.

    Args:
        q0: start rotations (..., 4), x y z w; normalised here.
        q1: end rotations (..., 4).
        t: interpolation parameter(s), broadcast against the quaternions' leading dimensions; 0 -> q0, 1 -> q1.

    Returns:
        Unit quaternions (..., 4).

    Raises:
        ValueError: for shapes not ending in 4 or zero-norm quaternions.
    """
    q0 = quat_normalize(q0)
    q1 = quat_normalize(q1)
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0.0, -q1, q1)
    theta = _half_angle(q0, q1)[..., None]  # angle between the 4-vectors: half the rotation angle
    sin_theta = np.sin(theta)
    linear = sin_theta < _SLERP_LINEAR_BELOW
    safe = np.where(linear, 1.0, sin_theta)
    w0 = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    w1 = np.where(linear, t, np.sin(t * theta) / safe)
    out = w0 * q0 + w1 * q1
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    return out / np.where(norm > 0.0, norm, 1.0)


def quat_angle(q0: np.ndarray, q1: np.ndarray) -> np.ndarray | float:
    """Rotation angle in radians (0..pi) between orientations ``q0`` and ``q1`` (..., 4); q and -q are equal.

    Returns:
        A float for single quaternions, else an array of the broadcast leading shape. NaN where an input is NaN.
    """
    q0 = quat_normalize(q0)
    q1 = quat_normalize(q1)
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0.0, -q1, q1)
    angle = 2.0 * _half_angle(q0, q1)
    return float(angle) if angle.ndim == 0 else angle


def yaw_to_quat(yaw: np.ndarray | float) -> np.ndarray:
    """Rotation about +z by ``yaw`` radians as quaternions (..., 4) in x y z w."""
    yaw = np.asarray(yaw, dtype=np.float64)
    half = 0.5 * yaw
    zeros = np.zeros_like(yaw)
    return np.stack([zeros, zeros, np.sin(half), np.cos(half)], axis=-1)


def quat_to_yaw(q: np.ndarray) -> np.ndarray | float:
    """Heading (rotation about +z, radians in (-pi, pi]) of quaternions (..., 4), ZYX convention as tf2 getYaw."""
    q = quat_normalize(q)
    x, y, z, w = np.moveaxis(q, -1, 0)
    yaw = np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return float(yaw) if yaw.ndim == 0 else yaw


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) in x y z w (normalised first)."""
    q = quat_normalize(q)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def _as_stamps(stamps_ns: object, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(stamps_ns))
    if arr.ndim != 1:
        raise PoseTrackError(f"{name} has shape {arr.shape}; expected a 1-D array of int64 nanosecond stamps")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PoseTrackError(
            f"{name} has dtype {arr.dtype}; expected integer nanoseconds (int64). Float seconds lose precision at "
            "ROS epoch stamps: convert with sec * 1_000_000_000 + nanosec in integers"
        )
    if arr.dtype == np.uint64 and np.any(arr > np.iinfo(np.int64).max):
        raise PoseTrackError(f"{name} has stamps above the int64 range; expected nanoseconds since the epoch")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class InterpolatedPoses:
    """Poses at query stamps: positions (M, 3), orientations (M, 4) x y z w, valid (M,), gap_s (M,).

    Invalid rows hold NaN. ``gap_s`` is the time in seconds from each query to the nearest track pose.
    Orientations are NaN where a bracketing pose has no orientation (e.g. a GPS track).
    """

    positions: np.ndarray
    orientations: np.ndarray
    valid: np.ndarray
    gap_s: np.ndarray

    def __len__(self) -> int:
        return int(self.valid.shape[0])


class PoseTrack:
    """Time-ordered poses from any pose source (odometry, PoseStamped, GPS fixes projected to UTM).

    On construction the poses are sorted by stamp; for equal stamps the last one given is kept. Positions must be
    finite; an orientation row with a NaN means "unknown" (all four set to NaN), other rows are normalised.

    Args:
        stamps_ns: (N,) integer nanoseconds.
        positions: (N, 3) metres, or (N, 2) for planar sources (z = 0).
        orientations: (N, 4) x y z w, or None when the source has none (all NaN).
        frame_id: the frame the poses are expressed in, e.g. ``map`` or ``utm_33U``.

    Raises:
        PoseTrackError: for an empty track, mismatched lengths, non-integer stamps, non-finite positions or zero-norm
            or infinite orientations.
    """

    def __init__(
        self,
        stamps_ns: np.ndarray,
        positions: np.ndarray,
        orientations: np.ndarray | None = None,
        frame_id: str = "",
    ) -> None:
        stamps = _as_stamps(stamps_ns, "stamps_ns")
        n = stamps.shape[0]
        if n == 0:
            raise PoseTrackError("the pose track is empty; expected at least one pose (check the topic or file)")
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[0] != n or pos.shape[1] not in (2, 3):
            raise PoseTrackError(f"positions have shape {pos.shape}; expected ({n}, 3) or ({n}, 2) to match the stamps")
        if pos.shape[1] == 2:
            pos = np.concatenate([pos, np.zeros((n, 1))], axis=1)
        bad = ~np.all(np.isfinite(pos), axis=1)
        if np.any(bad):
            raise PoseTrackError(
                f"{int(bad.sum())} position(s) are NaN/inf (first at stamp {int(stamps[bad][0])} ns); expected finite "
                "metres. Drop poses without a fix before building the track"
            )
        if orientations is None:
            ori = np.full((n, 4), np.nan)
        else:
            ori = np.asarray(orientations, dtype=np.float64)
            if ori.shape != (n, 4):
                raise PoseTrackError(f"orientations have shape {ori.shape}; expected ({n}, 4) in x, y, z, w order")
            if np.any(np.isinf(ori)):
                raise PoseTrackError("an orientation is infinite; expected finite quaternions or NaN rows for unknown")
            try:
                ori = quat_normalize(ori)
            except ValueError as exc:
                raise PoseTrackError(f"{exc} (use NaN rows for poses without orientation)") from exc
        # Stable sort, then keep the last of each run of equal stamps.
        order = np.argsort(stamps, kind="stable")
        stamps, pos, ori = stamps[order], pos[order], ori[order]
        keep = np.ones(n, dtype=bool)
        keep[:-1] = stamps[1:] != stamps[:-1]
        if not np.all(keep):
            logger.debug("pose track: dropped %d pose(s) with duplicate stamps (kept the last)", int((~keep).sum()))
        self._stamps = stamps[keep]
        self._positions = pos[keep]
        self._orientations = ori[keep]
        for arr in (self._stamps, self._positions, self._orientations):
            arr.setflags(write=False)
        self.frame_id = str(frame_id)

    @property
    def stamps_ns(self) -> np.ndarray:
        """(N,) int64 nanoseconds, strictly increasing (read-only)."""
        return self._stamps

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 metres (read-only)."""
        return self._positions

    @property
    def orientations(self) -> np.ndarray:
        """(N, 4) float64 unit quaternions x y z w; NaN rows where unknown (read-only)."""
        return self._orientations

    @property
    def has_orientation(self) -> np.ndarray:
        """(N,) bool: which poses carry an orientation."""
        return ~np.isnan(self._orientations[:, 3])

    @property
    def span(self) -> tuple[int, int]:
        """(first, last) stamp in nanoseconds."""
        return int(self._stamps[0]), int(self._stamps[-1])

    def __len__(self) -> int:
        return int(self._stamps.shape[0])

    def __repr__(self) -> str:
        first, last = self.span
        return f"PoseTrack({len(self)} poses, {(last - first) / NS_PER_S:.3f} s, frame_id={self.frame_id!r})"

    def interpolate(self, stamps_ns: np.ndarray, max_gap_s: float) -> InterpolatedPoses:
        """Poses at query stamps: linear in position, slerp in orientation between the bracketing poses.

        A query is valid when it lies inside the track span with both bracketing poses within ``max_gap_s`` of it
        (so a hole in the track invalidates the stamps in it), or outside the span by at most ``max_gap_s`` (then
        the end pose is used as is). A query equal to a track stamp returns that pose exactly.

        Args:
            stamps_ns: (M,) integer nanoseconds, any order.
            max_gap_s: largest allowed time in seconds between a query and a bracketing pose (>= 0; inf allowed).

        Returns:
            The interpolated poses; invalid rows are NaN.

        Raises:
            PoseTrackError: for non-integer stamps or a negative/NaN ``max_gap_s``.
        """
        q = _as_stamps(stamps_ns, "stamps_ns")
        if not (isinstance(max_gap_s, (int, float, np.floating, np.integer)) and max_gap_s >= 0.0):
            raise PoseTrackError(f"max_gap_s is {max_gap_s!r}; expected seconds >= 0 (e.g. 0.1 for 10 Hz odometry)")
        max_gap_ns = math.inf if math.isinf(max_gap_s) else int(round(float(max_gap_s) * NS_PER_S))
        s = self._stamps
        n, m = s.shape[0], q.shape[0]
        i1 = np.searchsorted(s, q, side="right")  # first track stamp > query
        i0 = i1 - 1  # last track stamp <= query (-1 before the start)
        before = i0 < 0
        after = i1 >= n
        lo = np.clip(i0, 0, n - 1)
        hi = np.clip(i1, 0, n - 1)
        d0 = q - s[lo]  # int64 ns; negative only before the start
        d1 = s[hi] - q  # negative only after the end
        exact = ~before & (d0 == 0)
        inside = ~before & ~after & ~exact
        # Distances to the nearest and to the farther bracketing pose (for exact hits and after the end: d0).
        gap_ns = np.where(before, -d0, np.where(inside, np.minimum(d0, d1), d0))
        worst_ns = np.where(before, -d0, np.where(inside, np.maximum(d0, d1), d0))
        valid = worst_ns <= max_gap_ns
        # Integer differences are exact; their ratio is a well-conditioned float.
        span_ns = np.where(inside, s[hi] - s[lo], 1)
        t = np.where(inside, d0 / span_ns, 0.0)
        j0 = np.where(before, 0, lo)  # the pose used when t == 0
        positions = self._positions[j0] + t[:, None] * (self._positions[hi] - self._positions[j0])
        orientations = self._orientations[j0].copy()
        if np.any(inside):
            orientations[inside] = quat_slerp(
                self._orientations[lo[inside]], self._orientations[hi[inside]], t[inside]
            )
        positions[~valid] = np.nan
        orientations[~valid] = np.nan
        logger.debug("interpolated %d stamps, %d valid (max_gap_s=%s)", m, int(valid.sum()), max_gap_s)
        return InterpolatedPoses(
            positions=positions,
            orientations=orientations,
            valid=valid,
            gap_s=gap_ns.astype(np.float64) / NS_PER_S,
        )


@dataclass(frozen=True)
class KeyframeGateConfig:
    """Keyframe gate thresholds (node parameters ``recording.*``, CLI flags ``--min-distance-m``, ...); 0 switches a
    rule off. See :class:`KeyframeGate` for how they combine."""

    SETTINGS_GROUP: ClassVar[str] = "recording"

    min_distance_m: float = setting(0.5, "a new keyframe after moving this far (0: rule off)", min=0.0, max=1e4)
    min_rotation_deg: float = setting(15.0, "a new keyframe after turning this much (0: rule off)", min=0.0,
                                      max=360.0)
    min_interval_s: float = setting(0.0, "at least this many seconds between keyframes of one camera (0: off)",
                                    min=0.0, max=86400.0)
    max_interval_s: float = setting(0.0, "a new keyframe after this many seconds even without motion (0: off)",
                                    min=0.0, max=86400.0)
    no_pose_interval_s: float = setting(1.0, "frames without a pose (no pose source, or none near the image "
                                             "stamp): a new keyframe after this many seconds (0: every frame)",
                                        min=0.0, max=86400.0)

    def __post_init__(self) -> None:
        check(self)

    @property
    def all_rules_off(self) -> bool:
        """Distance, rotation and maximum-interval rules all off: every frame is a keyframe (min_interval_s
        still applies)."""
        return self.min_distance_m == 0 and self.min_rotation_deg == 0 and self.max_interval_s == 0

    def describe(self, with_poses: bool) -> str:
        """The rule in force, in words (logged when recording starts)."""
        if self.all_rules_off:
            rule = "every frame"
        elif not with_poses:
            rule = (f"a keyframe every {self.no_pose_interval_s:g} s (no pose source)" if self.no_pose_interval_s > 0
                    else "every frame (no pose source)")
        else:
            parts = [f"{self.min_distance_m:g} m" if self.min_distance_m > 0 else "",
                     f"{self.min_rotation_deg:g} deg" if self.min_rotation_deg > 0 else "",
                     f"{self.max_interval_s:g} s" if self.max_interval_s > 0 else ""]
            rule = "a keyframe every " + " or ".join(p for p in parts if p)
            rule += f"; frames without a pose: every {self.no_pose_interval_s:g} s" if self.no_pose_interval_s else ""
        return rule + (f", at most one per {self.min_interval_s:g} s" if self.min_interval_s > 0 else "")


@dataclass(frozen=True)
class PosePairingConfig:
    """How images are paired with the poses of a pose source (node parameters ``pose.*``, CLI ``--pose-max-gap-s``)."""

    SETTINGS_GROUP: ClassVar[str] = "pose"
    FLAG_PREFIX: ClassVar[str] = "pose-"

    max_gap_s: float = setting(0.2, "an image is paired with the pose source only if a pose lies within this many "
                                    "seconds of its stamp (raise it to ~1.0 for 1 Hz GNSS)", min=0.0, max=60.0)
    buffer_s: float = setting(30.0, "how many seconds of poses to keep for pairing with live image stamps",
                              positive=True, max=3600.0)

    def __post_init__(self) -> None:
        check(self)


class KeyframeGate:
    """Stateful keyframe selection, shared by the offline map builder and the live node.

    The first frame (after construction or :meth:`reset`) is accepted. A later frame is accepted when at least
    ``min_interval_s`` passed since the last accepted one AND (it moved >= ``min_distance_m`` OR rotated >=
    ``min_rotation_deg`` OR ``max_interval_s`` passed). Motion is measured from the last accepted frame that had a
    position (orientation). A frame without a position cannot fire the motion rules: it is accepted when
    ``no_pose_interval_s`` passed (every frame when that is 0), so recording without poses keeps frames by time.
    With distance, rotation and maximum interval all off (0), every frame is accepted. A frame older than the last
    accepted one (e.g. a bag loop) is rejected: call :meth:`reset` on a clock jump.

    Args:
        min_distance_m: distance rule threshold in metres (0: off).
        min_rotation_deg: rotation rule threshold in degrees (0: off).
        min_interval_s: minimum time between keyframes in seconds (0: off).
        max_interval_s: maximum time between keyframes in seconds (0: off).
        no_pose_interval_s: time between keyframes of frames without a position (0: every frame).

    Raises:
        ValueError: for a non-finite threshold.
    """

    def __init__(
        self,
        min_distance_m: float = KeyframeGateConfig.min_distance_m,
        min_rotation_deg: float = KeyframeGateConfig.min_rotation_deg,
        min_interval_s: float = KeyframeGateConfig.min_interval_s,
        max_interval_s: float = KeyframeGateConfig.max_interval_s,
        no_pose_interval_s: float = KeyframeGateConfig.no_pose_interval_s,
    ) -> None:
        self.config = KeyframeGateConfig(min_distance_m, min_rotation_deg, min_interval_s, max_interval_s,
                                         no_pose_interval_s)
        self._min_interval_ns = int(round(self.config.min_interval_s * NS_PER_S))
        self._max_interval_ns = int(round(self.config.max_interval_s * NS_PER_S))
        self._no_pose_interval_ns = int(round(self.config.no_pose_interval_s * NS_PER_S))
        self._min_rotation_rad = math.radians(self.config.min_rotation_deg)
        self.reset()

    @classmethod
    def from_config(cls, config: KeyframeGateConfig) -> KeyframeGate:
        """A gate with the thresholds of ``config``."""
        return cls(config.min_distance_m, config.min_rotation_deg, config.min_interval_s, config.max_interval_s,
                   config.no_pose_interval_s)

    def reset(self) -> None:
        """Forget the last keyframe: the next frame is accepted."""
        self._last_stamp: int | None = None
        self._last_position: np.ndarray | None = None
        self._last_orientation: np.ndarray | None = None
        self.num_accepted = 0

    @property
    def last_stamp_ns(self) -> int | None:
        """Stamp of the last accepted frame, None before the first."""
        return self._last_stamp

    @staticmethod
    def _vector(value: np.ndarray | None, sizes: tuple[int, ...], name: str) -> np.ndarray | None:
        if value is None:
            return None
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        if arr.shape[0] not in sizes:
            raise ValueError(f"{name} has {arr.shape[0]} values; expected {' or '.join(map(str, sizes))}")
        if not np.all(np.isfinite(arr)):
            return None  # unknown (e.g. an invalid interpolation row): only the time rules apply
        if arr.shape[0] == 4:
            norm = np.linalg.norm(arr)
            if norm < 1e-12:
                raise ValueError("orientation has zero norm; expected a unit quaternion x, y, z, w (or None)")
            arr = arr / norm
        return arr

    def accept(
        self, stamp_ns: int, position: np.ndarray | None = None, orientation: np.ndarray | None = None
    ) -> bool:
        """Decide whether the frame at ``stamp_ns`` becomes a keyframe, and remember it if so.

        Args:
            stamp_ns: integer nanoseconds.
            position: (3,) or (2,) metres, or None / non-finite when unknown.
            orientation: (4,) x y z w, or None / non-finite when unknown.

        Returns:
            True when the frame is accepted.

        Raises:
            ValueError: for a non-integer stamp or wrongly sized vectors.
        """
        if isinstance(stamp_ns, (bool, np.bool_)) or not isinstance(stamp_ns, (int, np.integer)):
            raise ValueError(
                f"stamp_ns is {stamp_ns!r} ({type(stamp_ns).__name__}); expected integer nanoseconds "
                "(sec * 1_000_000_000 + nanosec)"
            )
        stamp = int(stamp_ns)
        pos = self._vector(position, (2, 3), "position")
        ori = self._vector(orientation, (4,), "orientation")
        if self._last_stamp is None:
            self._remember(stamp, pos, ori)
            return True
        elapsed = stamp - self._last_stamp
        if elapsed < 0:
            logger.debug("gate: stamp %d is older than the last keyframe %d; rejected", stamp, self._last_stamp)
            return False
        if self._min_interval_ns > 0 and elapsed < self._min_interval_ns:
            return False
        fire = self.config.all_rules_off or (self._max_interval_ns > 0 and elapsed >= self._max_interval_ns)
        if not fire and pos is None:  # the motion rules cannot fire: keep frames by time
            fire = elapsed >= self._no_pose_interval_ns
        if not fire and self.config.min_distance_m > 0 and pos is not None and self._last_position is not None:
            last = self._last_position
            if last.shape != pos.shape:  # mixing 2-D and 3-D positions: compare in the plane
                last, pos_cmp = last[:2], pos[:2]
            else:
                pos_cmp = pos
            fire = float(np.linalg.norm(pos_cmp - last)) >= self.config.min_distance_m
        if not fire and self.config.min_rotation_deg > 0 and ori is not None and self._last_orientation is not None:
            fire = quat_angle(ori, self._last_orientation) >= self._min_rotation_rad
        if fire:
            self._remember(stamp, pos, ori)
        return bool(fire)

    def _remember(self, stamp: int, pos: np.ndarray | None, ori: np.ndarray | None) -> None:
        self._last_stamp = stamp
        if pos is not None:
            self._last_position = pos
        if ori is not None:
            self._last_orientation = ori
        self.num_accepted += 1


def select_keyframes(
    stamps_ns: np.ndarray,
    positions: np.ndarray | None = None,
    orientations: np.ndarray | None = None,
    min_distance_m: float = KeyframeGateConfig.min_distance_m,
    min_rotation_deg: float = KeyframeGateConfig.min_rotation_deg,
    min_interval_s: float = KeyframeGateConfig.min_interval_s,
    max_interval_s: float = KeyframeGateConfig.max_interval_s,
    no_pose_interval_s: float = KeyframeGateConfig.no_pose_interval_s,
) -> np.ndarray:
    """Run a fresh :class:`KeyframeGate` over frames in stamp order (ties keep input order).

    Args:
        stamps_ns: (N,) integer nanoseconds.
        positions: (N, 3) or (N, 2) metres, NaN rows for unknown; None when no frame has one.
        orientations: (N, 4) x y z w, NaN rows for unknown; None when no frame has one.
        min_distance_m: see :class:`KeyframeGate`.
        min_rotation_deg: see :class:`KeyframeGate`.
        min_interval_s: see :class:`KeyframeGate`.
        max_interval_s: see :class:`KeyframeGate`.
        no_pose_interval_s: see :class:`KeyframeGate`.

    Returns:
        (N,) bool mask in input order, True for keyframes.

    Raises:
        PoseTrackError: for non-integer stamps or arrays whose length does not match the stamps.
        ValueError: for non-finite thresholds.
    """
    stamps = _as_stamps(stamps_ns, "stamps_ns")
    n = stamps.shape[0]
    pos = None if positions is None else np.asarray(positions, dtype=np.float64)
    ori = None if orientations is None else np.asarray(orientations, dtype=np.float64)
    if pos is not None and (pos.ndim != 2 or pos.shape[0] != n or pos.shape[1] not in (2, 3)):
        raise PoseTrackError(f"positions have shape {pos.shape}; expected ({n}, 3) or ({n}, 2) to match the stamps")
    if ori is not None and ori.shape != (n, 4):
        raise PoseTrackError(f"orientations have shape {ori.shape}; expected ({n}, 4) to match the stamps")
    gate = KeyframeGate(min_distance_m, min_rotation_deg, min_interval_s, max_interval_s, no_pose_interval_s)
    mask = np.zeros(n, dtype=bool)
    for i in np.argsort(stamps, kind="stable"):
        mask[i] = gate.accept(
            stamps[i], None if pos is None else pos[i], None if ori is None else ori[i]
        )
    return mask
