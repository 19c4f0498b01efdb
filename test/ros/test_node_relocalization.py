"""Relocalization through a real node (output.pose_prior_mode): on_request publishes exactly one verified prior per
~/relocalize call or trigger message and nothing without one; when_lost stays silent while the consumer (a fake
AMCL publishing its real message type on amcl_pose, in the robot's namespace) is confident and publishes once per
loss episode. ``continuous`` (every accepted prior) is test_node_verification.py."""

from __future__ import annotations

import re

import numpy as np
from corridorbags import CAMERA, corridor_map  # noqa: F401 (a fixture)
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, replay_bag, stamp_ns
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger

from dinomix_ros.ros.conversions import matches_to_array

NODE = "/dinomix_localizer"


def _replay(client: RosClient, bag, matches: list) -> list[int]:
    """Replay a chunk, each frame answered; returns the stamps of the frames with an accepted match."""
    before = len(matches)
    replay_bag(client, bag, after_image=lambda _t, s: lambda: any(stamp_ns(m) == s for _, m in matches))
    return [stamp_ns(m) for _, m in matches[before:] if m.width and matches_to_array(m)[0]["accepted"] == 1]


def _answer_fields(message: str) -> dict[str, str]:
    assert message.startswith("relocalized: "), message
    return dict(re.findall(r"(\w+)=(\S+)", message))


def test_on_request_publishes_one_verified_prior_per_request_and_none_without(tmp_path, corridor_map) -> None:  # noqa
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(corridor_map.map_path), "cameras.topics": [CAMERA],
        "relocalization.trigger_topic": "visual_slam/trigger_hint", "relocalization.request_timeout_s": 300.0})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        assert node.wait_for_log("geometric verification on", timeout=90), node.log[-3000:]
        assert node.wait_for_log("pose priors on request (~/relocalize, or a message on /visual_slam/trigger_hint)",
                                 timeout=30), node.log[-3000:]
        accepted_before = _replay(client, corridor_map.chunks[0], matches)
        client.spin_for(1.0)
        assert accepted_before and priors == [], "accepted matches, but no request: no prior"

        service = client.node.create_client(Trigger, f"{NODE}/relocalize")
        assert client.spin_until(service.service_is_ready, 30.0)
        future = service.call_async(Trigger.Request())
        client.spin_for(2.0)  # the request is registered before the next frames
        assert not future.done(), "it waits for a verified match"
        accepted = _replay(client, corridor_map.chunks[1], matches)
        assert client.spin_until(future.done, 60.0) and len(accepted) >= 2
        answer = future.result()
        assert answer.success, answer.message
        fields = _answer_fields(answer.message)
        client.spin_until(lambda: len(priors) >= 1, 10.0)
        (_, prior), = priors  # exactly one, though the chunk had several accepted matches
        sec, nsec = fields["stamp"].split(".")
        assert stamp_ns(prior) == int(sec) * 10**9 + int(nsec) and stamp_ns(prior) in accepted
        assert prior.header.frame_id == fields["frame"] == "odom"
        assert abs(prior.pose.pose.position.x - float(fields["x"])) < 1e-3
        # the answer prints sigma with 3 decimals
        assert abs(float(fields["sigma_xy_m"]) - max(prior.pose.covariance[0], prior.pose.covariance[7]) ** 0.5) \
            <= 0.0005 + 1e-9
        assert int(fields["inliers"]) >= 30 and fields["case"] in ("rotation", "metric", "keyframe")
        assert fields["keyframe"].isdigit() and fields["camera"] == CAMERA

        # a trigger message (cuVSLAM's visual_slam/trigger_hint) is a request too: one more prior
        trigger = client.publisher(PoseWithCovarianceStamped, "/visual_slam/trigger_hint")
        client.wait_for_subscribers(trigger)
        trigger.publish(PoseWithCovarianceStamped())
        client.spin_for(2.0)
        accepted_after = _replay(client, corridor_map.chunks[2], matches)
        client.spin_for(2.0)
        assert len(accepted_after) >= 2 and len(priors) == 2, (accepted_after, len(priors))
        assert stamp_ns(priors[1][1]) in accepted_after
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert "relocalization requested on /visual_slam/trigger_hint" in node.log
    assert "pose prior published: ~/relocalize: frame=odom" in node.log


def _amcl_pose(sigma_m: float, sigma_rad: float) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = "map"
    cov = np.zeros((6, 6))
    cov[0, 0] = cov[1, 1] = sigma_m ** 2
    cov[5, 5] = sigma_rad ** 2
    msg.pose.covariance = cov.reshape(-1).tolist()
    return msg


def test_when_lost_is_silent_while_amcl_is_confident_and_publishes_once_it_is_lost(tmp_path, corridor_map) -> None:  # noqa
    domain = next_domain_id()
    robot = "/robot1"  # relative topics follow the namespace: the consumer is /robot1/amcl_pose
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(corridor_map.map_path), "cameras.topics": [CAMERA],
        "output.pose_prior_mode": "when_lost", "relocalization.lost_no_pose_s": 0.0, "diagnostics.period_s": 0.5},
        extra_ros_args=["-r", f"__ns:={robot}"])
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{robot}{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{robot}{NODE}/pose_prior")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        # AMCL's amcl_pose: reliable, transient local, depth 1 (nav2_amcl AmclNode::initPubSub)
        amcl = client.node.create_publisher(PoseWithCovarianceStamped, f"{robot}/amcl_pose", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        assert node.wait_for_log(f"pose priors when {robot}/amcl_pose says its node is lost", timeout=90), \
            node.log[-3000:]
        client.wait_for_subscribers(amcl)
        amcl.publish(_amcl_pose(0.2, 0.05))  # converged
        client.spin_for(1.0)
        confident = [s for chunk in corridor_map.chunks[:2] for s in _replay(client, chunk, matches)]
        client.spin_for(1.0)
        assert len(confident) >= 2 and priors == [], "AMCL is confident: verified matches, no prior"

        amcl.publish(_amcl_pose(3.0, 0.05))  # diverged: position std-dev 3 m
        client.spin_for(1.0)
        lost = _replay(client, corridor_map.chunks[2], matches)
        client.spin_for(2.0)
        assert len(lost) >= 2 and len(priors) == 1, (lost, len(priors))  # once per loss episode
        assert stamp_ns(priors[0][1]) in lost
        since = len(diagnostics)
        assert client.spin_until(lambda: len(diagnostics) > since, 10.0)
        values = diagnostic_values(diagnostics[-1][1])
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert values["pose_prior_mode"] == "when_lost" and values["consumer_lost"] == "True"
    assert values["consumer_loss_episodes"] == "1" and values["pose_priors_published"] == "1"
    assert "when_lost: the consumer is lost (its std-devs are 3.00 m / 0.05 rad, above 1 m / 0.5 rad): first prior " \
           "of loss episode 1" in node.log
