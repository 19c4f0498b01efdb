"""Camera intrinsics and lens distortion: what turns pixel keypoints into rays (ROS-free).

:class:`CameraModel` holds what a ROS ``sensor_msgs/CameraInfo`` says about a camera: image size, the 3x3 matrix K
and the distortion model with its coefficients. The models ROS drivers publish are supported: ``plumb_bob`` and
``rational_polynomial`` (OpenCV's radial-tangential model, 4 to 14 coefficients), ``equidistant`` /
``fisheye`` (OpenCV's fisheye model, 4 coefficients: Kannala-Brandt as the T265 and ROS' camera_calibration write
it) and no distortion (``none`` or all-zero coefficients). :meth:`CameraModel.normalized` undistorts keypoints into
normalized image coordinates (``x / z``, ``y / z`` of the ray), which is what the essential matrix and PnP take.

Sources: :func:`camera_from_info_yaml` reads the YAML that ``camera_calibration`` writes (and
``camera_info_manager`` loads); :func:`camera_from_info` reads a ``sensor_msgs/CameraInfo`` (an rclpy or a rosbags
message: the node and the bag readers use it), applying its ROI and binning; maps store them per camera as JSON
(:meth:`CameraModel.to_dict` / :meth:`CameraModel.from_dict`).

Intrinsics are untrusted input (a driver's camera_info, a map from another robot): every :class:`CameraModel` is
bounded to physically meaningful values (focal lengths within :data:`FOCAL_RANGE` x the larger image side, the
principal point inside the image or at most one image size beyond its edges (a ROI's may lie outside it),
distortion coefficients per model within :data:`DISTORTION_BOUNDS`, a plain upper-triangular K), and refused with
one line otherwise. :func:`fit_to_image` says whether a camera_info fits the images its camera sends:
the same size, or a resized image of the same aspect ratio (K scaled), else not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["CameraModelError", "CameraModel", "camera_from_info_yaml", "camera_from_info", "camera_info_topic",
           "fit_to_image", "DISTORTION_MODELS", "DISTORTION_BOUNDS", "FOCAL_RANGE", "MAX_IMAGE_SIDE",
           "ASPECT_TOLERANCE"]

#: ROS distortion model names -> the OpenCV family that undistorts them.
DISTORTION_MODELS = {"plumb_bob": "pinhole", "rational_polynomial": "pinhole", "none": "pinhole",
                     "equidistant": "fisheye", "fisheye": "fisheye", "kannala_brandt": "fisheye"}
#: Largest |coefficient| per position, per family: OpenCV's order k1 k2 p1 p2 k3 k4 k5 k6 s1 s2 s3 s4 tauX tauY
#: (pinhole: radial k up to 1000 (rational models of wide lenses reach tens), tangential p and thin-prism s up to 1,
#: the sensor tilt tau up to 1 rad), and k1..k4 of the fisheye (Kannala-Brandt) model up to 100 (calibrations give
#: |k| < 1). Beyond these no lens is described: 1e308 is a damaged or hostile file.
DISTORTION_BOUNDS = {"pinhole": (1e3, 1e3, 1.0, 1.0, 1e3, 1e3, 1e3, 1e3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
                     "fisheye": (100.0, 100.0, 100.0, 100.0)}
#: Focal lengths (fx, fy) must lie within this range times the larger image side (0.05: a 169-degree pinhole field of
#: view on that side; 20: 2.9 degrees).
FOCAL_RANGE = (0.05, 20.0)
#: Largest image side a camera model (and a map's keypoints: uint16 quarter pixels) can describe.
MAX_IMAGE_SIDE = 16384
#: A camera_info of another size fits an image when the two scale factors (width, height) differ by at most this
#: fraction (a resized image keeps its aspect ratio up to rounding; a crop or ROI does not).
ASPECT_TOLERANCE = 0.01


class CameraModelError(ValueError):
    """Intrinsics that cannot describe a camera (bad K, unknown distortion model, wrong coefficient count)."""


@dataclass(frozen=True, eq=False)
class CameraModel:
    """A calibrated camera: image size, K and distortion (``sensor_msgs/CameraInfo`` semantics).

    Attributes:
        width: image width in pixels.
        height: image height in pixels.
        K: (3, 3) float64 camera matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
        distortion_model: a ROS model name (:data:`DISTORTION_MODELS`).
        D: (n,) float64 distortion coefficients in the model's order.
    """

    width: int
    height: int
    K: np.ndarray
    distortion_model: str = "none"
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64).reshape(-1)
        if K.shape != (9,) or not np.isfinite(K).all() or K[0] <= 0 or K[4] <= 0:
            raise CameraModelError(f"K must be 9 finite numbers with fx, fy > 0 (row-major 3x3), got "
                                   f"{_short(self.K)}; is the camera calibrated? (an all-zero K means it is not)")
        if not (1 <= int(self.width) <= MAX_IMAGE_SIDE and 1 <= int(self.height) <= MAX_IMAGE_SIDE):
            raise CameraModelError(f"image size {self.width}x{self.height} must be positive and at most "
                                   f"{MAX_IMAGE_SIDE} pixels a side")
        _check_k(K, int(self.width), int(self.height))
        model = str(self.distortion_model).lower() or "none"
        if model not in DISTORTION_MODELS:
            raise CameraModelError(f"distortion model {self.distortion_model!r} is not supported; expected one of "
                                   f"{', '.join(DISTORTION_MODELS)}")
        D = np.asarray(self.D, dtype=np.float64).reshape(-1)
        if not np.isfinite(D).all():
            raise CameraModelError(f"distortion coefficients must be finite, got {_short(D.tolist())}")
        family = DISTORTION_MODELS[model]
        if family == "fisheye" and D.size != 4:
            raise CameraModelError(f"the {model} model takes 4 coefficients (k1..k4), got {D.size}")
        if family == "pinhole" and D.size not in (0, 4, 5, 8, 12, 14):
            raise CameraModelError(f"the {model} model takes 0, 4, 5, 8, 12 or 14 coefficients, got {D.size}")
        bounds = np.asarray(DISTORTION_BOUNDS[family][:D.size])
        if (np.abs(D) > bounds).any():
            i = int(np.argmax(np.abs(D) > bounds))
            raise CameraModelError(f"distortion coefficient {i} of the {model} model is {D[i]:g}, beyond "
                                   f"+-{bounds[i]:g}: no lens is described by that (damaged or hostile calibration)")
        object.__setattr__(self, "K", K.reshape(3, 3))
        object.__setattr__(self, "D", D)
        object.__setattr__(self, "distortion_model", model)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @property
    def fisheye(self) -> bool:
        return DISTORTION_MODELS[self.distortion_model] == "fisheye"

    @property
    def focal(self) -> float:
        """Mean focal length in pixels (turns pixel thresholds into normalized ones)."""
        return float(0.5 * (self.K[0, 0] + self.K[1, 1]))

    def normalized(self, points: np.ndarray) -> np.ndarray:
        """Undistorted normalized image coordinates of pixel ``points``.

        Args:
            points: (N, 2) pixel coordinates in this camera's images.

        Returns:
            (N, 2) float64 ``(x/z, y/z)`` of each point's ray (distortion removed).
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 1, 2)
        if pts.shape[0] == 0:
            return np.zeros((0, 2))
        if self.fisheye:
            out = cv2.fisheye.undistortPoints(pts, self.K, self.D)
        elif self.D.size and np.any(self.D):
            out = cv2.undistortPoints(pts, self.K, self.D)
        else:  # pinhole without distortion: exact, no iteration
            out = (pts - self.K[:2, 2]) / np.array([self.K[0, 0], self.K[1, 1]])
        return np.asarray(out, dtype=np.float64).reshape(-1, 2)

    def scaled_to(self, width: int, height: int) -> CameraModel:
        """This camera for images resized (or binned) to ``width`` x ``height``: K scales, distortion does not.

        Pixel centres map as ``x' = (x + 0.5) s - 0.5`` (what a resize or an averaging binning does to them, and how
        :mod:`~dinomix_ros.imaging.features` maps keypoints), so the principal point moves by that rule.
        """
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[0, 1] *= sx
        K[1, 1] *= sy
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return CameraModel(width, height, K, self.distortion_model, self.D)

    def cropped(self, x_offset: int, y_offset: int, width: int, height: int) -> CameraModel:
        """This camera for the region of interest ``width`` x ``height`` at ``(x_offset, y_offset)`` of its images."""
        K = self.K.copy()
        K[0, 2] -= x_offset
        K[1, 2] -= y_offset
        return CameraModel(width, height, K, self.distortion_model, self.D)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what maps store per camera)."""
        return {"width": self.width, "height": self.height, "K": [float(v) for v in self.K.reshape(-1)],
                "distortion_model": self.distortion_model, "D": [float(v) for v in self.D]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CameraModel:
        """Inverse of :meth:`to_dict`.

        Raises:
            CameraModelError: a key is missing or a value does not describe a camera.
        """
        try:
            return cls(int(data["width"]), int(data["height"]), np.asarray(data["K"], dtype=np.float64),
                       str(data.get("distortion_model", "none")), np.asarray(data.get("D", []), dtype=np.float64))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CameraModelError):
                raise
            raise CameraModelError(f"intrinsics {data!r} are not width/height/K/distortion_model/D: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CameraModel) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.width, self.height, tuple(self.K.reshape(-1)), self.distortion_model, tuple(self.D)))


def camera_from_info_yaml(path: str | Path) -> CameraModel:
    """Read a ROS camera_info YAML file (as ``camera_calibration`` writes it).

    Args:
        path: the YAML file (keys ``image_width``, ``image_height``, ``camera_matrix.data``, ``distortion_model``,
            ``distortion_coefficients.data``).

    Raises:
        FileNotFoundError: no such file.
        CameraModelError: not a camera_info YAML, or intrinsics that do not describe a camera.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"camera calibration {path} does not exist; expected a ROS camera_info YAML "
                                "(camera_calibration's ost.yaml)")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
        K = data["camera_matrix"]["data"]
        D = (data.get("distortion_coefficients") or {}).get("data") or []
        return CameraModel(int(data["image_width"]), int(data["image_height"]), np.asarray(K, dtype=np.float64),
                           str(data.get("distortion_model") or "none"), np.asarray(D, dtype=np.float64))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CameraModelError):
            raise CameraModelError(f"{path}: {exc}") from None
        raise CameraModelError(f"{path} is not a ROS camera_info YAML (image_width, image_height, camera_matrix, "
                               f"distortion_model, distortion_coefficients): {exc}") from None


def _short(value: object, limit: int = 120) -> str:
    """One line of at most ``limit`` characters showing ``value`` (arrays as lists)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_k(K: np.ndarray, width: int, height: int) -> None:
    """Refuse a K (9 finite numbers, fx, fy > 0) that no camera of this image size has (see the module docstring)."""
    side = max(width, height)
    lo, hi = FOCAL_RANGE[0] * side, FOCAL_RANGE[1] * side
    fx, skew, cx, fy, cy = K[0], K[1], K[2], K[4], K[5]
    if K[3] != 0 or K[6] != 0 or K[7] != 0 or K[8] != 1:
        raise CameraModelError(f"K must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {_short(K.tolist())}")
    if not (lo <= fx <= hi and lo <= fy <= hi):
        raise CameraModelError(f"focal lengths fx {fx:g}, fy {fy:g} px are outside {lo:g}..{hi:g} ({FOCAL_RANGE[0]:g} "
                               f"to {FOCAL_RANGE[1]:g} x the larger side of {width}x{height} images): not this "
                               "camera's calibration")
    if abs(skew) > fx:
        raise CameraModelError(f"skew {skew:g} is larger than fx {fx:g}: not a camera matrix")
    if not (-width <= cx <= 2 * width and -height <= cy <= 2 * height):
        raise CameraModelError(f"principal point ({cx:g}, {cy:g}) lies far outside the {width}x{height} image (more "
                               "than one image size beyond its edges)")


def camera_from_info(msg: object) -> CameraModel:
    """The intrinsics of the images a ``sensor_msgs/CameraInfo`` describes (an rclpy or a rosbags message).

    ``K``, ``width`` and ``height`` are the full sensor's calibration; ``roi`` (all zero: the full image) and
    ``binning_x`` / ``binning_y`` (0 or 1: none) say which part of it, binned how, the images hold (the message's
    definition): the model returned is for those images, ``roi.width / binning_x`` x ``roi.height / binning_y``
    pixels (image_geometry's PinholeCameraModel applies the same two steps; here pixel centres are kept exact when
    binning, see :meth:`CameraModel.scaled_to`).

    Raises:
        CameraModelError: an uncalibrated camera (K all zero), an unsupported model, values outside the bounds, or
            a ROI outside the sensor.
    """
    try:
        width, height = int(msg.width), int(msg.height)
        bx, by = int(msg.binning_x) or 1, int(msg.binning_y) or 1
        roi = msg.roi
        x0, y0, rw, rh = int(roi.x_offset), int(roi.y_offset), int(roi.width), int(roi.height)
        full = CameraModel(width, height, np.asarray(msg.k, dtype=np.float64), str(msg.distortion_model or "none"),
                           np.asarray(msg.d, dtype=np.float64))
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CameraModelError):
            raise
        raise CameraModelError(f"not a sensor_msgs/CameraInfo: {exc}") from None
    if (x0, y0, rw, rh) == (0, 0, 0, 0):
        rw, rh = width, height
    if rw < 1 or rh < 1 or x0 + rw > width or y0 + rh > height:
        raise CameraModelError(f"roi {rw}x{rh} at ({x0}, {y0}) does not lie inside the {width}x{height} sensor")
    if not (1 <= bx <= rw and 1 <= by <= rh):
        raise CameraModelError(f"binning {bx}x{by} cannot bin a {rw}x{rh} image")
    model = full if (x0, y0, rw, rh) == (0, 0, width, height) else full.cropped(x0, y0, rw, rh)
    return model if (bx, by) == (1, 1) else model.scaled_to(rw // bx, rh // by)


def fit_to_image(model: CameraModel, width: int, height: int) -> tuple[CameraModel | None, str]:
    """``model`` for images of ``width`` x ``height``, and how it was made.

    Returns:
        (model, how): how is "same" (the camera_info's size), "scaled" (a resized image of the same aspect ratio,
        within :data:`ASPECT_TOLERANCE`: K scaled), or "mismatch" (a crop, ROI or another camera's info: model None,
        the frames verify without intrinsics).
    """
    if (width, height) == (model.width, model.height):
        return model, "same"
    sx, sy = width / model.width, height / model.height
    if abs(sx - sy) <= ASPECT_TOLERANCE * max(sx, sy):
        try:
            return model.scaled_to(width, height), "scaled"
        except CameraModelError:  # a scale that leaves no meaningful camera (e.g. a 1-pixel image)
            return None, "mismatch"
    return None, "mismatch"


def camera_info_topic(image_topic: str) -> str:
    """The camera_info topic of an image topic, by image_transport's rule: the image topic's namespace +
    ``camera_info`` (``/cam/image_raw`` and ``/cam/image_raw/compressed`` -> ``/cam/camera_info``)."""
    topic = image_topic.rstrip("/")
    if topic.endswith("/compressed"):
        topic = topic[: -len("/compressed")]
    namespace = topic.rsplit("/", 1)[0] if "/" in topic else ""
    return f"{namespace}/camera_info" if namespace or topic.startswith("/") else "camera_info"
