"""The node's relocalization inputs: the consumer's own pose topic (``when_lost``) and the trigger topic (requests),
subscribed at activation with names relative to the node's namespace, fed to the ROS-free
:class:`~dinomix_ros.localization.relocalization.Relocalizer`."""

from __future__ import annotations

import time
from collections.abc import Callable

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from dinomix_ros.localization.relocalization import CONSUMER_TYPES, TRIGGER_TYPES, Relocalizer
from dinomix_ros.ros.conversions import msg_class

__all__ = ["RelocalizationInputs"]


class RelocalizationInputs:
    """Subscriptions of one activation (see the module docstring).

    Args:
        node: the node that owns the subscriptions.
        relocalizer: the policy they feed.
        callback_group: the group of their callbacks.
        guarded: wraps a callback so that an exception is counted and logged, never raised (the node's).
    """

    def __init__(self, node: Node, relocalizer: Relocalizer, callback_group: object,
                 guarded: Callable[[str, Callable], Callable]) -> None:
        self._node, self._reloc, self._group, self._guarded = node, relocalizer, callback_group, guarded
        self._consumer = self._trigger = None

    def start(self, mode: str, consumer_topic: str, consumer_type: str, trigger_topic: str, trigger_type: str) -> None:
        """Subscribe the consumer's pose topic (``when_lost`` only) and the trigger topic (when set)."""
        self.stop()
        if mode == "when_lost":
            # best effort, volatile: connects to every publisher (AMCL's amcl_pose is reliable, transient local)
            self._consumer = self._node.create_subscription(
                msg_class(CONSUMER_TYPES[consumer_type]), consumer_topic,
                self._guarded("consumer pose", self._on_consumer_pose),
                QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT), callback_group=self._group)
        if trigger_topic:
            self._trigger = self._node.create_subscription(
                msg_class(TRIGGER_TYPES[trigger_type]), trigger_topic,
                self._guarded("relocalization trigger", self._on_trigger),
                QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE), callback_group=self._group)

    def stop(self) -> None:
        for sub in (self._consumer, self._trigger):
            if sub is not None:
                self._node.destroy_subscription(sub)
        self._consumer = self._trigger = None

    def describe(self, mode: str) -> str:
        """When priors are published, with the resolved topics (for the activation log line)."""
        if mode == "when_lost" and self._consumer is not None:
            text = f"pose priors when {self._consumer.topic_name} says its node is lost (and on request: ~/relocalize"
        elif mode == "on_request":
            text = "pose priors on request (~/relocalize"
        else:
            text = f"pose priors {mode.replace('_', ' ')} (and on request: ~/relocalize"
        return text + (f", or a message on {self._trigger.topic_name})" if self._trigger is not None else ")")

    def _on_consumer_pose(self, msg: object) -> None:
        """The consumer's own pose: its covariance says whether it is lost."""
        self._reloc.consumer_pose(msg.pose.covariance, time.monotonic())

    def _on_trigger(self, msg: object) -> None:
        """A trigger message: a request nobody waits for (answered by publishing the prior)."""
        topic = self._trigger.topic_name if self._trigger is not None else "the trigger topic"
        self._reloc.request(f"trigger {topic}", time.monotonic())
        self._node.get_logger().info(f"relocalization requested on {topic}: publishing the next verified prior",
                                     throttle_duration_sec=1.0)
