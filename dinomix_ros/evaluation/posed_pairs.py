"""Pose accuracy of geometric verification on posed image pairs: what the verified pose priors are worth (ROS-free).

A posed pair is a query image and a keyframe image of the same scene, their cameras' intrinsics, optionally the
keyframe's depth, and the true relative pose ``T_q_k`` (keyframe camera coordinates -> query camera coordinates,
``X_q = R X_k + t``: the convention of :class:`~dinomix_ros.localization.verification.Verification`). Each pair is
verified exactly as the node verifies a candidate (features -> :func:`~dinomix_ros.localization.verification.
verify_pair` with both cameras' intrinsics), and the estimate is compared with the truth:

* rotation error (degrees), translation-direction error (degrees, when the model estimated a translation and the
  cameras moved), metric translation error (metres and relative, when the keyframe had depths: PnP);
* the relative pose a loop closure and the pose prior publish (:func:`~dinomix_ros.localization.camera_pose.
  relative_base_pose`, camera = base) against the truth: the error ``delta`` with ``T_true = T exp(delta)``, its
  normalised estimation error squared (NEES, rotation and position blocks, 3 degrees of freedom each; a consistent
  covariance keeps 99 % of them under :data:`CHI2_3DOF_99`) and the error over the standard deviation the covariance
  claims along the error's direction (``sigma_ratio``; 3 is the "3 sigma" bound).

Pairs come from a CSV file (:func:`load_posed_pairs`): real pairs (two image files) and known-motion pairs (one real
image and the motion; the query is rendered by :mod:`~dinomix_ros.evaluation.warped_pairs`). Columns::

    name, kind, keyframe, keyframe_camera, keyframe_depth, use_depth, query, query_camera,
    tx, ty, tz, qx, qy, qz, qw, plane_distance_m, plane_tilt_rad

``kind`` is ``stereo`` (or any other real kind: both images given), ``rotation_warp``, ``plane_warp`` or
``depth_warp`` (:func:`render_pair`); paths are relative to the CSV's folder; cameras are ROS camera_info YAML
files; ``keyframe_depth`` a 16-bit PNG in millimetres (REP 118) or empty; ``use_depth`` 0 withholds the keyframe's
depth from verification (the essential-matrix path); ``tx..qw`` is ``T_q_k`` (translation in metres, quaternion
x y z w); the plane columns apply to ``plane_warp`` only.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel, camera_from_info_yaml
from dinomix_ros.imaging.features import FeatureConfig, FeatureExtractor
from dinomix_ros.localization.camera_pose import VerifiedPriorConfig, relative_base_pose
from dinomix_ros.evaluation.warped_pairs import WARP_KINDS, render_view
from dinomix_ros.localization.verification import Verification, VerificationConfig, verify_pair

__all__ = ["CHI2_3DOF_99", "DETERMINED", "PosedView", "PosedPair", "PairResult", "load_posed_pairs", "render_pair",
           "evaluate_pair", "evaluate_pairs", "summarize", "pose_errors"]

#: 99 % quantile of the chi-square distribution with 3 degrees of freedom: a consistent 3-D covariance keeps 99 % of
#: its normalised estimation errors squared below it.
CHI2_3DOF_99 = 11.345
#: Cameras that moved less than this have no translation direction to compare (metres).
MIN_BASELINE_M = 0.01
_COLUMNS = ("name", "kind", "keyframe", "keyframe_camera", "keyframe_depth", "use_depth", "query", "query_camera",
            "tx", "ty", "tz", "qx", "qy", "qz", "qw", "plane_distance_m", "plane_tilt_rad")


@dataclass(frozen=True, eq=False)
class PosedView:
    """One image of a posed pair.

    Attributes:
        name: where it comes from (file name, or the rendered view's name).
        gray: (H, W) uint8 image.
        camera: its intrinsics.
        depth: (H, W) float32 metres aligned with ``gray`` (NaN unknown), None without depth.
    """

    name: str
    gray: np.ndarray
    camera: CameraModel
    depth: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class PosedPair:
    """A query and a keyframe view with the true relative pose ``T_q_k`` (keyframe camera -> query camera)."""

    name: str
    kind: str
    query: PosedView
    keyframe: PosedView
    T_q_k: np.ndarray

    @property
    def rotation_deg(self) -> float:
        return _angle_deg(self.T_q_k[:3, :3])

    @property
    def baseline_m(self) -> float:
        return float(np.linalg.norm(self.T_q_k[:3, 3]))


@dataclass(frozen=True)
class PairResult:
    """The verification of one posed pair against its truth (NaN where a quantity does not apply).

    Attributes:
        name, kind: the pair.
        true_rotation_deg, true_baseline_m: how far the camera moved.
        matches, inliers, model, passed: the verification (``model`` as in :class:`Verification`).
        case: the relative pose's case ("metric", "rotation", "keyframe": ambiguous; "" without a pose).
        rotation_error_deg: angle of ``R_est R_true^T``.
        translation_direction_error_deg: angle between the estimated and true translation (a model with a
            translation, cameras moved at least :data:`MIN_BASELINE_M`).
        translation_error_m, translation_error_rel: metric translation error (PnP), absolute and over the baseline.
        nees_rotation, nees_position: normalised estimation error squared of the published relative pose's rotation
            and position blocks.
        sigma_ratio_rotation, sigma_ratio_position: error over the claimed standard deviation along its direction.
        sigma_rotation_deg, sigma_position_m: the claimed standard deviations (largest axis).
        extract_ms, verify_ms: feature extraction of both views, and verification (wall time).
    """

    name: str
    kind: str
    true_rotation_deg: float
    true_baseline_m: float
    matches: int
    inliers: int
    model: str
    passed: bool
    case: str
    rotation_error_deg: float
    translation_direction_error_deg: float
    translation_error_m: float
    translation_error_rel: float
    nees_rotation: float
    nees_position: float
    sigma_ratio_rotation: float
    sigma_ratio_position: float
    sigma_rotation_deg: float
    sigma_position_m: float
    extract_ms: float
    verify_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------------------- loading


def _matrix(t: Sequence[float], q: Sequence[float]) -> np.ndarray:
    from dinomix_ros.maps.sources.poses import quat_to_matrix

    T = np.eye(4)
    T[:3, :3] = quat_to_matrix(np.asarray(q, dtype=np.float64))
    T[:3, 3] = np.asarray(t, dtype=np.float64)
    return T


def _read_gray(path: Path) -> np.ndarray:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError(f"{path}: not a readable image")
    return gray


def _read_depth_mm(path: Path, shape: tuple[int, int]) -> np.ndarray:
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None or depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"{path}: expected a 16-bit single-channel PNG in millimetres")
    if depth.shape != shape:
        raise ValueError(f"{path}: depth is {depth.shape[1]}x{depth.shape[0]}, the image {shape[1]}x{shape[0]}")
    out = depth.astype(np.float32) * 1e-3
    out[depth == 0] = np.nan
    return out


def _float(row: dict[str, str], key: str, default: float = math.nan) -> float:
    value = (row.get(key) or "").strip()
    return float(value) if value else default


def load_posed_pairs(path: str | Path, kinds: Iterable[str] | None = None) -> list[PosedPair]:
    """The pairs a CSV file describes (see the module docstring), known-motion queries rendered.

    Args:
        path: the CSV file.
        kinds: keep only these kinds (None: all).

    Raises:
        FileNotFoundError / ValueError: a missing file, a bad row (the message names the row and the column).
    """
    path = Path(path)
    base, keep = path.parent, None if kinds is None else set(kinds)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    pairs: list[PosedPair] = []
    cameras: dict[str, CameraModel] = {}

    def camera(name: str) -> CameraModel:
        if name not in cameras:
            cameras[name] = camera_from_info_yaml(base / name)
        return cameras[name]

    for number, row in enumerate(rows, start=2):
        missing = [c for c in ("name", "kind", "keyframe", "keyframe_camera") if not (row.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{path}:{number}: empty {', '.join(missing)}; columns are {', '.join(_COLUMNS)}")
        kind = row["kind"].strip()
        if keep is not None and kind not in keep:
            continue
        try:
            T = _matrix([_float(row, k) for k in ("tx", "ty", "tz")],
                        [_float(row, k) for k in ("qx", "qy", "qz", "qw")])
            if not np.isfinite(T).all():
                raise ValueError("tx, ty, tz, qx, qy, qz, qw must all be numbers")
            kf_gray = _read_gray(base / row["keyframe"])
            kf_depth = _read_depth_mm(base / row["keyframe_depth"], kf_gray.shape) \
                if (row.get("keyframe_depth") or "").strip() else None
            keyframe = PosedView(row["keyframe"], kf_gray, camera(row["keyframe_camera"].strip()), kf_depth)
            use_depth = _float(row, "use_depth", 1.0) != 0
            if kind in WARP_KINDS:
                pair = render_pair(row["name"], kind, keyframe, T, use_depth=use_depth,
                                   plane_distance_m=_float(row, "plane_distance_m", 3.0),
                                   plane_tilt_rad=_float(row, "plane_tilt_rad", 0.0))
            else:
                query = PosedView(row["query"], _read_gray(base / row["query"]), camera(row["query_camera"].strip()))
                if not use_depth:
                    keyframe = PosedView(keyframe.name, keyframe.gray, keyframe.camera, None)
                pair = PosedPair(row["name"], kind, query, keyframe, T)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}:{number} ({row.get('name')}): {exc}") from None
        pairs.append(pair)
    return pairs


def render_pair(name: str, kind: str, keyframe: PosedView, T_q_k: np.ndarray, *, use_depth: bool = True,
                plane_distance_m: float = 3.0, plane_tilt_rad: float = 0.0) -> PosedPair:
    """A known-motion pair: ``keyframe`` and the view rendered for ``kind`` after the motion ``T_q_k``
    (:func:`~dinomix_ros.evaluation.warped_pairs.render_view`); ``use_depth`` False withholds the keyframe's depth
    (measured, or the plane's) from verification.

    Raises:
        ValueError: the motion or camera cannot be rendered (the message names the pair).
    """
    try:
        query, depth = render_view(kind, keyframe.gray, keyframe.camera, keyframe.depth, T_q_k,
                                   plane_distance_m=plane_distance_m, plane_tilt_rad=plane_tilt_rad)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    rendered = PosedView(f"{keyframe.name} ({kind})", query, keyframe.camera)
    kf = PosedView(keyframe.name, keyframe.gray, keyframe.camera, depth if use_depth else None)
    return PosedPair(name, kind, rendered, kf, np.asarray(T_q_k, dtype=np.float64))


# -------------------------------------------------------------------------------------------------- evaluation


def _angle_deg(R: np.ndarray) -> float:
    cos = (float(np.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _vector_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < 1e-12 or nb < 1e-12:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / (na * nb)))))


def _nees(error: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    """(NEES, error over the standard deviation along the error's direction) of one 3-D block."""
    norm = float(np.linalg.norm(error))
    nees = float(error @ np.linalg.solve(cov, error))
    if norm == 0.0:
        return nees, 0.0
    u = error / norm
    return nees, norm / math.sqrt(float(u @ cov @ u))


def pose_errors(verification: Verification, T_q_k: np.ndarray, prior: VerifiedPriorConfig | None = None
                ) -> dict[str, Any]:
    """Errors of a verification's relative pose against the truth ``T_q_k`` (see :class:`PairResult`)."""
    out: dict[str, Any] = {"case": "", "rotation_error_deg": math.nan, "translation_direction_error_deg": math.nan,
                           "translation_error_m": math.nan, "translation_error_rel": math.nan,
                           "nees_rotation": math.nan, "nees_position": math.nan, "sigma_ratio_rotation": math.nan,
                           "sigma_ratio_position": math.nan, "sigma_rotation_deg": math.nan,
                           "sigma_position_m": math.nan}
    if verification.R is None:
        return out
    R_true, t_true = T_q_k[:3, :3], T_q_k[:3, 3]
    out["rotation_error_deg"] = _angle_deg(np.asarray(verification.R) @ R_true.T)
    t_est = np.asarray(verification.t, dtype=np.float64).reshape(3)
    baseline = float(np.linalg.norm(t_true))
    if verification.model != "rotation" and baseline >= MIN_BASELINE_M:
        out["translation_direction_error_deg"] = _vector_angle_deg(t_est, t_true)
    if verification.metric:
        out["translation_error_m"] = float(np.linalg.norm(t_est - t_true))
        out["translation_error_rel"] = out["translation_error_m"] / baseline if baseline > 0 else math.nan
    # the published relative pose (camera = base): T = T_k_q estimated; the truth is T exp(delta)
    relative = relative_base_pose(verification, np.eye(4), np.eye(4), prior or VerifiedPriorConfig())
    if relative is None:
        return out
    delta = np.linalg.inv(relative.T) @ np.linalg.inv(T_q_k)
    rvec = cv2.Rodrigues(np.ascontiguousarray(delta[:3, :3]))[0].reshape(3)
    cov = relative.covariance
    out["case"] = relative.case
    out["nees_position"], out["sigma_ratio_position"] = _nees(delta[:3, 3], cov[:3, :3])
    out["nees_rotation"], out["sigma_ratio_rotation"] = _nees(rvec, cov[3:, 3:])
    out["sigma_position_m"] = math.sqrt(float(np.linalg.eigvalsh(cov[:3, :3]).max()))
    out["sigma_rotation_deg"] = math.degrees(math.sqrt(float(np.linalg.eigvalsh(cov[3:, 3:]).max())))
    return out


def evaluate_pair(pair: PosedPair, extractor: FeatureExtractor, config: VerificationConfig | None = None,
                  prior: VerifiedPriorConfig | None = None) -> PairResult:
    """Verify one posed pair as the node would (both cameras' intrinsics, the keyframe's depths) and score it."""
    t0 = time.perf_counter()
    query = extractor.extract(pair.query.gray)
    keyframe = extractor.extract(pair.keyframe.gray, pair.keyframe.depth)
    t1 = time.perf_counter()
    v = verify_pair(query, keyframe, config or VerificationConfig(), pair.query.camera, pair.keyframe.camera)
    t2 = time.perf_counter()
    errors = pose_errors(v, pair.T_q_k, prior)
    return PairResult(name=pair.name, kind=pair.kind, true_rotation_deg=pair.rotation_deg,
                      true_baseline_m=pair.baseline_m, matches=v.matches, inliers=v.inliers, model=v.model,
                      passed=bool(v.passed), extract_ms=(t1 - t0) * 1e3, verify_ms=(t2 - t1) * 1e3, **errors)


def evaluate_pairs(pairs: Sequence[PosedPair], features: FeatureConfig | None = None,
                   config: VerificationConfig | None = None, prior: VerifiedPriorConfig | None = None
                   ) -> list[PairResult]:
    """:func:`evaluate_pair` over ``pairs`` with one feature extractor."""
    extractor = FeatureExtractor(features)
    return [evaluate_pair(p, extractor, config, prior) for p in pairs]


def _stats(values: Iterable[float]) -> dict[str, float | int | None]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "median": None, "p90": None, "max": None}
    return {"n": int(arr.size), "median": round(float(np.median(arr)), 4),
            "p90": round(float(np.percentile(arr, 90)), 4), "max": round(float(arr.max()), 4)}


#: The relative pose's cases that claim a rotation (:func:`~dinomix_ros.localization.camera_pose.relative_base_pose`;
#: "keyframe": an ambiguous motion, the keyframe's orientation with a covariance that covers every solution).
DETERMINED = ("metric", "rotation")


def summarize(results: Sequence[PairResult]) -> dict[str, Any]:
    """Over the pairs that passed verification: pass counts, how many were published as determined (metric or
    rotation case) and how many as ambiguous (keyframe case); median / p90 / max of the errors of the DETERMINED ones
    (an ambiguous pair claims no rotation: its estimate's error is not what it publishes); and, over all of them,
    how many NEES values stay within :data:`CHI2_3DOF_99` and how many errors within 3 claimed standard deviations."""
    passed = [r for r in results if r.passed]
    determined = [r for r in passed if r.case in DETERMINED]

    def within(values: list[float], bound: float) -> dict[str, Any]:
        finite = [v for v in values if math.isfinite(v)]
        n = sum(v <= bound for v in finite)
        return {"within": n, "of": len(finite), "share": round(n / len(finite), 4) if finite else None}

    out: dict[str, Any] = {
        "pairs": len(results),
        "passed": len(passed),
        "determined": len(determined),
        "ambiguous": sum(r.case == "keyframe" for r in passed),
        "inliers": _stats(r.inliers for r in passed),
        "rotation_error_deg": _stats(r.rotation_error_deg for r in determined),
        "translation_direction_error_deg": _stats(r.translation_direction_error_deg for r in determined),
        "translation_error_m": _stats(r.translation_error_m for r in determined),
        "translation_error_rel": _stats(r.translation_error_rel for r in determined),
        "nees_rotation": _stats(r.nees_rotation for r in passed),
        "nees_position": _stats(r.nees_position for r in passed),
        "nees_rotation_within_chi2_99": within([r.nees_rotation for r in passed], CHI2_3DOF_99),
        "nees_position_within_chi2_99": within([r.nees_position for r in passed], CHI2_3DOF_99),
        "rotation_within_3_sigma": within([r.sigma_ratio_rotation for r in passed], 3.0),
        "position_within_3_sigma": within([r.sigma_ratio_position for r in passed], 3.0),
        "verify_ms": _stats(r.verify_ms for r in results),
    }
    kinds = sorted({r.kind for r in results})
    if len(kinds) > 1:
        out["by_kind"] = {k: {"pairs": sum(r.kind == k for r in results),
                              "passed": sum(r.kind == k and r.passed for r in results),
                              "ambiguous": sum(r.kind == k and r.case == "keyframe" for r in passed),
                              "rotation_error_deg": _stats(r.rotation_error_deg for r in determined if r.kind == k),
                              "translation_direction_error_deg": _stats(r.translation_direction_error_deg
                                                                        for r in determined if r.kind == k)}
                          for k in kinds}
    return out
