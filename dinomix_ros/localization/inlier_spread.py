"""Configuration checks after model fitting: are a model's inliers spread over both images? (ROS-free)

A fundamental matrix fitted to matches whose keyframe points coincide, or lie on a line, explains every match: the
inlier count then says nothing (issue 16). The same happens in the real world with a keyframe whose texture is one
small patch. RTAB-Map guards with ``Vis/MinInliersDistribution`` (the second eigenvalue of a PCA of the inliers'
keypoints); COLMAP's two-view geometry classifies degenerate configurations. Here, in each image
(:func:`spread_problem`):

* every inlier inside the image (a stored keypoint outside it cannot come from that image);
* the std-dev along the inliers' MINOR principal axis at least :data:`MIN_MINOR_STD` of the image's shorter side (not
  on a line, not in a tiny patch);
* the convex hull of the inliers at least :data:`MIN_HULL_AREA` of the image (not one small patch);
* at least :data:`MIN_DISTINCT` of the inliers at distinct positions (2-pixel cells: not concentrated on one point).

Thresholds were chosen by measurement (README, "Geometric verification and pose priors"): on the 199 true pairs of
the corridor (loop pairs of its ground truth and consecutive frames), 17 consecutive Lund photos and the 3 T265
stereo pairs that verify (fundamental matrix, 400 ORB), the smallest values seen were 0.031 (minor-axis std-dev /
shorter side), 0.020 (hull / image) and 0.68 (distinct fraction), about twice these; the matches of a corridor pair
whose keyframe was edited score 0 / 0 / 0.01 (keypoints on one pixel), 0 / 0 / 0.51 (on a line) and 0.004 / 0.0004 /
0.23 (in a 12-pixel patch).

A keyframe's image size is known when stored (``LocalFeatures.image_size``) or from its camera's intrinsics; when
neither is, the query's image is the reference for "tiny", and only keypoints beyond :data:`UNKNOWN_SIZE_FACTOR`
times the query image count as outside.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["spread_problem", "MIN_MINOR_STD", "MIN_HULL_AREA", "MIN_DISTINCT", "UNKNOWN_SIZE_FACTOR"]

MIN_MINOR_STD = 0.015
MIN_HULL_AREA = 0.008
MIN_DISTINCT = 0.35
UNKNOWN_SIZE_FACTOR = 8.0
_CELL_PX = 2.0


def spread_problem(points: np.ndarray, image_size: tuple[int, int] | None, reference_size: tuple[int, int],
                   label: str, what: str = "inliers") -> str:
    """Why ``points`` (the inliers' keypoints in one image) are a degenerate configuration, "" when they are not.

    Args:
        points: (N, 2) pixel coordinates.
        image_size: (width, height) of the image they are in, None (or zeros) when unknown.
        reference_size: (width, height) to measure them against when ``image_size`` is unknown (the query's).
        label: "query" or "keyframe" (for the reason).
        what: "inliers" or "matches" (for the reason).
    """
    label = f"{label} {what}"
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    known = image_size is not None and image_size[0] > 0 and image_size[1] > 0
    w, h = (float(image_size[0]), float(image_size[1])) if known else (float(reference_size[0]),
                                                                       float(reference_size[1]))
    if pts.shape[0] < 3 or w <= 0 or h <= 0:
        return f"{label}: too few to check their spread" if pts.shape[0] < 3 else ""
    if not np.isfinite(pts).all():
        return f"{label}: non-finite keypoints"
    margin = max(2.0, 0.01 * max(w, h))
    lo, (hi_x, hi_y) = -margin, ((w + margin, h + margin) if known else
                                 (UNKNOWN_SIZE_FACTOR * w, UNKNOWN_SIZE_FACTOR * h))
    outside = (pts[:, 0] < lo) | (pts[:, 1] < lo) | (pts[:, 0] > hi_x) | (pts[:, 1] > hi_y)
    if outside.any():
        return (f"{label}: {int(outside.sum())} of {len(pts)} keypoints outside the "
                f"{'image' if known else 'plausible image'} ({w:.0f}x{h:.0f})")
    short = min(w, h)
    eig = np.linalg.eigvalsh(np.cov(pts.T))
    minor = float(np.sqrt(max(eig[0], 0.0)))
    if minor < MIN_MINOR_STD * short:
        return (f"{label} on a line or in a patch: std-dev {minor:.1f} px across their main axis, "
                f"< {MIN_MINOR_STD:g} x {short:.0f} px")
    hull = float(cv2.contourArea(cv2.convexHull(pts.astype(np.float32))))
    if hull < MIN_HULL_AREA * w * h:
        return f"{label} in a small patch: convex hull {100 * hull / (w * h):.2f} % of the image"
    cells = np.floor(pts / _CELL_PX).astype(np.int64)
    distinct = np.unique((cells[:, 0] - cells[:, 0].min()) * (1 << 32) + (cells[:, 1] - cells[:, 1].min())).size
    if distinct < MIN_DISTINCT * len(pts):
        return f"{label} concentrated: {distinct} distinct positions for {len(pts)} keypoints"
    return ""
