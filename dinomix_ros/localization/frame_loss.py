"""Camera frames that never reached the node, per camera, and the /diagnostics warning that says what to do.

Two measures: the middleware's own count of a subscription's lost samples (Fast DDS reports the sequence numbers of
a best-effort publisher that never arrived, also when no frame at all gets through) and gaps in the cameras' header
stamps (:class:`~dinomix_ros.localization.health.StampGaps`, for any middleware and for frames a camera or its
driver dropped). Over the last :data:`WINDOW_S` seconds, the larger of the two is a camera's loss; above
:data:`~dinomix_ros.localization.health.LOSS_WARN_FRACTION` it is a warning naming the camera, the loss and the fix.

ROS-free; thread-safe (subscription callbacks add, the diagnostics timer reads).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from dinomix_ros.localization.health import LOSS_WARN_FRACTION, StampGaps

__all__ = ["WINDOW_S", "MIN_LOST", "FIX_BEST_EFFORT", "FrameLoss"]

#: Seconds of recent frames a warning is judged on (a loss that stopped stops warning after this long).
WINDOW_S = 10.0
#: Fewer lost frames than this in the window never warn (one late frame is not a transport problem).
MIN_LOST = 2
#: What to do about a best-effort camera whose large frames are lost between processes (README: Large images).
FIX_BEST_EFFORT = ("the camera's side decides: start its driver with the large-image transport (in its shell: "
                   "eval \"$(ros2 run dinomix_ros transport_env)\"; or localize.launch.py camera_launch:=<its "
                   "launch file>), or make it publish reliable")


class _Camera:
    def __init__(self) -> None:
        self.gaps = StampGaps()
        self.reported = 0  # middleware-reported lost frames, in all
        self.events: deque[tuple[float, int, int, int]] = deque()  # (time, received, reported, gap estimate) totals


class FrameLoss:
    """Per-camera frame loss: totals since start and the last :data:`WINDOW_S` seconds.

    Args:
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._cameras: dict[str, _Camera] = {}

    def _camera(self, camera: str) -> _Camera:
        return self._cameras.setdefault(camera, _Camera())

    def received(self, camera: str, stamp_ns: int) -> None:
        """A frame of ``camera`` arrived (its header stamp)."""
        with self._lock:
            cam = self._camera(camera)
            cam.gaps.add(camera, stamp_ns)
            self._note(cam)

    def lost(self, camera: str, count: int) -> None:
        """The middleware reports ``count`` more frames of ``camera`` that never arrived."""
        with self._lock:
            cam = self._camera(camera)
            cam.reported += max(int(count), 0)
            self._note(cam)

    def _note(self, cam: _Camera) -> None:
        now = self._clock()
        cam.events.append((now, cam.gaps.received, cam.reported, cam.gaps.lost))
        while len(cam.events) > 1 and cam.events[1][0] < now - WINDOW_S:
            cam.events.popleft()  # the oldest kept one is the baseline of the window

    @property
    def lost_estimate(self) -> int:
        """Frames lost so far, all cameras (per camera the larger of the two measures)."""
        with self._lock:
            return sum(max(cam.reported, cam.gaps.lost) for cam in self._cameras.values())

    @property
    def loss_fraction(self) -> float:
        """Share of the cameras' frames that never arrived, so far."""
        lost = self.lost_estimate
        with self._lock:
            received = sum(cam.gaps.received for cam in self._cameras.values())
        return lost / (lost + received) if lost + received else 0.0

    def recent(self) -> dict[str, tuple[int, int]]:
        """Per camera: (frames received, frames lost) in the last :data:`WINDOW_S` seconds."""
        out = {}
        with self._lock:
            start = self._clock() - WINDOW_S
            for name, cam in self._cameras.items():
                # totals when the window began: the last note before it, else nothing yet
                base = next((e for e in reversed(cam.events) if e[0] < start), (start, 0, 0, 0))
                _, received, reported, gaps = cam.events[-1]
                lost = max(reported - base[2], gaps - base[3], 0)
                out[name] = (received - base[1], lost)
        return out

    def warning(self, best_effort: Mapping[str, bool]) -> str:
        """The /diagnostics warning for the camera losing the largest share of its frames ("" when none loses more
        than :data:`~dinomix_ros.localization.health.LOSS_WARN_FRACTION`).

        Args:
            best_effort: per camera, whether its subscription is best effort (then the transport is the likely
                cause), else reliable (then the camera or its driver drops frames).
        """
        worst = None
        for camera, (received, lost) in self.recent().items():
            share = lost / (lost + received) if lost + received else 0.0
            if lost >= MIN_LOST and share > LOSS_WARN_FRACTION and (worst is None or share > worst[1]):
                worst = (camera, share, received, lost)
        if worst is None:
            return ""
        camera, share, received, lost = worst
        measured = f"{lost} of {lost + received} frames ({100 * share:.0f} %) in the last {WINDOW_S:.0f} s"
        if best_effort.get(camera, True):
            return f"camera {camera}: {measured} were lost before reaching the node (best effort); {FIX_BEST_EFFORT}"
        return (f"camera {camera}: {measured} are missing from its stamps although the subscription is reliable: "
                "the camera or its driver drops them")
