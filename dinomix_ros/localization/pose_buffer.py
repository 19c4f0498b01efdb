"""A short buffer of live poses, queried at image stamps (the live counterpart of a bag's pose track).

Pose messages arrive on their own (10-100 Hz odometry, 1-10 Hz GNSS); images are paired with the pose interpolated
at their stamp by the same rule as offline map building (:meth:`~dinomix_ros.maps.sources.poses.PoseTrack.
interpolate`, within ``max_gap_s``). Only poses near the stamp are used, so a query costs the same whatever
``buffer_s`` is. Thread-safe: a subscription callback adds while the worker queries.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np

from dinomix_ros.maps.geotags import interpolate_fixes
from dinomix_ros.maps.sources.posemsg import PoseSample
from dinomix_ros.maps.sources.poses import PosePairingConfig, PoseTrack, PoseTrackError
from dinomix_ros.util.stamps import seconds_to_ns

__all__ = ["PoseBuffer"]

_logger = logging.getLogger(__name__)


class PoseBuffer:
    """The last ``buffer_s`` seconds of a pose source.

    Args:
        config: ``max_gap_s`` (pairing tolerance) and ``buffer_s`` (how much history to keep).
    """

    def __init__(self, config: PosePairingConfig | None = None) -> None:
        self.config = config or PosePairingConfig()
        self._lock = threading.Lock()
        self._samples: deque[PoseSample] = deque()

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    @property
    def frame_id(self) -> str:
        """Frame of the newest pose ("" before the first)."""
        with self._lock:
            return self._samples[-1].frame_id if self._samples else ""

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()

    def add(self, sample: PoseSample) -> None:
        """Append a pose and forget those older than ``buffer_s`` before it."""
        horizon = sample.stamp_ns - seconds_to_ns(self.config.buffer_s)
        with self._lock:
            self._samples.append(sample)
            while self._samples and self._samples[0].stamp_ns < horizon:
                self._samples.popleft()

    def at(self, stamp_ns: int) -> PoseSample | None:
        """The pose interpolated at ``stamp_ns`` (position linear, orientation slerp, GNSS fix linear), or None when
        no pose lies within ``max_gap_s`` on both sides (or at the end) of it: the rule of a bag's pose track."""
        max_gap_s = self.config.max_gap_s
        window_ns = 2 * seconds_to_ns(max_gap_s) + 1
        with self._lock:
            near, newer = [], None
            for sample in reversed(self._samples):  # newest first
                if sample.stamp_ns > stamp_ns + window_ns:
                    newer = sample  # the last one seen is the nearest beyond the window
                    continue
                near.append(sample)
                if sample.stamp_ns < stamp_ns - window_ns:
                    break  # one neighbour beyond the window on each side decides bracketing as offline
            if newer is not None:
                near.insert(0, newer)
            frame = self._samples[-1].frame_id if self._samples else ""
        near = [s for s in reversed(near) if s.frame_id == frame]  # oldest first, one frame
        if not near:
            return None
        stamps = np.asarray([s.stamp_ns for s in near], np.int64)
        query = np.asarray([stamp_ns], np.int64)
        try:
            track = PoseTrack(stamps, np.stack([s.position for s in near]), np.stack([s.orientation for s in near]),
                              frame)
            got = track.interpolate(query, max_gap_s)
        except PoseTrackError as exc:  # cannot happen with parsed samples; refuse this stamp, not the node
            _logger.warning("poses near stamp %d are unusable: %s", stamp_ns, exc)
            return None
        if not got.valid[0]:
            return None
        gps = None
        if near[0].gps is not None:  # a GNSS source: its fixes, interpolated as offline geotags are
            gps = interpolate_fixes(stamps, np.stack([s.gps for s in near]), query, max_gap_s)[0]
        return PoseSample(stamp_ns, frame, got.positions[0], got.orientations[0], gps)
