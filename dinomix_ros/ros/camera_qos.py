"""Camera subscriptions that cannot silently lose frames: QoS matched to each camera's publishers.

Large images over the default Fast DDS transports: a best-effort subscription to a RELIABLE publisher gets a
best-effort connection, and most large frames are lost on the way (measured: 12-20 % delivered at 720p), while a
reliable subscription to a BEST_EFFORT publisher gets no connection at all. So with ``cameras.reliability: auto``
each camera is subscribed reliable when every publisher of its topic is reliable, and best effort otherwise, and
re-subscribed when its publishers change (checked once a second). While a topic has no publisher yet, it is
subscribed both ways, so a camera that appears later is received with its own reliability from its first frame.
``best_effort`` or ``reliable`` force a policy; a forced mismatch is reported through the middleware's
incompatible-QoS event. A re-subscription is make-before-break: the replaced subscription keeps delivering until the
new one has matched every publisher and delivered a frame itself (or for at most :data:`RETIRE_AFTER_S`), and a frame
that arrives through both is passed on once. Frames the middleware reports lost (a best-effort publisher's samples
that never arrived) are passed to ``on_lost`` per camera.

:class:`CameraSubscriptions` holds a node's camera inputs: the image subscriptions (with those rules), each camera's
``camera_info`` (image_transport naming) and its aligned depth image.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSPolicyKind, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from dinomix_ros.imaging.camera import camera_info_topic
from dinomix_ros.util.stamps import header_stamp_ns

try:  # rclpy >= Iron
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

__all__ = ["RELIABILITY_MODES", "RETIRE_AFTER_S", "CameraSubscriptions", "SubscriptionEventCallbacks",
           "choose_reliability", "camera_qos", "image_type", "resolve"]

#: Values of ``cameras.reliability``.
RELIABILITY_MODES = ("auto", "best_effort", "reliable")
#: Longest a replaced subscription keeps delivering when the new one has not proved itself (an idle camera).
RETIRE_AFTER_S = 10.0
#: A frame with the stamp of one that arrived this recently through another subscription is that frame again.
DUPLICATE_WITHIN_S = 2.0
_RELIABLE, _BEST_EFFORT = ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT


def choose_reliability(mode: str, publishers: Iterable[ReliabilityPolicy]) -> ReliabilityPolicy:
    """The subscription reliability for ``mode`` given the reliability of the topic's publishers."""
    if mode == "reliable":
        return ReliabilityPolicy.RELIABLE
    if mode == "best_effort":
        return ReliabilityPolicy.BEST_EFFORT
    offered = list(publishers)
    if offered and all(p == ReliabilityPolicy.RELIABLE for p in offered):
        return ReliabilityPolicy.RELIABLE  # retransmissions: no frame lost in transit
    return ReliabilityPolicy.BEST_EFFORT  # connects to best-effort and reliable publishers alike


def camera_qos(reliability: ReliabilityPolicy, depth: int) -> QoSProfile:
    """Keep-last ``depth`` (the node keeps only the newest frame anyway), volatile, with ``reliability``."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability)


def image_type(resolved_topic: str) -> type:
    """sensor_msgs/CompressedImage for a topic whose resolved (remapped) name ends in /compressed, else Image."""
    return CompressedImage if resolved_topic.rstrip("/").endswith("/compressed") else Image


def resolve(node: Node, topic: str) -> str:
    """The topic's full name after the node's namespace and remappings (``camera/image_raw`` -> ``/ns/...``)."""
    resolve_topic_name = getattr(node, "resolve_topic_name", None)
    if resolve_topic_name is not None:
        return resolve_topic_name(topic)
    from rclpy.expand_topic_name import expand_topic_name  # older rclpy: namespace applied, remappings are not

    return expand_topic_name(topic, node.get_name(), node.get_namespace())


@dataclass(eq=False)
class _Sub:
    """One image subscription of a camera and whether it delivered a frame since it last had to prove itself."""

    handle: object
    policy: ReliabilityPolicy
    delivered: bool = False
    last_delivery: float = -math.inf  # monotonic


@dataclass(eq=False)
class _Camera:
    """A camera's subscriptions: ``live`` by policy (``primary`` is the one its publishers need; under ``auto``
    without publishers a reliable one stands by beside it), and replaced ones still delivering while ``retiring``."""

    primary: ReliabilityPolicy
    live: dict[ReliabilityPolicy, _Sub] = field(default_factory=dict)
    retiring: list[_Sub] = field(default_factory=list)
    retiring_since: float = 0.0
    offered: list = field(default_factory=list)  # the publishers' reliability at the last check
    recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=16))  # (stamp, monotonic)

    def all(self) -> list[_Sub]:
        return list(self.live.values()) + self.retiring


class CameraSubscriptions:
    """A node's camera inputs: image subscriptions with the reliability their publishers need (followed once a
    second under ``auto``), and optionally each camera's camera_info and aligned depth image.

    Args:
        node: the node that owns the subscriptions.
        group: their callback group.
        on_image: ``(camera, msg)`` for each image (once, whichever subscription brought it).
        on_incompatible: ``(camera, event)`` when a publisher offers a QoS the subscription cannot connect to.
        guard: wraps a callback so that nothing it raises reaches the executor (``guard(what, callback)``).
        on_lost: ``(camera, count)`` when the middleware reports frames of the camera that never arrived.
    """

    def __init__(self, node: Node, group: object, on_image: Callable[[str, object], None],
                 on_incompatible: Callable[[str, object], None], guard: Callable[[str, Callable], Callable],
                 on_lost: Callable[[str, int], None] | None = None) -> None:
        self._node, self._group, self._guard = node, group, guard
        self._on_image, self._on_incompatible, self._on_lost = on_image, on_incompatible, on_lost
        self._mode, self._depth = "auto", 1
        self._cameras: dict[str, _Camera] = {}  # resolved topic -> its subscriptions
        self._extras: list = []
        self._watch = None

    @property
    def cameras(self) -> dict[str, tuple[object, ReliabilityPolicy]]:
        """Resolved topic -> (the subscription its publishers need, its reliability)."""
        return {topic: (cam.live[cam.primary].handle, cam.primary) for topic, cam in self._cameras.items()}

    def start(self, topics: list[str], mode: str, depth: int) -> None:
        """Subscribe to the cameras (resolved topic names) with ``mode`` (:data:`RELIABILITY_MODES`)."""
        self._mode, self._depth = mode, depth
        for topic in topics:
            if mode == "auto":
                self._cameras[topic] = _Camera(primary=_BEST_EFFORT)
                self._follow(topic, self._cameras[topic])
            else:
                policy = choose_reliability(mode, [])
                cam = self._cameras[topic] = _Camera(primary=policy)
                cam.live[policy] = self._subscribe(topic, policy)
        if mode == "auto":  # publishers come and go: follow their QoS (steady time: also without /clock)
            self._watch = self._node.create_timer(1.0, self._guard("camera QoS", self.follow_publishers),
                                                  callback_group=self._group,
                                                  clock=Clock(clock_type=ClockType.STEADY_TIME))

    def add_extras(self, topics: list[str], camera_info: Callable[[str, CameraInfo], None] | None,
                   depth_topics: list[str], on_depth: Callable[[str, object], None]) -> None:
        """Each camera's camera_info (when ``camera_info`` is given) and its depth image (a non-empty entry of
        ``depth_topics``, in the order of ``topics``); best effort, which connects to any publisher."""
        sensor = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        subscribe = functools.partial(self._node.create_subscription, callback_group=self._group)
        if camera_info is not None:
            for topic in topics:
                self._extras.append(subscribe(CameraInfo, camera_info_topic(topic), self._guard(
                    "camera_info", functools.partial(camera_info, topic)), sensor))
        for topic, depth_topic in zip(topics, depth_topics):
            if depth_topic:
                self._extras.append(subscribe(Image, depth_topic, functools.partial(on_depth, topic), sensor))

    def _subscribe(self, topic: str, policy: ReliabilityPolicy) -> _Sub:
        sub = _Sub(handle=None, policy=policy)
        events = SubscriptionEventCallbacks(incompatible_qos=functools.partial(self._incompatible, topic),
                                            message_lost=functools.partial(self._lost, topic, sub))
        sub.handle = self._node.create_subscription(
            image_type(topic), topic, functools.partial(self._deliver, topic, sub), camera_qos(policy, self._depth),
            event_callbacks=events, callback_group=self._group)
        return sub

    def _deliver(self, topic: str, sub: _Sub, msg: object) -> None:
        """Pass an image on, once: while a camera has more than one subscription, each may deliver the same frame
        (only then are stamps looked at: the camera path costs nothing otherwise)."""
        cam = self._cameras.get(topic)
        if cam is None:
            return
        sub.delivered, sub.last_delivery = True, time.monotonic()
        if len(cam.live) + len(cam.retiring) > 1:
            stamp, now = header_stamp_ns(msg), time.monotonic()
            if stamp == 0:  # no stamp to tell a duplicate by: only the subscription the publishers need delivers
                if cam.live.get(cam.primary) is not sub:
                    return
            elif any(s == stamp and now - t < DUPLICATE_WITHIN_S for s, t in cam.recent):
                return  # the same frame through the other subscription (a replayed bag repeats stamps later)
            else:
                cam.recent.append((stamp, now))
        self._on_image(topic, msg)

    def _incompatible(self, topic: str, event: object) -> None:
        """A publisher this subscription cannot connect to; under ``auto`` a reliability mismatch is expected (the
        reliable subscription standing by, a publisher that changed before the next check) and followed instead."""
        kind = getattr(event, "last_policy_kind", None)
        try:
            reliability = QoSPolicyKind(int(kind)) == QoSPolicyKind.RELIABILITY
        except (TypeError, ValueError):
            reliability = "RELIABILITY" in str(kind).upper()
        if self._mode == "auto" and reliability:
            return
        self._on_incompatible(topic, event)

    def _lost(self, topic: str, sub: _Sub, info: object) -> None:
        """Frames the middleware reports lost, counted when the subscription is the one the publishers need and no
        other subscription of the camera delivered lately (then it may well have received them)."""
        cam = self._cameras.get(topic)
        count = int(getattr(info, "total_count_change", 0))
        if self._on_lost is None or cam is None or count <= 0 or cam.live.get(cam.primary) is not sub:
            return
        recently = time.monotonic() - DUPLICATE_WITHIN_S
        if not any(other is not sub and other.last_delivery > recently for other in cam.all()):
            self._on_lost(topic, count)

    def follow_publishers(self) -> None:
        """Re-subscribe each camera whose publishers now need another reliability, and retire replaced
        subscriptions once the new one has proved itself."""
        for topic, cam in list(self._cameras.items()):
            self._follow(topic, cam)

    def _follow(self, topic: str, cam: _Camera) -> None:
        publishers = self._node.get_publishers_info_by_topic(topic)
        offered = cam.offered = [info.qos_profile.reliability for info in publishers]
        primary = choose_reliability("auto", offered)
        # no publisher yet: best effort (connects to any publisher) with a reliable one standing by
        wanted = {primary} if offered else {_BEST_EFFORT, _RELIABLE}
        if cam.live and (primary != cam.primary or wanted != set(cam.live)):
            self._node.get_logger().info(f"camera {topic}: its publishers changed, subscribing "
                                         f"{_state(primary, wanted)} (was {_state(cam.primary, set(cam.live))})")
        cam.primary = primary
        for policy in wanted - set(cam.live):
            cam.live[policy] = self._subscribe(topic, policy)
        replaced = [cam.live.pop(policy) for policy in set(cam.live) - wanted]
        if replaced:
            cam.retiring += replaced
            cam.retiring_since = time.monotonic()
            cam.live[primary].delivered = False  # must deliver a frame after the switch
        if cam.retiring and self._proved(cam, len(publishers)):
            for sub in cam.retiring:
                self._node.destroy_subscription(sub.handle)
            cam.retiring = []

    @staticmethod
    def _proved(cam: _Camera, publishers: int) -> bool:
        """The new subscription has matched every publisher and delivered a frame since the switch (a frame in
        flight then reaches one of the two), or the replaced ones have had :data:`RETIRE_AFTER_S`, or they cannot
        receive anything (reliable ones when every publisher is best effort)."""
        if cam.primary == _BEST_EFFORT and all(sub.policy == _RELIABLE for sub in cam.retiring) and publishers \
                and not any(p == _RELIABLE for p in cam.offered):
            return True
        new = cam.live[cam.primary]
        count = getattr(new.handle, "get_publisher_count", None)  # rclpy without it (Humble): delivery alone
        matched = count() >= publishers if count is not None else True
        return (matched and new.delivered) or time.monotonic() - cam.retiring_since > RETIRE_AFTER_S

    def policies(self) -> dict[str, ReliabilityPolicy]:
        """Each camera's reliability (the one its publishers need)."""
        return {topic: cam.primary for topic, cam in self._cameras.items()}

    def describe(self) -> str:
        """``topic (Image, reliable), ...`` for the log."""
        return ", ".join(f"{topic} ({image_type(topic).__name__}, {_state(cam.primary, set(cam.live))})"
                         for topic, cam in self._cameras.items())

    def stop(self) -> None:
        """Destroy every subscription and the QoS watch."""
        for sub in self._extras + [s.handle for cam in self._cameras.values() for s in cam.all()]:
            self._node.destroy_subscription(sub)
        self._extras, self._cameras = [], {}
        if self._watch is not None:
            self._node.destroy_timer(self._watch)
            self._watch = None


def _state(primary: ReliabilityPolicy, live: set) -> str:
    """``reliable``, ``best_effort``, or ``best_effort + reliable standing by`` (no publisher yet)."""
    return primary.name.lower() + (" + reliable standing by" if len(live) > 1 else "")
