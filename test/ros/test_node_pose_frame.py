"""A pose source whose header.frame_id is empty: its poses are refused (counted, logged once) instead of being put in
a frame named after the topic; ``pose.frame_id`` (set at run time here) names their frame."""

from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, stamp_ns
from sensor_msgs.msg import Image, PointCloud2

from dinomix_ros.ros.conversions import ns_to_time
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"
RAW = "/camera/image_raw"


def _image(stamp: int, rng: np.random.Generator) -> Image:
    msg = Image(height=48, width=64, encoding="rgb8", is_bigendian=0, step=192)
    msg.data = rng.integers(0, 255, 48 * 64 * 3, dtype=np.uint8).tobytes()
    msg.header.stamp = ns_to_time(stamp)
    return msg


def _odometry(stamp: int, x: float) -> Odometry:
    msg = Odometry()  # header.frame_id left empty, as some drivers do
    msg.header.stamp = ns_to_time(stamp)
    msg.pose.pose.position.x = x
    msg.pose.pose.orientation.w = 1.0
    return msg


def test_empty_pose_frames_are_refused_until_pose_frame_id_names_them(tmp_path) -> None:
    domain = next_domain_id()
    map_path = tmp_path / "live.dinomap"
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "map.create_if_missing": True,
        "cameras.topics": [RAW], "pose.topic": "/odom", "recording.autostart": True, "verification.enabled": False,
        "recording.min_distance_m": 0.0, "recording.min_rotation_deg": 0.0, "recording.max_interval_s": 0.0,
        "diagnostics.period_s": 0.3})
    client = RosClient(domain)
    rng = np.random.default_rng(3)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        camera, odom = client.publisher(Image, RAW), client.publisher(Odometry, "/odom")
        assert node.wait_for_log("active: cameras", timeout=90), node.log[-3000:]
        client.wait_for_subscribers(camera)
        client.wait_for_subscribers(odom)

        def frame_with_pose(stamp: int) -> None:
            for dt in (-50_000_000, 50_000_000):  # poses around the image stamp: it can be paired
                odom.publish(_odometry(stamp + dt, stamp / 1e9))
            client.spin_for(0.3)
            camera.publish(_image(stamp, rng))
            assert client.spin_until(lambda: any(stamp_ns(m) == stamp for _, m in matches), 30.0)

        for k in range(3):
            frame_with_pose(100 * 10**9 + k * 10**9)
        since = len(diagnostics)  # a status made after the third frame was processed
        assert client.spin_until(lambda: len(diagnostics) > since + 1, 10.0)
        values = diagnostic_values(diagnostics[-1][1])
        assert int(values["bad_poses"]) == 6  # (bad_poses_recent: those of the last diagnostics.window_s)
        assert int(values["keyframes_recorded"]) == 0 and int(values["frames_without_pose"]) == 3

        request = SetParameters.Request(parameters=[Parameter(name="pose.frame_id", value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value="odom"))])
        assert client.call(SetParameters, f"{NODE}/set_parameters", request).results[0].successful
        frame_with_pose(200 * 10**9)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    assert node.log.count("sends poses with an empty header.frame_id") == 1
    assert "set pose.frame_id to the frame they are in" in node.log
    kmap = load_map(map_path)  # autosaved at shutdown
    assert len(kmap) == 1 and kmap.frames == ["odom"] and kmap.positions[0, 0] == 200.0
