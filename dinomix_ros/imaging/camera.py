"""Camera intrinsics and lens distortion: what turns pixel keypoints into rays (ROS-free).

:class:`CameraModel` holds what a ROS ``sensor_msgs/CameraInfo`` says about a camera: image size, the 3x3 matrix K
and the distortion model with its coefficients. The models ROS drivers publish are supported: ``plumb_bob`` and
``rational_polynomial`` (OpenCV's radial-tangential model, 4 to 14 coefficients), ``equidistant`` /
``fisheye`` (OpenCV's fisheye model, 4 coefficients: Kannala-Brandt as the T265 and ROS' camera_calibration write
it) and no distortion (``none`` or all-zero coefficients). :meth:`CameraModel.normalized` undistorts keypoints into
normalized image coordinates (``x / z``, ``y / z`` of the ray), which is what the essential matrix and PnP take.

Sources: :func:`camera_from_info_yaml` reads the YAML that ``camera_calibration`` writes (and
``camera_info_manager`` loads); the node builds one from each ``camera_info`` message
(:func:`dinomix_ros.ros.conversions.camera_from_info_msg`); maps store them per camera as JSON
(:meth:`CameraModel.to_dict` / :meth:`CameraModel.from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["CameraModelError", "CameraModel", "camera_from_info_yaml", "camera_info_topic", "DISTORTION_MODELS"]

#: ROS distortion model names -> the OpenCV family that undistorts them.
DISTORTION_MODELS = {"plumb_bob": "pinhole", "rational_polynomial": "pinhole", "none": "pinhole",
                     "equidistant": "fisheye", "fisheye": "fisheye", "kannala_brandt": "fisheye"}


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
            raise CameraModelError(f"K must be 9 finite numbers with fx, fy > 0 (row-major 3x3), got {self.K!r}; "
                                   "is the camera calibrated? (an all-zero K means it is not)")
        model = str(self.distortion_model).lower() or "none"
        if model not in DISTORTION_MODELS:
            raise CameraModelError(f"distortion model {self.distortion_model!r} is not supported; expected one of "
                                   f"{', '.join(DISTORTION_MODELS)}")
        D = np.asarray(self.D, dtype=np.float64).reshape(-1)
        if not np.isfinite(D).all():
            raise CameraModelError(f"distortion coefficients must be finite, got {D.tolist()}")
        family = DISTORTION_MODELS[model]
        if family == "fisheye" and D.size != 4:
            raise CameraModelError(f"the {model} model takes 4 coefficients (k1..k4), got {D.size}")
        if family == "pinhole" and D.size not in (0, 4, 5, 8, 12, 14):
            raise CameraModelError(f"the {model} model takes 0, 4, 5, 8, 12 or 14 coefficients, got {D.size}")
        if int(self.width) < 1 or int(self.height) < 1:
            raise CameraModelError(f"image size {self.width}x{self.height} must be positive")
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
        """This camera for images resized to ``width`` x ``height`` (K scales, distortion does not)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
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


def camera_info_topic(image_topic: str) -> str:
    """The camera_info topic of an image topic, by image_transport's rule: the image topic's namespace +
    ``camera_info`` (``/cam/image_raw`` and ``/cam/image_raw/compressed`` -> ``/cam/camera_info``)."""
    topic = image_topic.rstrip("/")
    if topic.endswith("/compressed"):
        topic = topic[: -len("/compressed")]
    namespace = topic.rsplit("/", 1)[0] if "/" in topic else ""
    return f"{namespace}/camera_info" if namespace or topic.startswith("/") else "camera_info"
