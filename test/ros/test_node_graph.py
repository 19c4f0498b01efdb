"""The node in a robot's graph: camera QoS matched to the publishers (no silent frame loss), a forced QoS mismatch
reported, ROS 1 bags replayed, recording without a pose source, RViz-readable ~/matches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id
from sensor_msgs.msg import Image, PointCloud2, PointField

from dinomix_ros.localization.matching import Candidate, MatchResult
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.ros.conversions import matches_msg, matches_to_array
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"
CAMERA = "/camera/image_raw"
REPO = Path(__file__).resolve().parents[2]
T265 = REPO / "test" / "data" / "t265_office_bag"
FRAMES = 16  # at 2 Hz: 8 s of 640x480 rgb8 per combination


def _frame(k: int, rng: np.random.Generator) -> Image:
    msg = Image(height=480, width=640, encoding="rgb8", is_bigendian=0, step=640 * 3)
    msg.data = rng.integers(0, 255, 480 * 640 * 3, dtype=np.uint8).tobytes()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + k // 2, (k % 2) * 500_000_000
    return msg


def _publish_at_2hz(tmp_path: Path, publisher_reliability: ReliabilityPolicy, node_params: dict,
                    env_profile: bool = True) -> dict[str, str]:
    """Publish FRAMES camera frames at 2 Hz with the given QoS; return the node's last diagnostics."""
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={"model.random_weights": True, "diagnostics.period_s": 0.5,
                                                           **node_params})
    client = RosClient(domain)
    try:
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=publisher_reliability)
        camera = client.node.create_publisher(Image, CAMERA, qos)
        assert node.wait_for_log("active: cameras", timeout=90), node.log[-3000:]
        client.spin_until(lambda: camera.get_subscription_count() > 0, 10.0)
        client.spin_for(2.5)  # the node's QoS watch re-subscribes within a second of seeing this publisher
        rng = np.random.default_rng(0)
        frames = [_frame(k, rng) for k in range(FRAMES)]
        t0 = time.monotonic()
        for k, frame in enumerate(frames):
            client.spin_until(lambda: False, max(0.0, t0 + 0.5 * k - time.monotonic()))
            camera.publish(frame)
        client.spin_for(3.0)
        since = time.monotonic()
        assert client.spin_until(lambda: any(t > since for t, _ in diagnostics), 10.0)
        values = diagnostic_values(diagnostics[-1][1])
        values["status"] = diagnostics[-1][1].status[0].message
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    values["log"] = node.log
    return values


@pytest.mark.parametrize("publisher", [ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT],
                         ids=["reliable_publisher", "best_effort_publisher"])
def test_every_frame_arrives_with_the_shipped_settings(tmp_path, publisher: ReliabilityPolicy) -> None:
    values = _publish_at_2hz(tmp_path, publisher, {})
    assert int(values["frames_received"]) == FRAMES, values
    assert int(values["frames_lost_estimate"]) == 0 and int(values["qos_incompatible"]) == 0, values
    wanted = "reliable" if publisher == ReliabilityPolicy.RELIABLE else "best_effort"
    assert f"Image, {wanted})" in values["log"] or f"subscribing {wanted}" in values["log"], values["log"][-2000:]


def test_a_forced_qos_mismatch_is_reported_in_diagnostics(tmp_path) -> None:
    values = _publish_at_2hz(tmp_path, ReliabilityPolicy.BEST_EFFORT, {"cameras.reliability": "reliable"})
    assert int(values["frames_received"]) == 0
    assert int(values["qos_incompatible"]) >= 1, values
    assert "incompatible QoS" in values["status"], values["status"]
    assert "offers QoS this subscription cannot connect to" in values["log"]


def test_matches_decode_with_rviz_rule() -> None:
    """RViz's XYZ transformer: fields x, y, z of FLOAT32 at offsets 0, 4, 8; colour by the similarity field."""
    position = np.array([501234.25, 6178901.75, 12.5])
    cand = Candidate(0, 0.83, 4, 11, 1_700_000_000_000_000_000, "cam", "utm", position,
                     np.array([0.0, 0.0, 0.0, 1.0]), np.array([55.7, 13.19, 12.5]))
    msg = matches_msg(MatchResult(1_700_000_001_000_000_000, "cam", [cand], accepted=True))
    fields = {f.name: f for f in msg.fields}
    for name, offset in (("x", 0), ("y", 4), ("z", 8)):
        assert fields[name].datatype == PointField.FLOAT32 and fields[name].offset == offset and fields[name].count == 1
    data = bytes(msg.data)
    xyz = [np.frombuffer(data, "<f4", count=1, offset=fields[n].offset)[0] for n in ("x", "y", "z")]
    np.testing.assert_array_equal(xyz, position.astype(np.float32))
    assert fields["similarity"].datatype == PointField.FLOAT32
    assert np.frombuffer(data, "<f4", count=1, offset=fields["similarity"].offset)[0] == np.float32(0.83)
    full = matches_to_array(msg)
    np.testing.assert_array_equal([full["position_x"][0], full["position_y"][0], full["position_z"][0]], position)
    rviz = yaml.safe_load((REPO / "config" / "dinomix.rviz").read_text())
    displays = {d["Class"]: d for d in rviz["Visualization Manager"]["Displays"]}
    cloud = displays["rviz_default_plugins/PointCloud2"]
    assert cloud["Topic"]["Value"] == f"{NODE}/matches" and cloud["Channel Name"] == "similarity"
    assert cloud["Position Transformer"] == "XYZ"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == f"{NODE}/markers"
    assert displays["rviz_default_plugins/PoseWithCovariance"]["Topic"]["Value"] == f"{NODE}/pose_prior"


def test_a_ros1_bag_replays_into_the_node_and_yields_pose_priors(tmp_path) -> None:
    topics = ("/camera/fisheye1/image_raw", "/camera/fisheye2/image_raw")
    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    kmap, report = build_map_from_bag(T265 / "ros2_mcap", encoder, BagMapConfig(
        image_topics=topics, pose_topic="/camera/odom/sample", gate=KeyframeGateConfig(0.0, 0.0)), progress=False)
    assert report.added == 6
    map_path = save_map(kmap, tmp_path / "office.dinomap")
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "cameras.topics": list(topics),
        "matching.min_similarity": 0.99, "output.pose_prior_mode": "continuous"})
    client = RosClient(domain)
    try:
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        assert node.wait_for_log("active: cameras", timeout=90), node.log
        replay = NodeProcess(["-m", "dinomix_ros.ros.replay", str(T265 / "trimmed_locoffice.bag"), "--rate", "0.05",
                              "--topics", *topics, "--wait-for-subscribers", "1"], tmp_path, domain, name="replay")
        assert replay.proc.wait(timeout=120) == 0, replay.log
        client.spin_until(lambda: len(priors) >= 2, 30.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert "converted from ROS 1" in replay.log, replay.log
    assert "Fast CDR" not in node.log and "exception" not in node.log.lower(), node.log[-3000:]
    assert matches and len(priors) >= 2
    assert {p.header.frame_id for _, p in priors} == {"camera_odom_frame"}  # the odometry frame of the map


def test_self_map_without_poses_records_by_time(tmp_path) -> None:
    domain = next_domain_id()
    map_path = tmp_path / "self.dinomap"
    node = NodeProcess.localizer(tmp_path, domain, params={"model.random_weights": True, "mode": "self_map",
                                                           "map.path": str(map_path)})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        camera = client.publisher(Image, CAMERA)
        client.wait_for_subscribers(camera)
        rng = np.random.default_rng(3)
        for k in range(5):  # one frame per second of stamp time: the default no-pose interval keeps each
            msg = Image(height=48, width=64, encoding="rgb8", is_bigendian=0, step=64 * 3)
            msg.data = rng.integers(0, 255, 48 * 64 * 3, dtype=np.uint8).tobytes()
            msg.header.stamp.sec = 50 + k
            camera.publish(msg)
            assert client.spin_until(lambda k=k: any(m.header.stamp.sec == 50 + k for _, m in matches), 30.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert "recording from the start: a keyframe every 1 s (no pose source)" in node.log
    assert len(load_map(map_path)) == 5
