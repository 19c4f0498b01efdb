"""Camera models: undistortion against OpenCV's projection (pinhole and fisheye), camera_info YAML, topic naming."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dinomix_ros.imaging.camera import (
    CameraModel, CameraModelError, camera_from_info, camera_from_info_yaml, camera_info_topic, fit_to_image,
)

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


@pytest.mark.parametrize("K, model, D, message", [
    ([[1e308, 0, 256], [0, 1e308, 192], [0, 0, 1]], "equidistant", [1e308] * 4, "focal lengths"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 1]], "equidistant", [1e308, 0, 0, 0], "coefficient 0 .* beyond"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 1]], "plumb_bob", [0, 0, 5.0, 0, 0], "coefficient 2 .* beyond"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 1]], "rational_polynomial", [0] * 7 + [1e4], "coefficient 7"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 1]], "plumb_bob", [np.inf, 0, 0, 0, 0], "finite"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 1]], "plumb_bob", [np.nan, 0, 0, 0, 0], "finite"),
    ([[20, 0, 256], [0, 420, 192], [0, 0, 1]], "none", [], "focal lengths"),  # < 0.05 x 512
    ([[420, 0, 256], [0, 20000, 192], [0, 0, 1]], "none", [], "focal lengths"),  # > 20 x 512
    ([[-420, 0, 256], [0, 420, 192], [0, 0, 1]], "none", [], "fx, fy > 0"),
    ([[420, 0, 5000], [0, 420, 192], [0, 0, 1]], "none", [], "principal point"),
    ([[420, 0, 256], [0, 420, -900], [0, 0, 1]], "none", [], "principal point"),
    ([[420, 0, 256], [0, 420, 192], [1, 0, 1]], "none", [], "must be \\[\\[fx"),
    ([[420, 0, 256], [0, 420, 192], [0, 0, 2]], "none", [], "must be \\[\\[fx"),
    ([[420, 900, 256], [0, 420, 192], [0, 0, 1]], "none", [], "skew"),
    ([[np.nan, 0, 256], [0, 420, 192], [0, 0, 1]], "none", [], "finite"),
])
def test_intrinsics_outside_physical_bounds_are_refused_with_one_line(K, model, D, message) -> None:
    with pytest.raises(CameraModelError, match=message) as info:
        CameraModel(512, 384, np.array(K, dtype=float), model, np.array(D, dtype=float))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_image_sizes_are_bounded() -> None:
    with pytest.raises(CameraModelError, match="image size"):
        CameraModel(0, 384, K)
    with pytest.raises(CameraModelError, match="image size"):
        CameraModel(100000, 384, K)


def test_real_calibrations_are_within_the_bounds() -> None:
    CameraModel(848, 800, np.array([[285.7, 0, 418.9], [0, 285.8, 403.5], [0, 0, 1]]), "equidistant",
                np.array([-0.0079, 0.0441, -0.0413, 0.0079]))  # the T265's fisheye
    CameraModel(1280, 720, np.array([[640.0, 0, 640], [0, 640.0, 360], [0, 0, 1]]), "rational_polynomial",
                np.array([25.0, 12.0, 0.0, 0.0, 0.5, 25.3, 20.1, 3.2]))  # a wide lens' rational model


class _Roi:
    def __init__(self, x_offset=0, y_offset=0, width=0, height=0) -> None:
        self.x_offset, self.y_offset, self.width, self.height = x_offset, y_offset, width, height


class _Info:
    """The fields of a sensor_msgs/CameraInfo (rclpy and rosbags messages have the same names)."""

    def __init__(self, width=1280, height=960, binning_x=0, binning_y=0, roi=None, k=None) -> None:
        self.width, self.height, self.binning_x, self.binning_y = width, height, binning_x, binning_y
        self.roi = roi or _Roi()
        self.k = k if k is not None else [840.0, 0.0, 639.5, 0.0, 830.0, 479.5, 0.0, 0.0, 1.0]
        self.d = [-0.1, 0.01, 0.0, 0.0, 0.0]
        self.distortion_model = "plumb_bob"


def test_camera_info_binning_and_roi_give_the_images_intrinsics() -> None:
    full = camera_from_info(_Info())
    assert (full.width, full.height) == (1280, 960)
    binned = camera_from_info(_Info(binning_x=2, binning_y=2))
    assert (binned.width, binned.height) == (640, 480) and binned == full.scaled_to(640, 480)
    np.testing.assert_allclose(binned.K, [[420.0, 0, 319.5], [0, 415.0, 239.5], [0, 0, 1]])  # centre stays centre
    roi = camera_from_info(_Info(roi=_Roi(100, 60, 800, 600)))
    assert (roi.width, roi.height) == (800, 600) and (roi.K[0, 2], roi.K[1, 2]) == (539.5, 419.5)
    both = camera_from_info(_Info(roi=_Roi(100, 60, 800, 600), binning_x=4, binning_y=4))
    assert (both.width, both.height) == (200, 150)
    # a pixel seen in the full image and in the binned ROI image lies on the same ray
    ray = full.normalized(np.array([[700.0, 500.0]]))
    np.testing.assert_allclose(both.normalized(np.array([[(700.0 - 100 + 0.5) / 4 - 0.5, (500.0 - 60 + 0.5) / 4
                                                          - 0.5]])), ray, atol=1e-6)
    with pytest.raises(CameraModelError, match="roi"):
        camera_from_info(_Info(roi=_Roi(1000, 0, 800, 600)))
    with pytest.raises(CameraModelError, match="binning"):
        camera_from_info(_Info(binning_x=5000))
    with pytest.raises(CameraModelError, match="fx, fy > 0"):
        camera_from_info(_Info(k=[0.0] * 9))


def test_fit_to_image_scales_resized_images_and_refuses_other_aspect_ratios() -> None:
    info = CameraModel(1280, 960, np.array([[840.0, 0, 639.5], [0, 840.0, 479.5], [0, 0, 1]]))
    same, how = fit_to_image(info, 1280, 960)
    assert how == "same" and same is info
    half, how = fit_to_image(info, 640, 480)
    assert how == "scaled" and half == info.scaled_to(640, 480)
    odd, how = fit_to_image(info, 333, 250)  # rounding of a resize: within the tolerance
    assert how == "scaled" and (odd.width, odd.height) == (333, 250)
    for w, h in ((640, 360), (1280, 720), (960, 960)):
        model, how = fit_to_image(info, w, h)
        assert model is None and how == "mismatch"
