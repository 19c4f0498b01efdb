"""Local image features (keypoints + binary/uint8 descriptors) for geometric verification (ROS-free).

A frame's :class:`LocalFeatures` are what :mod:`dinomix_ros.localization.verification` matches between a query and
a map keyframe, and what maps store per keyframe (:mod:`dinomix_ros.maps.local_features`). Extraction runs on a
grayscale copy of the frame whose longer side is at most ``features.max_image_side`` pixels (the CPU budget);
keypoints are reported in the ORIGINAL image's pixels, so the camera's intrinsics apply to them unchanged.

The default is ORB (``features.type``), chosen by measurement on the corridor and Lund images (README,
"Verification"): at 400 features a keyframe stores 15.2 KB, extraction takes a few ms at 640x480 on 2 cores, and
Hamming matching of 5 candidates costs about as much again; SIFT separates true from false pairs no better on these
images, costs about 10x the time and, at 128 bytes per descriptor, fits only ~110 features in the same storage.
AKAZE is not in OpenCV 5's main modules (it moved to contrib), so it is not offered.

With an aligned depth image (RGB-D cameras, ``depth`` argument) each keypoint also gets its depth in metres: that is
what makes the relative pose metric (PnP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from dinomix_ros.settings import check, setting

__all__ = ["FeatureConfig", "LocalFeatures", "FeatureExtractor", "DESCRIPTOR_BYTES", "depth_in_metres", "to_gray"]

#: Bytes per descriptor of each feature type (ORB: 256-bit binary; SIFT: 128 x uint8).
DESCRIPTOR_BYTES = {"orb": 32, "sift": 128}


@dataclass(frozen=True)
class FeatureConfig:
    """Local features stored per keyframe and extracted from each frame (``features.*``; read at configure)."""

    SETTINGS_GROUP: ClassVar[str] = "features"
    FLAG_PREFIX: ClassVar[str] = "features-"  # CLI flags: --features-<field>

    type: str = setting("orb", "local feature type for geometric verification: orb (32-byte binary descriptors, "
                               "fast) or sift (128 bytes, slower)", choices=tuple(DESCRIPTOR_BYTES), reconfigure=True)
    max_features: int = setting(400, "local features per frame and keyframe (storage: max_features x 38 bytes per "
                                     "keyframe with orb; 0: no local features, no verification)",
                                min=0, max=4000, reconfigure=True)
    max_image_side: int = setting(640, "features are extracted on a copy of the frame whose longer side is at most "
                                       "this many pixels (CPU budget; keypoints are in full-resolution pixels)",
                                  min=64, max=8192, reconfigure=True)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class LocalFeatures:
    """The local features of one image.

    Attributes:
        keypoints: (N, 2) float32 pixel coordinates (x, y) in the full-resolution image.
        descriptors: (N, B) uint8 descriptors (B = :data:`DESCRIPTOR_BYTES` of ``kind``).
        depths: (N,) float32 depth of each keypoint in metres, NaN where unknown (no depth image, or no return).
        image_size: (width, height) of the image the keypoints are in.
        kind: the feature type ("orb", "sift").
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    depths: np.ndarray
    image_size: tuple[int, int]
    kind: str = "orb"

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def has_depth(self) -> bool:
        return bool(np.isfinite(self.depths).any())

    @classmethod
    def empty(cls, kind: str = "orb", image_size: tuple[int, int] = (0, 0)) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES[kind]), np.uint8),
                   np.zeros(0, np.float32), image_size, kind)


def depth_in_metres(depth: np.ndarray) -> np.ndarray:
    """A ROS depth image as float32 metres: 16UC1 is millimetres (REP 118), 32FC1 metres; 0 and NaN are unknown."""
    if depth.ndim != 2:
        raise ValueError(f"a depth image has one channel, got shape {depth.shape}; expected 16UC1 or 32FC1")
    if depth.dtype == np.uint16:
        out = depth.astype(np.float32) * 1e-3
    elif depth.dtype in (np.float32, np.float64):
        out = depth.astype(np.float32, copy=True)
    else:
        raise ValueError(f"depth image dtype {depth.dtype} is not 16UC1 (uint16 mm) or 32FC1 (float32 m)")
    out[~(out > 0)] = np.nan
    return out


class FeatureExtractor:
    """Extracts :class:`LocalFeatures` from images with one configuration (not thread-safe: one per thread).

    Args:
        config: feature type, count and working resolution.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config or FeatureConfig()
        n = max(self.config.max_features, 1)
        if self.config.type == "orb":
            # fastThreshold 10 (OpenCV: 20): indoor walls and corridors are low-contrast; the strongest n are kept
            self._detector = cv2.ORB_create(nfeatures=n, fastThreshold=10)
        else:
            self._detector = cv2.SIFT_create(nfeatures=n)

    @property
    def kind(self) -> str:
        return self.config.type

    def extract(self, gray: np.ndarray, depth: np.ndarray | None = None) -> LocalFeatures:
        """Features of one image.

        Args:
            gray: (H, W) uint8 grayscale image (:func:`to_gray` converts any decoded frame).
            depth: optional aligned depth image (any size: it is looked up at the keypoint's relative position),
                uint16 millimetres or float32 metres.

        Returns:
            Up to ``max_features`` features, strongest first; none when ``max_features`` is 0.
        """
        h, w = gray.shape[:2]
        if self.config.max_features == 0:
            return LocalFeatures.empty(self.kind, (w, h))
        scale = min(1.0, self.config.max_image_side / max(h, w))
        small = gray if scale >= 1.0 else cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                     interpolation=cv2.INTER_AREA)
        kps, desc = self._detector.detectAndCompute(small, None)
        if desc is None or not kps:
            return LocalFeatures.empty(self.kind, (w, h))
        order = np.argsort([-k.response for k in kps], kind="stable")[: self.config.max_features]
        pts = np.array([kps[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
        if self.kind == "orb":  # ORB scales level coordinates by 1.2^level, not pixel centres: re-centre them
            level_scale = 1.2 ** np.array([kps[i].octave for i in order], dtype=np.float32)
            pts += 0.5 * (level_scale - 1.0)[:, None]
        if scale < 1.0:  # back to full-resolution pixels (pixel centres: (x + 0.5) / s - 0.5)
            pts = ((pts + 0.5) / np.array([small.shape[1] / w, small.shape[0] / h], np.float32) - 0.5)
        desc = desc[order]
        if desc.dtype != np.uint8:  # SIFT: float32 holding integers 0..255
            desc = np.clip(np.rint(desc), 0, 255).astype(np.uint8)
        depths = np.full(pts.shape[0], np.nan, np.float32)
        if depth is not None:
            depths = _depth_at(depth_in_metres(depth), pts, (w, h))
        return LocalFeatures(pts, np.ascontiguousarray(desc), depths, (w, h), self.kind)


def _depth_at(depth_m: np.ndarray, pts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Depth at each keypoint: the median of the valid pixels of its 3x3 neighbourhood (NaN if none)."""
    dh, dw = depth_m.shape
    u = np.clip(np.rint((pts[:, 0] + 0.5) * dw / size[0] - 0.5).astype(int), 0, dw - 1)
    v = np.clip(np.rint((pts[:, 1] + 0.5) * dh / size[1] - 0.5).astype(int), 0, dh - 1)
    patches = np.stack([depth_m[np.clip(v + dy, 0, dh - 1), np.clip(u + dx, 0, dw - 1)]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=1)
    with np.errstate(all="ignore"):
        valid = np.isfinite(patches).any(axis=1)
        out = np.full(pts.shape[0], np.nan, np.float32)
        if valid.any():
            out[valid] = np.nanmedian(patches[valid], axis=1)
    return out


def to_gray(image: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W) uint8 grayscale of a decoded frame of any supported encoding."""
    from dinomix_ros.imaging.preprocess import to_rgb8

    if encoding in ("mono8", "8UC1") and image.ndim == 2 and image.dtype == np.uint8:
        return image
    return cv2.cvtColor(to_rgb8(image, encoding), cv2.COLOR_RGB2GRAY)
