"""When a pose prior is published: on request, when the consumer is lost, or continuously (``output.pose_prior_mode``).

A pose prior means different things to different consumers. nav2 AMCL, RTAB-Map (localization mode) and cuVSLAM
treat a message on their initial-pose input as "the robot is HERE": AMCL re-initialises its particle filter around
it, cuVSLAM runs a map localization around it. Streaming every accepted match to them resets a converged localizer
again and again. An EKF (robot_localization) or a pose graph fuses each prior as one more measurement, weighted by
its covariance, and wants them continuously. So :class:`Relocalizer` decides, per frame, whether the frame's prior is
published:

* ``on_request`` (default): only to answer a request (the node's ``~/relocalize`` service, or a message on
  ``relocalization.trigger_topic``, e.g. cuVSLAM's ``visual_slam/trigger_hint``): the next eligible prior is
  published once and answers every request waiting for it; a request that sees none within
  ``relocalization.request_timeout_s`` fails with the reason (what the frames it waited for were rejected by).
  Requests are answered the same way in the other modes (without a second publication of that prior).
* ``when_lost``: only while the consumer's own pose topic (``relocalization.consumer_topic``, e.g. AMCL's
  ``amcl_pose``) says it is lost: its position or yaw std-dev above ``relocalization.lost_sigma_m`` /
  ``lost_sigma_rad``, no pose from it within ``lost_no_pose_s`` of activation (AMCL publishes nothing before its
  first initial pose), or (optional) its last pose older than ``lost_stale_s``. One prior per loss episode; with
  ``lost_repeat_s`` > 0 another one at most that often while it stays lost. An episode ends when the consumer's
  std-devs fall below half the thresholds (:data:`RECOVER_FRACTION`: hysteresis, so a consumer hovering at a
  threshold does not open a new episode, and get reset, on every message).
* ``continuous``: every accepted match's prior, rate-limited by ``output.pose_prior_min_period_s`` (the live map
  decides that: :attr:`FrameOutcome.publish_prior`).

Eligible priors in ``on_request`` and ``when_lost``: only an accepted match whose best candidate passed geometric
verification (any prior case: metric, rotation, or the keyframe's pose when the camera has no intrinsics), unless
``relocalization.require_verified`` is false. An unverified keyframe prior (verification off, or a map without
local features) never resets a consumer by default. ``continuous`` publishes what it always did.

ROS-free and thread-safe: the node's worker calls :meth:`Relocalizer.offer` per frame, its services and
subscriptions call :meth:`Relocalizer.request` / :meth:`Relocalizer.consumer_pose`. Times are the caller's
monotonic seconds (differences only; never "since boot").
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dinomix_ros.settings import check, setting

__all__ = ["POSE_PRIOR_MODES", "CONSUMER_TYPES", "TRIGGER_TYPES", "RECOVER_FRACTION", "RelocalizationConfig",
           "PriorSummary", "Decision", "Request", "Relocalizer", "consumer_sigmas", "summarize_prior"]

#: ``output.pose_prior_mode`` values.
POSE_PRIOR_MODES = ("on_request", "when_lost", "continuous")
#: Message types of the consumer's own pose topic (``relocalization.consumer_type``).
CONSUMER_TYPES = {"pose_cov": "geometry_msgs/msg/PoseWithCovarianceStamped", "odometry": "nav_msgs/msg/Odometry"}
#: Message types of ``relocalization.trigger_topic`` (any message of it is a request).
TRIGGER_TYPES = {"pose_cov": "geometry_msgs/msg/PoseWithCovarianceStamped", "empty": "std_msgs/msg/Empty"}
#: A lost consumer has recovered (its loss episode ends) when both std-devs are below this fraction of the thresholds.
RECOVER_FRACTION = 0.5


@dataclass(frozen=True)
class RelocalizationConfig:
    """Requests and the consumer's loss detection (node parameters ``relocalization.*``)."""

    SETTINGS_GROUP: ClassVar[str] = "relocalization"

    request_timeout_s: float = setting(10.0, "how long a request (~/relocalize, or a trigger message) waits for a "
                                             "verified match before it fails with the reason",
                                       positive=True, max=3600.0)
    trigger_topic: str = setting("", "a message on this topic is a request, as a ~/relocalize call is (e.g. "
                                     "cuVSLAM's visual_slam/trigger_hint; relative names follow the node's "
                                     "namespace); empty: none", reconfigure=True)
    trigger_type: str = setting("pose_cov", "message type of relocalization.trigger_topic: pose_cov "
                                            "(PoseWithCovarianceStamped) or empty (std_msgs/Empty)",
                                choices=tuple(TRIGGER_TYPES), reconfigure=True)
    consumer_topic: str = setting("amcl_pose", "when_lost: the consumer's own pose topic that says whether it is "
                                               "lost (AMCL's amcl_pose, RTAB-Map's localization_pose; relative "
                                               "names follow the node's namespace)", nonempty=True,
                                  reconfigure=True)
    consumer_type: str = setting("pose_cov", "message type of relocalization.consumer_topic: pose_cov "
                                             "(PoseWithCovarianceStamped) or odometry", choices=tuple(CONSUMER_TYPES),
                                 reconfigure=True)
    lost_sigma_m: float = setting(1.0, "when_lost: the consumer is lost while its position std-dev (the larger of "
                                       "x and y, m) exceeds this", positive=True, max=1e6)
    lost_sigma_rad: float = setting(0.5, "when_lost: the consumer is lost while its yaw std-dev (rad) exceeds this",
                                    positive=True, max=1e3)
    lost_no_pose_s: float = setting(10.0, "when_lost: the consumer is lost when it published no pose within this "
                                          "many seconds of activation (AMCL publishes none before its first initial "
                                          "pose); 0: off", min=0.0, max=86400.0)
    lost_stale_s: float = setting(0.0, "when_lost: the consumer is lost when its last pose is older than this many "
                                       "seconds (for consumers that publish at a steady rate; AMCL publishes "
                                       "amcl_pose only after a filter update, i.e. while the robot moves: keep 0); "
                                       "0: off", min=0.0, max=86400.0)
    lost_repeat_s: float = setting(0.0, "when_lost: 0: one prior per loss episode; > 0: another one at most every "
                                        "this many seconds while the consumer stays lost", min=0.0, max=86400.0)
    require_verified: bool = setting(True, "on_request and when_lost publish only priors of geometrically verified "
                                           "matches (false: unverified keyframe priors too, e.g. from maps without "
                                           "local features)")

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class PriorSummary:
    """What a published prior says, for a service answer and the log."""

    stamp_ns: int
    frame_id: str
    position: tuple[float, float, float]
    yaw_rad: float
    sigma_xy_m: float
    sigma_yaw_rad: float
    case: str
    keyframe_id: int
    camera: str
    similarity: float
    inliers: int

    def text(self) -> str:
        """One line of ``key=value`` pairs (a script can split it)."""
        x, y, z = self.position
        return (f"frame={self.frame_id} x={x:.3f} y={y:.3f} z={z:.3f} yaw_deg={math.degrees(self.yaw_rad):.2f} "
                f"sigma_xy_m={self.sigma_xy_m:.3f} sigma_yaw_deg={math.degrees(self.sigma_yaw_rad):.2f} "
                f"stamp={self.stamp_ns // 10**9}.{self.stamp_ns % 10**9:09d} case={self.case} "
                f"keyframe={self.keyframe_id} similarity={self.similarity:.3f} inliers={self.inliers} "
                f"camera={self.camera}")


def _yaw(q: np.ndarray) -> float:
    x, y, z, w = (float(v) for v in q)
    if not all(math.isfinite(v) for v in (x, y, z, w)):
        return math.nan
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def summarize_prior(outcome: Any) -> PriorSummary:
    """The :class:`PriorSummary` of a frame outcome with a prior (:class:`~.live_map.FrameOutcome`)."""
    result, best = outcome.result, outcome.result.best
    prior = result.prior
    cov = np.asarray(prior.covariance, dtype=float).reshape(6, 6)
    return PriorSummary(int(result.stamp_ns), prior.frame_id, tuple(float(v) for v in prior.position),
                        _yaw(prior.orientation), math.sqrt(max(cov[0, 0], cov[1, 1], 0.0)),
                        math.sqrt(max(cov[5, 5], 0.0)), outcome.prior_case, int(best.keyframe_id), result.camera,
                        float(best.similarity), int(best.inliers))


def consumer_sigmas(covariance: Sequence[float]) -> tuple[float, float]:
    """(position std-dev: the larger of x and y, yaw std-dev) of a ROS 6x6 pose covariance (row-major, 36 values);
    NaN or negative variances count as infinitely uncertain."""
    c = np.asarray(covariance, dtype=float).reshape(-1)
    if c.size != 36:
        raise ValueError(f"a pose covariance has 36 values, got {c.size}")

    def sigma(*variances: float) -> float:
        worst = max(variances)
        return math.sqrt(worst) if all(math.isfinite(v) and v >= 0 for v in variances) else math.inf

    return sigma(c[0], c[7]), sigma(c[35])


@dataclass(eq=False)  # each request is itself (identity), however alike two are
class Request:
    """One pending relocalization request (a service call or a trigger message)."""

    source: str
    made_at: float
    done: threading.Event = field(default_factory=threading.Event)
    summary: PriorSummary | None = None
    frames: int = 0
    accepted_unverified: int = 0
    rejected_by: Counter = field(default_factory=Counter)
    best_similarity: float = -math.inf

    def failure(self, timeout_s: float) -> str:
        """Why no prior answered this request within ``timeout_s``."""
        if self.frames == 0:
            return (f"no verified match within {timeout_s:g} s: no camera frame was processed meanwhile (are the "
                    "cameras publishing? see /diagnostics)")
        why = ", ".join(f"{rule} {n}" for rule, n in self.rejected_by.most_common())
        text = f"no verified match within {timeout_s:g} s: {self.frames} frames processed"
        if why:
            text += f", rejected by: {why}"
        if self.accepted_unverified:
            text += (f"; {self.accepted_unverified} accepted without geometric verification (the map has no local "
                     "features, or verification is off: relocalization.require_verified false accepts them)")
        if math.isfinite(self.best_similarity):
            text += f"; best similarity {self.best_similarity:.3f}"
        return text


@dataclass(frozen=True)
class Decision:
    """Whether a frame's prior is published, why (a log line, empty when routine), and the requests it answers."""

    publish: bool
    reason: str = ""
    requests: tuple[Request, ...] = ()
    summary: PriorSummary | None = None


_NO = Decision(False)
_PUBLISH_WAIT_S = 5.0  # a request taken by a decision at its timeout waits this long more for the publication


class Relocalizer:
    """The pose-prior publication policy of ``output.pose_prior_mode`` (see the module docstring).

    Args:
        mode: one of :data:`POSE_PRIOR_MODES`.
        config: requests and loss detection.
    """

    def __init__(self, mode: str = "on_request", config: RelocalizationConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.mode, self.config = "on_request", RelocalizationConfig()
        self.reconfigure(mode, config or RelocalizationConfig())
        self._pending: list[Request] = []
        self._started_at: float | None = None
        self._last_pose_at: float | None = None
        self._sigmas = (math.nan, math.nan)
        self._lost = False
        self._lost_why = ""
        self._episode = 0
        self._published_episode = 0
        self._last_publish_at: float | None = None
        self.published_count = 0

    def reconfigure(self, mode: str, config: RelocalizationConfig) -> None:
        """New mode and settings, in force from the next frame (pending requests and loss state carry on)."""
        if mode not in POSE_PRIOR_MODES:
            raise ValueError(f"output.pose_prior_mode must be one of {', '.join(POSE_PRIOR_MODES)}, got {mode!r}")
        with self._lock:
            self.mode, self.config = mode, config

    def start(self, now: float) -> None:
        """Activation: the consumer's silence is measured from here; loss state and requests start afresh."""
        with self._lock:
            self._started_at, self._last_pose_at = now, None
            self._sigmas, self._lost, self._lost_why = (math.nan, math.nan), False, ""
        self.cancel_all()

    # ------------------------------------------------------------------------------------------------ the consumer

    def consumer_pose(self, covariance: Sequence[float], now: float) -> None:
        """A pose from the consumer's own topic (its 6x6 covariance)."""
        sigma_m, sigma_rad = consumer_sigmas(covariance)
        with self._lock:
            self._last_pose_at, self._sigmas = now, (sigma_m, sigma_rad)
            c = self.config
            if sigma_m > c.lost_sigma_m or sigma_rad > c.lost_sigma_rad:
                self._set_lost(True, f"its std-devs are {sigma_m:.2f} m / {sigma_rad:.2f} rad, above "
                                     f"{c.lost_sigma_m:g} m / {c.lost_sigma_rad:g} rad")
            elif sigma_m < RECOVER_FRACTION * c.lost_sigma_m and sigma_rad < RECOVER_FRACTION * c.lost_sigma_rad:
                self._set_lost(False, "")
            elif self._lost and self._lost_why.startswith("no pose"):
                self._set_lost(False, "")  # it speaks again, between the thresholds: not lost, not a new episode

    def _set_lost(self, lost: bool, why: str) -> None:
        if lost and not self._lost:
            self._episode += 1
        self._lost, self._lost_why = lost, why if lost else ""

    def _check_silence(self, now: float) -> None:
        c = self.config
        if self._started_at is None:
            return
        if self._last_pose_at is None:
            if c.lost_no_pose_s > 0 and now - self._started_at >= c.lost_no_pose_s:
                self._set_lost(True, f"no pose from it within {c.lost_no_pose_s:g} s of activation")
        elif c.lost_stale_s > 0 and now - self._last_pose_at >= c.lost_stale_s:
            self._set_lost(True, f"no pose from it for {now - self._last_pose_at:.1f} s")

    def consumer_state(self, now: float) -> tuple[bool, str]:
        """(lost, why) of the consumer now (when_lost); why is "" when it is not lost."""
        with self._lock:
            self._check_silence(now)
            return self._lost, self._lost_why

    # ------------------------------------------------------------------------------------------------ requests

    def request(self, source: str, now: float) -> Request:
        """A new request, answered by the next eligible prior (see :meth:`wait`)."""
        request = Request(source, now)
        with self._lock:
            self._pending.append(request)
        return request

    def wait(self, request: Request, timeout_s: float | None = None) -> tuple[bool, str]:
        """Block until ``request`` is answered or times out (default ``request_timeout_s``): (success, message)."""
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        request.done.wait(timeout)
        with self._lock:
            taken = request not in self._pending  # a frame's decision took it: its prior is being published
            if not taken:
                self._pending.remove(request)
        if taken:
            request.done.wait(_PUBLISH_WAIT_S)
        if request.summary is not None:
            return True, f"relocalized: {request.summary.text()}"
        if request.done.is_set():
            return False, "the request was cancelled: the node was deactivated"
        return False, request.failure(timeout)

    def expire(self, now: float) -> list[tuple[Request, str]]:
        """Drop the requests older than ``request_timeout_s`` (trigger messages: nobody waits for them); returns
        each with the reason it failed."""
        with self._lock:
            timeout = self.config.request_timeout_s
            old = [r for r in self._pending if now - r.made_at > timeout]
            self._pending = [r for r in self._pending if r not in old]
        return [(r, r.failure(timeout)) for r in old]

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------------------------------------ frames

    def _eligible(self, outcome: Any) -> tuple[bool, str | None]:
        """(has an eligible prior, the rejection to count for waiting requests)."""
        result = outcome.result
        if not result.accepted:
            return False, ", ".join(result.rejected_by) or "no candidate"
        if result.prior is None:
            return False, "no pose at the keyframe"
        verified = result.best is not None and result.best.verified
        if not verified and self.config.require_verified:
            return False, None
        return True, None

    def offer(self, outcome: Any, now: float) -> Decision:
        """Decide whether this frame's prior is published (call :meth:`published` once it is). Requests are
        answered in every mode: by the next eligible prior, published once."""
        with self._lock:
            eligible, rejection = self._eligible(outcome)
            decision = self._mode_decision(outcome, eligible, now)
            if not self._pending:
                return decision
            if not eligible:
                self._count_for_requests(outcome, rejection)
                return decision
            requests, self._pending = tuple(self._pending), []
            summary = decision.summary or summarize_prior(outcome)
            sources = ", ".join(sorted({r.source for r in requests}))
            return Decision(True, decision.reason or f"{sources}: {summary.text()}", requests, summary)

    def _mode_decision(self, outcome: Any, eligible: bool, now: float) -> Decision:
        if self.mode == "continuous":
            return Decision(True) if outcome.publish_prior else _NO
        if self.mode == "on_request":
            return _NO
        self._check_silence(now)
        if not eligible or not self._lost:
            return _NO
        c = self.config
        first = self._published_episode != self._episode
        due = first or (c.lost_repeat_s > 0 and self._last_publish_at is not None
                        and now - self._last_publish_at >= c.lost_repeat_s)
        if not due:
            return _NO
        self._published_episode, self._last_publish_at = self._episode, now
        what = "first prior of" if first else f"again (relocalization.lost_repeat_s {c.lost_repeat_s:g}) in"
        summary = summarize_prior(outcome)
        return Decision(True, f"when_lost: the consumer is lost ({self._lost_why}): {what} loss episode "
                              f"{self._episode}: {summary.text()}", summary=summary)

    def _count_for_requests(self, outcome: Any, rejection: str | None) -> None:
        best = outcome.result.best
        for request in self._pending:
            request.frames += 1
            if best is not None:
                request.best_similarity = max(request.best_similarity, float(best.similarity))
            if rejection is None:
                request.accepted_unverified += 1
            else:
                for rule in rejection.split(", "):
                    request.rejected_by[rule] += 1

    def cancel_all(self) -> None:
        """Deactivation: every waiting request fails at once (as cancelled)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for request in pending:
            request.done.set()

    def published(self, decision: Decision) -> None:
        """The decision's prior was published: answer its requests."""
        with self._lock:
            self.published_count += 1
        for request in decision.requests:
            request.summary = decision.summary
            request.done.set()

    def stats(self, now: float) -> dict[str, Any]:
        """State for /diagnostics."""
        lost, why = self.consumer_state(now) if self.mode == "when_lost" else (False, "")
        with self._lock:
            values: dict[str, Any] = {"pose_prior_mode": self.mode, "pose_priors_published": self.published_count,
                                      "relocalization_requests_pending": len(self._pending)}
            if self.mode == "when_lost":
                values.update(consumer_lost=lost, consumer_lost_reason=why, consumer_loss_episodes=self._episode,
                              consumer_sigma_m=self._sigmas[0], consumer_sigma_rad=self._sigmas[1],
                              consumer_pose_age_s=(now - self._last_pose_at) if self._last_pose_at is not None
                              else math.nan)
            return values
