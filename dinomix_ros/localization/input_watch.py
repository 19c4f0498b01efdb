"""Whether the node's inputs are alive: per-camera silence, missing camera_info, a stale pose source, and error counts
over a recent window rather than forever (what /diagnostics says is wrong, and how badly).

* A camera that sent no frame for ``diagnostics.silence_warn_periods`` of its periods is a WARN; its period is
  estimated from its own header stamps (the smallest recent gap: lost frames only make gaps longer), else
  ``cameras.min_period_s``, else 1 s. Silent for ``diagnostics.silence_error_s`` (since activation, or since its
  last frame) it is an ERROR.
* With verification on and ``cameras.use_camera_info``, a camera whose frames come without any camera_info is a
  WARN, and an ERROR once its first frame is ``silence_error_s`` old (priors then never get the verified rotation).
* The pose source (``pose.topic``): WARN when its newest pose is older than ``diagnostics.pose_stale_warn_s``, ERROR
  after ``silence_error_s`` (never received: measured from activation).
* :class:`EventWindow` counts events (bad images, bad poses, callback errors ...) over the last
  ``diagnostics.window_s``: one bad image is a warning for that long, not forever; the totals are reported apart.

ROS-free and thread-safe; times are the caller's monotonic seconds (differences only).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from dinomix_ros.settings import check, setting

__all__ = ["OK", "WARN", "ERROR", "InputHealthConfig", "EventWindow", "InputWatch"]

OK, WARN, ERROR = 0, 1, 2
_PERIOD_GAPS = 20  # recent stamp gaps a camera's period is estimated over
_MIN_GAPS = 3  # gaps needed before the stamps are trusted
_DEFAULT_PERIOD_S = 1.0


@dataclass(frozen=True)
class InputHealthConfig:
    """When silent or failing inputs become a WARN or an ERROR in /diagnostics (node parameters ``diagnostics.*``)."""

    SETTINGS_GROUP: ClassVar[str] = "diagnostics"

    silence_warn_periods: float = setting(5.0, "WARN when a camera sent no frame for this many of its periods (from "
                                               "its stamps, else cameras.min_period_s, else 1 s)", positive=True,
                                          max=1e6)
    silence_error_s: float = setting(10.0, "ERROR when a camera or the pose source sent nothing for this many "
                                           "seconds (since activation or its last message), or when a camera's "
                                           "camera_info never came this long after its first frame (verification "
                                           "on)", positive=True, max=86400.0)
    pose_stale_warn_s: float = setting(2.0, "WARN when the pose source's newest pose is older than this many "
                                            "seconds", positive=True, max=86400.0)
    window_s: float = setting(10.0, "bad images, poses and camera_info and callback errors set the status for this "
                                    "many seconds after they happen (the totals are reported too)", positive=True,
                              max=86400.0)

    def __post_init__(self) -> None:
        check(self)


class EventWindow:
    """Counts of named events: the total, and those of the last ``window_s`` seconds (thread-safe)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self._times: dict[str, deque[float]] = defaultdict(deque)
        self._totals: dict[str, int] = defaultdict(int)

    def add(self, name: str, now: float, n: int = 1) -> None:
        with self._lock:
            self._totals[name] += n
            self._times[name].extend([now] * n)
            self._trim(name, now)

    def _trim(self, name: str, now: float) -> None:
        times = self._times[name]
        while times and now - times[0] > self.window_s:
            times.popleft()

    def recent(self, name: str, now: float) -> int:
        """Events of ``name`` in the last ``window_s`` seconds."""
        with self._lock:
            self._trim(name, now)
            return len(self._times[name])

    def total(self, name: str) -> int:
        with self._lock:
            return self._totals[name]


class _Camera:
    def __init__(self) -> None:
        self.last_frame_at: float | None = None
        self.first_frame_at: float | None = None
        self.last_stamp_ns: int | None = None
        self.gaps: deque[int] = deque(maxlen=_PERIOD_GAPS)
        self.info_at: float | None = None

    def period_s(self) -> float | None:
        return min(self.gaps) / 1e9 if len(self.gaps) >= _MIN_GAPS else None


class InputWatch:
    """Arrival times of each camera's frames and camera_info and of the pose source (see the module docstring).

    Args:
        cameras: the camera topics.
        started_at: activation time: a camera or pose source that never spoke is silent since then.
        pose_source: whether a pose source is configured.
    """

    def __init__(self, cameras: Iterable[str] = (), started_at: float = 0.0, pose_source: bool = False) -> None:
        self._lock = threading.Lock()
        self._cameras = {name: _Camera() for name in cameras}
        self._started_at = started_at
        self._pose_source = pose_source
        self._last_pose_at: float | None = None

    def frame(self, camera: str, stamp_ns: int, now: float) -> None:
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is None:
                return
            if cam.first_frame_at is None:
                cam.first_frame_at = now
            cam.last_frame_at = now
            if cam.last_stamp_ns is not None and stamp_ns > cam.last_stamp_ns:
                cam.gaps.append(stamp_ns - cam.last_stamp_ns)
            elif cam.last_stamp_ns is not None and stamp_ns < cam.last_stamp_ns:
                cam.gaps.clear()  # a replay started over: a new period
            cam.last_stamp_ns = stamp_ns

    def camera_info(self, camera: str, now: float) -> None:
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is not None:
                cam.info_at = now

    def pose(self, now: float) -> None:
        with self._lock:
            self._last_pose_at = now

    def findings(self, now: float, config: InputHealthConfig, min_period_s: float = 0.0,
                 needs_camera_info: bool = False) -> tuple[list[tuple[int, str]], dict[str, Any]]:
        """(problems as (level, message), most serious first; values for /diagnostics) at ``now``."""
        problems: list[tuple[int, str]] = []
        values: dict[str, Any] = {}
        with self._lock:
            for name, cam in self._cameras.items():
                period = cam.period_s() or (min_period_s if min_period_s > 0 else _DEFAULT_PERIOD_S)
                since = cam.last_frame_at if cam.last_frame_at is not None else self._started_at
                silent = now - since
                values[f"camera {name} period_s"] = period
                values[f"camera {name} last_frame_age_s"] = silent if cam.last_frame_at is not None else math.nan
                what = "no frame from" if cam.last_frame_at is None else "no frame for"
                if silent >= config.silence_error_s:
                    problems.append((ERROR, f"camera {name}: {what} {silent:.1f} s"))
                elif silent >= config.silence_warn_periods * period:
                    problems.append((WARN, f"camera {name}: {what} {silent:.1f} s ({silent / period:.0f} periods of "
                                           f"{period:.3g} s)"))
                if needs_camera_info and cam.first_frame_at is not None and cam.info_at is None:
                    waited = now - cam.first_frame_at
                    level = ERROR if waited >= config.silence_error_s else WARN
                    problems.append((level, f"camera {name}: no camera_info for {waited:.1f} s with verification on "
                                            "(priors are keyframe poses): publish it, or set cameras.use_camera_info "
                                            "false"))
            if self._pose_source:
                since = self._last_pose_at if self._last_pose_at is not None else self._started_at
                age = now - since
                values["pose_age_s"] = age if self._last_pose_at is not None else math.nan
                text = (f"pose source: no pose for {age:.1f} s since activation" if self._last_pose_at is None else
                        f"pose source: newest pose is {age:.1f} s old")
                if age >= config.silence_error_s:
                    problems.append((ERROR, text))
                elif age >= config.pose_stale_warn_s:
                    problems.append((WARN, text))
        problems.sort(key=lambda p: -p[0])
        return problems, values
