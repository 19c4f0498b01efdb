"""A map whose chunk is damaged where loading does not read (map.verify: background): the node goes active, its
background check refuses the map, and from then on the node makes no claims from it but keeps running."""

from __future__ import annotations

import json

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, stamp_ns
from sensor_msgs.msg import Image, PointCloud2
from std_srvs.srv import Trigger

from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.storage import save_map
from dinomix_ros.model import random_model

NODE = "/dinomix_localizer"


def _damaged_map(path):
    fingerprint = random_model("vits14", seed=0).fingerprint.to_dict()
    kmap = KeyframeMap.empty(fingerprint)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 4096)).astype(np.float32)
    kmap.add(x / np.linalg.norm(x, axis=1, keepdims=True), stamps_ns=np.arange(2000) * 10**8, cameras="cam",
             frame_ids="map", positions=rng.uniform(-50, 50, (2000, 3)))
    save_map(kmap, path)
    chunk = path / json.loads((path / "manifest.json").read_text())["files"]["descriptors"][0]["file"]
    with open(chunk, "r+b") as f:  # one byte of the last row: sizes and headers are intact
        f.seek(-3, 2)
        f.write(b"\x55")
    return path


def test_a_background_check_failure_stops_matching_not_the_node(tmp_path) -> None:
    domain = next_domain_id()
    map_path = _damaged_map(tmp_path / "city.dinomap")
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "matching.min_similarity": -1.0,
        "verification.enabled": False, "cameras.reliability": "reliable", "diagnostics.period_s": 0.5})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        camera = client.publisher(Image, "/camera/image_raw")
        assert node.wait_for_log("active: cameras", timeout=180), node.log[-3000:]
        assert node.wait_for_log("integrity check FAILED: descriptors.g000001.npy is corrupted or truncated (sha256",
                                 timeout=120), node.log[-3000:]

        def failed_status() -> bool:
            return any(s.level == b"\x02" and s.message.startswith("map damaged, not matching against it")
                       for _, arr in diagnostics for s in arr.status)

        assert client.spin_until(failed_status, 30), [s.message for _, a in diagnostics for s in a.status][-3:]
        failed = next(arr for _, arr in reversed(diagnostics) if arr.status[0].level == b"\x02")
        assert diagnostic_values(failed)["map_check"].startswith("FAILED: descriptors.g000001.npy is corrupted")
        client.wait_for_subscribers(camera)
        frame = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        for i in range(3):
            msg = Image(height=240, width=320, encoding="bgr8", is_bigendian=0, step=960, data=frame.tobytes())
            msg.header.stamp.sec, msg.header.stamp.nanosec = 100 + i, 0
            camera.publish(msg)
            assert client.spin_until(lambda: any(stamp_ns(m) == (100 + i) * 10**9 for _, m in matches), 60), \
                node.log[-2000:]
        assert all(m.width == 0 for _, m in matches)  # no candidates from a damaged map ...
        assert not priors  # ... so no pose prior, although every similarity would be accepted
        reply = client.call(Trigger, f"{NODE}/stop_recording")  # services still answer; the node is alive
        assert reply.success and node.alive
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
