"""Time stamps: int64 nanoseconds everywhere, converted from and to ROS ``(sec, nanosec)`` in one place.

A float64 holds a 1.7e18 ns ROS epoch stamp only to about 256 ns, so stamps stay integers and only differences or
durations become float seconds. Messages are duck-typed: rclpy's ``builtin_interfaces/Time`` and rosbags' dataclass
have the same ``sec`` and ``nanosec`` fields.
"""

from __future__ import annotations

__all__ = ["NS_PER_S", "stamp_to_ns", "header_stamp_ns", "ns_to_sec_nanosec", "seconds_to_ns"]

NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp: object) -> int:
    """``sec * 1e9 + nanosec`` of a ``builtin_interfaces/Time``, in integers."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)  # type: ignore[attr-defined]


def header_stamp_ns(msg: object, fallback_ns: int | None = None) -> int:
    """A message's ``header.stamp`` in nanoseconds; a zero stamp (unset by the driver) gives ``fallback_ns`` if set."""
    ns = stamp_to_ns(msg.header.stamp)  # type: ignore[attr-defined]
    return fallback_ns if ns == 0 and fallback_ns is not None else ns


def ns_to_sec_nanosec(stamp_ns: int) -> tuple[int, int]:
    """``(sec, nanosec)`` of a stamp, nanosec in [0, 1e9) (negative stamps floor towards -inf, like ROS)."""
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    return sec, nanosec


def seconds_to_ns(seconds: float) -> int:
    """A duration in float seconds as integer nanoseconds (rounded)."""
    return int(round(float(seconds) * NS_PER_S))
