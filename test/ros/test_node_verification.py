"""A real node verifies its candidates: an offline map of the corridor's first pass (local features + intrinsics),
then the second pass replayed with its camera_info: ~/matches carries inliers and verified scores (the last two
fields), loop closures and pose priors come only from verified matches, priors are rotation-corrected, and
/diagnostics reports the verification."""

from __future__ import annotations

import math

import cv2
import numpy as np
from bagfactory import STAMP0_NS, TYPESTORE, BagMessage, Motion, header, write_camera_bag
from corridorbags import NS, camera_infos, corridor_frames
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rosutil import NodeProcess, RosClient, next_domain_id, replay_bag, stamp_ns
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64MultiArray

from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth
from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.ros.conversions import MATCH_FIELDS, diagnostic_values, matches_to_array
from dinomix_ros.maps.storage import save_map

NODE = "/dinomix_localizer"
CAMERA = "/camera/image_raw/compressed"


def _verified_and_rejected(msg: DiagnosticArray) -> int:
    values = diagnostic_values(msg)
    return int(values.get("verified_matches", 0)) + int(values.get("verification_rejected", 0))


def test_verified_loop_closures_priors_and_matches_fields(tmp_path, data_dir) -> None:
    first = write_camera_bag(tmp_path / "first", frames=corridor_frames(range(1, 41)), image_rate_hz=5.0,
                             image_topics=(CAMERA,), image_format="jpeg", extra_messages=camera_infos(STAMP0_NS, 40))
    encoder = Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32"))
    gate = KeyframeGateConfig(min_distance_m=0.1, min_rotation_deg=0.0)
    kmap, _ = build_map_from_bag(first.path, encoder, BagMapConfig(image_topics=(CAMERA,), pose_topic="/odom",
                                                                   gate=gate), progress=False,
                                 features=FeatureConfig())
    assert len(kmap) == 40 and set(kmap.local_features.intrinsics) == {CAMERA}
    map_path = save_map(kmap, tmp_path / "corridor.dinomap")
    start2 = STAMP0_NS + 1000 * NS
    second = write_camera_bag(tmp_path / "second", frames=corridor_frames(range(41, 81)), image_rate_hz=5.0,
                              image_topics=(CAMERA,), image_format="jpeg", motion=Motion(start_ns=start2),
                              pose_kind=None, extra_messages=camera_infos(start2, 40))

    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(map_path), "cameras.topics": [CAMERA],
        "output.loop_closure_scope": "all", "diagnostics.period_s": 0.5, "output.pose_prior_mode": "continuous"})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        loops = client.collect(Float64MultiArray, f"{NODE}/loop_closure")
        diagnostics = client.collect(DiagnosticArray, "/diagnostics")
        assert node.wait_for_log("geometric verification on", timeout=60), node.log
        replay_bag(client, second.path,
                   after_image=lambda _t, s: lambda: any(stamp_ns(m) == s for _, m in matches))
        client.spin_until(lambda: any(_verified_and_rejected(m) == 40 for _, m in diagnostics), 10.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]

    assert [name for name, _ in MATCH_FIELDS[-2:]] == ["inliers", "verified_score"]
    received = {stamp_ns(m): matches_to_array(m) for _, m in matches}
    assert len(received) == 40
    accepted = {s: c for s, c in received.items() if c[0]["accepted"] == 1}
    for cands in received.values():
        best = cands[0]
        assert np.isfinite(best["verified_score"])  # the best is always a verified candidate
        if best["accepted"]:
            assert best["inliers"] >= 30
    assert 20 <= len(accepted) < 40, "verification rejects some revisits and accepts most"
    # loop closures and priors only for the verified, accepted frames
    loop_queries = {round(m.data[0] * 1e9) for _, m in loops}
    assert {min(accepted, key=lambda s: abs(s - q)) for q in loop_queries} == set(accepted)
    assert len(loops) == len(accepted) and len(priors) == len(accepted)
    # and they are right: the matched keyframe is a true loop of the query (RTAB-Map's ground truth)
    gt = load_loop_closure_ground_truth(data_dir / "rtabmap_corridor" / "samples_GT.bmp")
    kf_row = {int(s): i for i, s in enumerate(first.image_stamps_ns)}
    query_row = {int(s): 40 + i for i, s in enumerate(second.image_stamps_ns)}
    correct = 0
    for stamp, cands in accepted.items():
        best_stamp = int(cands[0]["stamp_sec"]) * NS + int(cands[0]["stamp_nanosec"])
        correct += bool(gt[query_row[stamp], kf_row[best_stamp]])
    assert correct / len(accepted) >= 0.9, (correct, len(accepted))
    # with intrinsics and no depth: orientation corrected, the keyframe's position with no_depth_sigma_m (1 m)
    rotation_priors = [m for _, m in priors if math.isclose(m.pose.covariance[0], 1.0)]
    assert len(rotation_priors) >= len(priors) // 2
    values = diagnostic_values(diagnostics[-1][1])  # after every frame (waited for above)
    assert values["verification"] == "on"
    assert int(values["verified_matches"]) >= len(accepted)  # verified; a few fail another rule (min_similarity)
    assert int(values["verified_matches"]) + int(values["verification_rejected"]) == 40
    assert float(values["verification_p50_ms"]) > 0 and float(values["verification_p95_ms"]) > 0


def _depth_image(stamp_ns: int, depth_mm: np.ndarray) -> object:
    T = TYPESTORE.types
    h, w = depth_mm.shape
    return T["sensor_msgs/msg/Image"](header=header(stamp_ns, "camera_optical_frame"), height=h, width=w,
                                      encoding="16UC1", is_bigendian=0, step=w * 2,
                                      data=np.frombuffer(depth_mm.astype("<u2").tobytes(), np.uint8))


def test_aligned_depth_makes_the_prior_metric(tmp_path, data_dir) -> None:
    """Live recording with an aligned depth topic (a photo as a textured plane 3 m away), then the camera moves by
    a known motion (the photo warped by it): the node's prior is the robot's new pose, metric."""
    from dinomix_ros.localization.camera_pose import CameraMountConfig, rpy_to_matrix
    from dinomix_ros.localization.verification import rotation_angle_deg
    from dinomix_ros.maps.sources.poses import quat_to_matrix

    rgb = cv2.cvtColor(cv2.imread(str(data_dir / "lund_gps" / "images" / "12.jpg")), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    f = 0.55 * w
    Kmat = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    d, tilt = 3.0, 0.4
    n = np.array([math.sin(tilt), 0.0, math.cos(tilt)])
    R, t = rpy_to_matrix(0.01, 0.04, -0.03), np.array([0.5, 0.1, 0.4])  # camera motion: X_q = R X_k + t
    query = cv2.warpPerspective(rgb, Kmat @ (R + np.outer(t, n) / d) @ np.linalg.inv(Kmat), (w, h))
    u = np.arange(w)[None, :].repeat(h, axis=0)
    depth_mm = (1000 * d / (((u - w / 2) / f) * n[0] + n[2])).astype(np.uint16)
    k = [f, 0.0, w / 2, 0.0, f, h / 2, 0.0, 0.0, 1.0]

    def info(stamp: int) -> BagMessage:
        T = TYPESTORE.types
        msg = T["sensor_msgs/msg/CameraInfo"](
            header=header(stamp, "camera_optical_frame"), height=h, width=w, distortion_model="plumb_bob",
            d=np.zeros(5), k=np.array(k), r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
            roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        return BagMessage("/camera/camera_info", "sensor_msgs/msg/CameraInfo", stamp - 2_000_000, msg)

    record = write_camera_bag(tmp_path / "record", frames=[rgb], image_topics=(CAMERA,), image_format="jpeg",
                              extra_messages=[info(STAMP0_NS), BagMessage(
                                  "/camera/depth/image_raw", "sensor_msgs/msg/Image", STAMP0_NS - 1_000_000,
                                  _depth_image(STAMP0_NS, depth_mm))])
    later = STAMP0_NS + 100 * NS
    revisit = write_camera_bag(tmp_path / "revisit", frames=[query], image_topics=(CAMERA,), image_format="jpeg",
                               motion=Motion(start_ns=later), pose_kind=None, extra_messages=[info(later)])
    domain = next_domain_id()
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(tmp_path / "live.dinomap"), "map.create_if_missing": True,
        "pose.topic": "/odom", "recording.autostart": True, "cameras.topics": [CAMERA],
        "cameras.depth_topics": ["/camera/depth/image_raw"], "matching.min_similarity": -1.0,
        "output.pose_prior_mode": "continuous"})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        assert node.wait_for_log("geometric verification on", timeout=60), node.log

        def answered(topic: str, stamp: int):  # the depth image is an Image too: no answer to wait for
            return lambda: topic != CAMERA or any(stamp_ns(m) == stamp for _, m in matches)

        replay_bag(client, record.path, after_image=answered)
        replay_bag(client, revisit.path, after_image=answered)
        client.spin_until(lambda: len(priors) >= 1, 10.0)
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]
    (_, prior), = priors
    assert stamp_ns(prior) == later and prior.header.frame_id == "odom"
    T_base_cam = CameraMountConfig().matrix()
    T_q_k = np.eye(4)
    T_q_k[:3, :3], T_q_k[:3, 3] = R, t
    expected = T_base_cam @ np.linalg.inv(T_q_k) @ np.linalg.inv(T_base_cam)  # the keyframe is at the odom origin
    p, o = prior.pose.pose.position, prior.pose.pose.orientation
    assert np.linalg.norm(np.array([p.x, p.y, p.z]) - expected[:3, 3]) < 0.05 * np.linalg.norm(t)
    assert rotation_angle_deg(quat_to_matrix(np.array([o.x, o.y, o.z, o.w])) @ expected[:3, :3].T) < 1.0
    assert prior.pose.covariance[0] < 0.2 ** 2  # metric: a few cm (without depth it would be 1 m^2)
