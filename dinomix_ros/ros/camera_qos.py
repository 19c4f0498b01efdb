"""Camera subscriptions that cannot silently lose frames: QoS matched to each camera's publishers.

Large images over the default Fast DDS transports: a best-effort subscription to a RELIABLE publisher gets a
best-effort connection, and most large frames are lost on the way (measured: 12-20 % delivered at 720p), while a
reliable subscription to a BEST_EFFORT publisher gets no connection at all. So with ``cameras.reliability: auto``
each camera is subscribed reliable when every publisher of its topic is reliable, and best effort otherwise (also
while it has no publisher yet), and re-subscribed when its publishers change. ``best_effort`` or ``reliable`` force
a policy; a forced mismatch is reported through the middleware's incompatible-QoS event. A re-subscription is
make-before-break: the old subscription keeps delivering until the next check (a second later, when the new one has
matched the publishers), and a frame that arrives through both is passed on once.

:class:`CameraSubscriptions` holds a node's camera inputs: the image subscriptions (with those rules), each camera's
``camera_info`` (image_transport naming) and its aligned depth image.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable

from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from dinomix_ros.imaging.camera import camera_info_topic
from dinomix_ros.util.stamps import header_stamp_ns

try:  # rclpy >= Iron
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

__all__ = ["RELIABILITY_MODES", "CameraSubscriptions", "SubscriptionEventCallbacks", "choose_reliability",
           "camera_qos", "image_type", "resolve"]

#: Values of ``cameras.reliability``.
RELIABILITY_MODES = ("auto", "best_effort", "reliable")


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


class CameraSubscriptions:
    """A node's camera inputs: one image subscription per camera with the reliability its publishers need (followed
    once a second under ``auto``), and optionally each camera's camera_info and aligned depth image.

    Args:
        node: the node that owns the subscriptions.
        group: their callback group.
        on_image: ``(camera, msg)`` for each image.
        on_incompatible: ``(camera, event)`` when a publisher offers a QoS the subscription cannot connect to.
        guard: wraps a callback so that nothing it raises reaches the executor (``guard(what, callback)``).
    """

    def __init__(self, node: Node, group: object, on_image: Callable[[str, object], None],
                 on_incompatible: Callable[[str, object], None],
                 guard: Callable[[str, Callable], Callable]) -> None:
        self._node, self._group, self._guard = node, group, guard
        self._on_image, self._on_incompatible = on_image, on_incompatible
        self._mode, self._depth = "auto", 1
        self.cameras: dict[str, tuple[object, ReliabilityPolicy]] = {}  # resolved topic -> (subscription, policy)
        self._retiring: dict[str, object] = {}  # topic -> the subscription a re-subscription replaced
        self._recent: dict[str, deque[int]] = {}  # topic -> stamps of its images while a subscription retires
        self._extras: list = []
        self._watch = None

    def start(self, topics: list[str], mode: str, depth: int) -> None:
        """Subscribe to the cameras (resolved topic names) with ``mode`` (:data:`RELIABILITY_MODES`)."""
        self._mode, self._depth = mode, depth
        for topic in topics:
            self._subscribe(topic)
        if mode == "auto":  # publishers come and go: follow their QoS
            self._watch = self._node.create_timer(1.0, self._guard("camera QoS", self.follow_publishers),
                                                  callback_group=self._group)

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

    def _subscribe(self, topic: str) -> None:
        """(Re)subscribe to one camera with the QoS its publishers need; a replaced subscription retires at the next
        check, so that no frame in flight is lost while the new one connects."""
        node = self._node
        offered = [info.qos_profile.reliability for info in node.get_publishers_info_by_topic(topic)]
        policy = choose_reliability(self._mode, offered)
        events = SubscriptionEventCallbacks(incompatible_qos=functools.partial(self._on_incompatible, topic))
        sub = node.create_subscription(image_type(topic), topic, functools.partial(self._deliver, topic),
                                       camera_qos(policy, self._depth), event_callbacks=events,
                                       callback_group=self._group)
        old = self.cameras.get(topic)
        if old is not None:
            if topic in self._retiring:  # changed again within a second: the oldest goes now
                node.destroy_subscription(self._retiring.pop(topic))
            self._retiring[topic] = old[0]
        self.cameras[topic] = (sub, policy)

    def _deliver(self, topic: str, msg: object) -> None:
        """Pass an image on, once: while a replaced subscription retires, both may deliver the same frame (only
        then are stamps looked at: the camera path costs nothing otherwise)."""
        if topic in self._retiring:
            stamp = header_stamp_ns(msg)
            recent = self._recent.setdefault(topic, deque(maxlen=16))
            if stamp != 0 and stamp in recent:
                return
            recent.append(stamp)
        self._on_image(topic, msg)

    def follow_publishers(self) -> None:
        """Retire replaced subscriptions, then re-subscribe each camera whose publishers now need another
        reliability."""
        for topic in list(self._retiring):
            self._node.destroy_subscription(self._retiring.pop(topic))
            self._recent.pop(topic, None)
        for topic, (_, policy) in list(self.cameras.items()):
            offered = [info.qos_profile.reliability for info in self._node.get_publishers_info_by_topic(topic)]
            wanted = choose_reliability("auto", offered)
            if wanted != policy:
                self._node.get_logger().info(f"camera {topic}: its publishers changed, subscribing "
                                             f"{wanted.name.lower()} (was {policy.name.lower()})")
                self._subscribe(topic)

    def describe(self) -> str:
        """``topic (Image, reliable), ...`` for the log."""
        return ", ".join(f"{topic} ({sub.msg_type.__name__}, {policy.name.lower()})"
                         for topic, (sub, policy) in self.cameras.items())

    def stop(self) -> None:
        """Destroy every subscription and the QoS watch."""
        for sub in self._extras + list(self._retiring.values()) + [sub for sub, _ in self.cameras.values()]:
            self._node.destroy_subscription(sub)
        self._extras, self.cameras, self._retiring, self._recent = [], {}, {}, {}
        if self._watch is not None:
            self._node.destroy_timer(self._watch)
            self._watch = None
