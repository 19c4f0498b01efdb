"""A real node with three cameras (front, rear, left), each with its own extrinsic (cameras.extrinsics, by image
frame_id): a keyframe recorded by the REAR camera (with an aligned depth image) is matched later by the FRONT and
the LEFT camera. The pose priors are the robot's true poses (not 180 or 90 degrees off, not metres off), the front
camera's camera_info is for twice the resolution of its images (scaled, not used as is), ~/loop_constraint carries
the robot's motion since the keyframe with a covariance, and a camera_info of another aspect ratio makes that
camera verify without intrinsics (keyframe prior, one log line)."""

from __future__ import annotations

import importlib.util
import math

import cv2
import numpy as np
from geometry_msgs.msg import PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rosutil import NodeProcess, RosClient, next_domain_id, stamp_ns
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64MultiArray

from dinomix_ros.localization.camera_pose import rpy_to_matrix
from dinomix_ros.localization.verification import rotation_angle_deg
from dinomix_ros.maps.sources.poses import quat_to_matrix
from dinomix_ros.ros.conversions import loop_constraint_from_msg, ns_to_time
from dinomix_ros.maps.loading import load_map

NODE = "/dinomix_localizer"
NS = 1_000_000_000
S0 = 1_700_000_000 * NS + 123_456_789
W, H = 640, 480
TOPICS = {"rear": "/rear/image_raw/compressed", "front": "/front/image_raw/compressed",
          "left": "/left/image_raw/compressed"}
# optical frames: (x, y, z, roll, pitch, yaw) in base_link; level cameras looking backwards, forwards, to the left
MOUNTS = {"rear": (-1.0, 0.0, 0.6, -math.pi / 2, 0.0, math.pi / 2),
          "front": (1.0, 0.0, 0.5, -math.pi / 2, 0.0, -math.pi / 2),
          "left": (0.2, 0.4, 0.7, -math.pi / 2, 0.0, 0.0)}


def _T(x: float, y: float, z: float, roll: float, pitch: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = rpy_to_matrix(roll, pitch, yaw), (x, y, z)
    return T


def _header(msg: object, stamp: int, frame: str) -> object:
    msg.header.stamp = ns_to_time(stamp)
    msg.header.frame_id = frame
    return msg


def _jpeg(rgb: np.ndarray, stamp: int, frame: str) -> CompressedImage:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return _header(CompressedImage(format="jpeg", data=buf.tobytes()), stamp, frame)


def _info(stamp: int, frame: str, width: int, height: int, f: float) -> CameraInfo:
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5,
                     k=[f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0])
    return _header(msg, stamp, frame)


def test_front_rear_and_side_cameras_each_in_their_place(tmp_path, data_dir) -> None:
    rgb = cv2.resize(cv2.cvtColor(cv2.imread(str(data_dir / "lund_gps" / "images" / "12.jpg")), cv2.COLOR_BGR2RGB),
                     (W, H), interpolation=cv2.INTER_AREA)
    f = 0.55 * W
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    d, tilt = 3.0, 0.4  # the photo as a textured plane 3 m in front of the rear camera
    n = np.array([math.sin(tilt), 0.0, math.cos(tilt)])
    u = np.arange(W)[None, :].repeat(H, axis=0)
    depth_mm = (1000 * d / (((u - W / 2) / f) * n[0] + n[2])).astype("<u2")
    R, t = rpy_to_matrix(0.02, 0.05, -0.04), np.array([0.3, 0.05, 0.4])  # query camera motion: X_q = R X_k + t
    view = cv2.warpPerspective(rgb, K @ (R + np.outer(t, n) / d) @ np.linalg.inv(K), (W, H))
    T_q_k = np.eye(4)
    T_q_k[:3, :3], T_q_k[:3, 3] = R, t

    domain = next_domain_id()
    extrinsics = [f"{name}_optical: " + " ".join(f"{v:.9f}" for v in m) for name, m in MOUNTS.items()]
    node = NodeProcess.localizer(tmp_path, domain, params={
        "model.random_weights": True, "map.path": str(tmp_path / "live.dinomap"), "map.create_if_missing": True,
        "pose.topic": "/odom", "recording.autostart": True, "cameras.topics": list(TOPICS.values()),
        "cameras.depth_topics": ["/rear/depth/image_raw", "", ""], "cameras.extrinsics": extrinsics,
        "matching.min_similarity": -1.0, "output.pose_prior_mode": "continuous"})
    client = RosClient(domain)
    try:
        matches = client.collect(PointCloud2, f"{NODE}/matches")
        priors = client.collect(PoseWithCovarianceStamped, f"{NODE}/pose_prior")
        constraints = client.collect(Float64MultiArray, f"{NODE}/loop_constraint")
        loops = client.collect(Float64MultiArray, f"{NODE}/loop_closure")
        images = {name: client.publisher(CompressedImage, topic) for name, topic in TOPICS.items()}
        infos = {name: client.publisher(CameraInfo, f"/{name}/camera_info") for name in TOPICS}
        depth = client.publisher(Image, "/rear/depth/image_raw")
        odom = client.publisher(Odometry, "/odom")
        assert node.wait_for_log("geometric verification on", timeout=90), node.log[-3000:]
        for pub in [*images.values(), *infos.values(), depth, odom]:
            client.wait_for_subscribers(pub)

        def publish_info(name: str, width: int, height: int, focal: float) -> None:
            infos[name].publish(_info(S0, f"{name}_optical", width, height, focal))
            assert node.wait_for_log(f"{TOPICS[name]}: intrinsics {width}x{height}", 30), node.log[-3000:]

        def answered(stamp: int) -> bool:
            return client.spin_until(lambda: any(stamp_ns(m) == stamp for _, m in matches), 60.0)

        publish_info("rear", W, H, f)
        publish_info("front", 2 * W, 2 * H, 2 * f)  # calibrated at full resolution, images binned/resized to half
        publish_info("left", W, H, f)
        for dt in (-50_000_000, 50_000_000):  # the robot stands at the odom origin while the rear camera records
            odom.publish(_header(Odometry(child_frame_id="base_link"), S0 + dt, "odom"))
        client.spin_for(0.5)
        depth.publish(_header(Image(height=H, width=W, encoding="16UC1", step=2 * W, data=depth_mm.tobytes()), S0,
                              "rear_optical"))
        client.spin_for(0.5)
        images["rear"].publish(_jpeg(rgb, S0, "rear_optical"))
        assert answered(S0), node.log[-3000:]
        s_front, s_left, s_unfit = S0 + 100 * NS, S0 + 110 * NS, S0 + 120 * NS
        images["front"].publish(_jpeg(view, s_front, "front_optical"))
        assert answered(s_front), node.log[-3000:]
        images["left"].publish(_jpeg(view, s_left, "left_optical"))
        assert answered(s_left), node.log[-3000:]
        publish_info("left", W, 360, f)  # a 16:9 camera_info for 4:3 images: not used
        images["left"].publish(_jpeg(view, s_unfit, "left_optical"))
        assert answered(s_unfit), node.log[-3000:]
        client.spin_until(lambda: len(priors) >= 3 and len(loops) >= 3 and len(constraints) >= 2, 10.0)
        # cameras.extrinsics applies at run time; a bad entry is refused with its reason and changes nothing
        bad = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=["rear_optical: 1 2"])
        result = client.call(SetParameters, f"{NODE}/set_parameters", SetParameters.Request(
            parameters=[Parameter(name="cameras.extrinsics", value=bad)])).results[0]
        assert not result.successful and "cameras.extrinsics: camera extrinsic 'rear_optical: 1 2'" in result.reason
    finally:
        client.close()
        assert node.stop() == 0, node.log[-3000:]

    log = node.log
    assert "extrinsic from cameras.extrinsics: position (-1.000, 0.000, 0.600)" in log  # the rear camera's
    # TF (cameras.base_frame base_link) is used where tf2_ros exists; these venvs have none (not on PyPI)
    assert ("tf2_ros cannot be imported" in log) == (importlib.util.find_spec("tf2_ros") is None)
    assert "intrinsics scaled by 0.5" in log and log.count("another aspect ratio") == 1
    by_stamp = {stamp_ns(m): m for _, m in priors}
    assert set(by_stamp) == {s_front, s_left, s_unfit}, sorted(by_stamp)
    T_rear = _T(*MOUNTS["rear"])
    for stamp, name in ((s_front, "front"), (s_left, "left")):
        truth = T_rear @ np.linalg.inv(T_q_k) @ np.linalg.inv(_T(*MOUNTS[name]))  # the keyframe robot at the origin
        pose = by_stamp[stamp].pose.pose
        p, o = pose.position, pose.orientation
        assert by_stamp[stamp].header.frame_id == "odom"
        assert np.linalg.norm(np.array([p.x, p.y, p.z]) - truth[:3, 3]) < 0.05, (name, p, truth[:3, 3])
        assert rotation_angle_deg(quat_to_matrix(np.array([o.x, o.y, o.z, o.w])) @ truth[:3, :3].T) < 1.0, name
        assert 0 < by_stamp[stamp].pose.covariance[0] < 0.2 ** 2  # metric, and never zero
        (c,) = [loop_constraint_from_msg(m) for _, m in constraints if
                loop_constraint_from_msg(m).query_stamp_ns == stamp]
        assert c.match_stamp_ns == S0 and c.metric and c.inliers >= 30
        assert np.linalg.norm(c.T[:3, 3] - truth[:3, 3]) < 0.05
        assert rotation_angle_deg(c.T[:3, :3] @ truth[:3, :3].T) < 1.0
        assert np.all(np.linalg.eigvalsh(c.covariance) > 0)
    # the camera_info that does not fit: verified without intrinsics, the keyframe's pose, no constraint
    unfit = by_stamp[s_unfit].pose.pose
    assert np.allclose([unfit.position.x, unfit.position.y, unfit.position.z], 0.0) and unfit.orientation.w == 1.0
    assert len(constraints) == 2 and len(loops) == 3  # LIO-SAM's [t_query, t_match] for every verified loop
    assert all(len(m.data) == 2 for _, m in loops)
    saved = load_map(tmp_path / "live.dinomap")  # autosaved at shutdown, with the rear camera's record
    assert saved.cameras.tolist() == [TOPICS["rear"]]
    record = saved.local_features.cameras[TOPICS["rear"]]
    assert record.frame_id == "rear_optical" and record.size == (W, H)
    np.testing.assert_allclose(record.T_base_cam, T_rear, atol=1e-8)
