"""Camera models: undistortion against OpenCV's projection (pinhole and fisheye), camera_info YAML, topic naming."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dinomix_ros.imaging.camera import CameraModel, CameraModelError, camera_from_info_yaml, camera_info_topic

K = np.array([[420.0, 0.0, 256.0], [0.0, 415.0, 190.0], [0.0, 0.0, 1.0]])


def _rays(rng: np.random.Generator, n: int, half_fov: float) -> np.ndarray:
    """(n, 2) normalized coordinates of rays within ``half_fov`` radians of the optical axis."""
    theta = rng.uniform(0, half_fov, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    return np.stack([np.tan(theta) * np.cos(phi), np.tan(theta) * np.sin(phi)], axis=1)


@pytest.mark.parametrize("model, D", [
    ("plumb_bob", [-0.28, 0.09, 0.001, -0.0005, -0.01]),
    ("rational_polynomial", [0.5, -0.1, 0.001, 0.0, 0.02, 0.8, -0.05, 0.03]),
    ("none", []),
])
def test_pinhole_undistortion_inverts_opencv_projection(model, D, rng) -> None:
    cam = CameraModel(512, 384, K, model, np.array(D))
    x = _rays(rng, 200, 0.5)
    pix, _ = cv2.projectPoints(np.c_[x, np.ones(len(x))], np.zeros(3), np.zeros(3), K, np.array(D, float))
    np.testing.assert_allclose(cam.normalized(pix.reshape(-1, 2)), x, atol=1e-4)


@pytest.mark.parametrize("model", ["equidistant", "fisheye", "kannala_brandt"])
def test_fisheye_undistortion_inverts_opencv_fisheye_projection(model, rng) -> None:
    D = np.array([-0.0079, 0.0441, -0.0413, 0.0079])  # the T265's fisheye1 (test/data kapture export)
    cam = CameraModel(848, 800, np.array([[285.7, 0, 418.9], [0, 285.8, 403.5], [0, 0, 1]]), model, D)
    assert cam.fisheye
    x = _rays(rng, 200, 1.2)  # 69 degrees off axis: beyond what a pinhole model can hold
    pix, _ = cv2.fisheye.projectPoints(np.c_[x, np.ones(len(x))][:, None], np.zeros(3), np.zeros(3), cam.K, D)
    np.testing.assert_allclose(cam.normalized(pix.reshape(-1, 2)), x, rtol=1e-4, atol=1e-4)


def test_round_trip_scaling_and_refusals() -> None:
    cam = CameraModel(512, 384, K, "plumb_bob", np.zeros(5))
    assert CameraModel.from_dict(cam.to_dict()) == cam
    half = cam.scaled_to(256, 192)
    np.testing.assert_allclose(half.K, [[210.0, 0, 127.75], [0, 207.5, 94.75], [0, 0, 1]])  # pixel centres
    with pytest.raises(CameraModelError, match="fx, fy > 0"):
        CameraModel(512, 384, np.zeros(9))  # what an uncalibrated driver publishes
    with pytest.raises(CameraModelError, match="not supported"):
        CameraModel(512, 384, K, "double_sphere", np.zeros(6))
    with pytest.raises(CameraModelError, match="takes 4 coefficients"):
        CameraModel(512, 384, K, "equidistant", np.zeros(5))
    with pytest.raises(CameraModelError, match="intrinsics"):
        CameraModel.from_dict({"width": 5})


def test_reads_a_ros_camera_info_yaml(tmp_path) -> None:
    path = tmp_path / "ost.yaml"
    path.write_text("""image_width: 640
image_height: 480
camera_name: narrow_stereo
camera_matrix:
  rows: 3
  cols: 3
  data: [500.1, 0.0, 320.5, 0.0, 501.2, 240.5, 0.0, 0.0, 1.0]
distortion_model: plumb_bob
distortion_coefficients:
  rows: 1
  cols: 5
  data: [-0.1, 0.01, 0.0, 0.0, 0.0]
rectification_matrix: {rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}
projection_matrix: {rows: 3, cols: 4, data: [500, 0, 320, 0, 0, 500, 240, 0, 0, 0, 1, 0]}
""")
    cam = camera_from_info_yaml(path)
    assert (cam.width, cam.height, cam.distortion_model) == (640, 480, "plumb_bob")
    assert cam.K[0, 0] == 500.1 and cam.K[1, 2] == 240.5 and cam.D.tolist() == [-0.1, 0.01, 0.0, 0.0, 0.0]
    (tmp_path / "bad.yaml").write_text("image_width: 640\n")
    with pytest.raises(CameraModelError, match="not a ROS camera_info YAML"):
        camera_from_info_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        camera_from_info_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("image, info", [
    ("/cam/image_raw", "/cam/camera_info"),
    ("/cam/image_raw/compressed", "/cam/camera_info"),
    ("/robot/front/color/image_rect", "/robot/front/color/camera_info"),
    ("/image", "/camera_info"),
    ("image_raw", "camera_info"),
])
def test_camera_info_topic_follows_image_transport(image, info) -> None:
    assert camera_info_topic(image) == info
