"""The node with several cameras: waiting frames described in one forward pass, each published with its own stamp
and matched as if alone; the ONNX Runtime backend; per-stage timings in /diagnostics."""

from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rosutil import NodeProcess, RosClient, diagnostic_values, next_domain_id, stamp_ns
from sensor_msgs.msg import Image, PointCloud2

from dinomix_ros.localization.health import STAGES
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.ros.conversions import matches_to_array
from dinomix_ros.maps.storage import save_map

NODE = "/dinomix_localizer"
CAMERAS = ("/front/image_raw", "/rear/image_raw")
S = 10**9


def _frames() -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(4)
    return [(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), "rgb8"),
            (rng.integers(0, 255, (90, 200), dtype=np.uint8), "mono8")]


def _msg(image: np.ndarray, encoding: str, stamp_s: int) -> Image:
    h, w = image.shape[:2]
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=image.strides[0], data=image.tobytes())
    msg.header.stamp.sec = stamp_s
    return msg


def test_cameras_batched_onnxruntime_own_stamps_and_stage_diagnostics(tmp_path) -> None:
    frames = _frames()
    # torch, one image at a time, float32 like the node (the test's NodeProcess pins model.dtype)
    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    kmap = KeyframeMap.empty(encoder.fingerprint.to_dict())
    kmap.add(np.stack([encoder.describe_one(*f) for f in frames]), stamps_ns=np.array([1, 2]) * S, cameras="map",
             frame_ids="map", positions=np.array([[0.0, 0, 0], [5.0, 0, 0]]))
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "model.backend": "onnxruntime", "map.path": str(save_map(kmap, tmp_path / "m")),
        "cameras.topics": list(CAMERAS), "cameras.reliability": "reliable", "matching.min_similarity": -1.0,
        "diagnostics.period_s": 0.2})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        pubs = [client.publisher(Image, topic) for topic in CAMERAS]
        for pub in pubs:
            client.wait_for_subscribers(pub)
        expected, blockers = {}, set()
        for r in range(3):
            # A frame that keeps the worker busy (or is replaced before it is taken), then one frame per camera:
            # both wait together and go through the model as one batch.
            pubs[0].publish(_msg(*frames[1], 900 + r))
            blockers.add((900 + r) * S)
            for k, (pub, frame) in enumerate(zip(pubs, frames)):
                stamp = 100 * (k + 1) + r
                pub.publish(_msg(*frame, stamp))
                expected[stamp * S] = k
            assert client.spin_until(lambda: {stamp_ns(m) for _, m in matches} >= set(expected), 60.0), node.log
        client.spin_for(0.6)
        values = diagnostic_values(diagnostics[-1][1])
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    stamps = [stamp_ns(m) for _, m in matches]
    assert len(stamps) == len(set(stamps)) and set(stamps) <= set(expected) | blockers  # one result per frame
    for _, msg in matches:
        if stamp_ns(msg) in expected:  # each frame matched its own keyframe, as when described alone
            best = matches_to_array(msg)[0]
            assert best["keyframe_id"] == expected[stamp_ns(msg)] and best["similarity"] > 0.99999
    assert values["backend"] == "onnxruntime" and values["providers"] == "CPUExecutionProvider"
    assert values["dtype"] == "float32" and values["preprocess"] == "host"
    assert int(values["max_batch"]) == 2, node.log[-3000:]
    for stage in STAGES:
        assert float(values[f"stage_{stage}_p50_ms"]) >= 0.0
    assert float(values["stage_model_p50_ms"]) > 0.0 and float(values["stage_verify_p95_ms"]) == 0.0
    assert "with onnxruntime (CPUExecutionProvider) in float32" in node.log
