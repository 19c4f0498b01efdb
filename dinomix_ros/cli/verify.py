"""Geometric verification of ``dinomix map query``'s candidates, as the node verifies them.

For each query image the best ``--verification-candidates`` keyframes (by similarity) are verified with the same
code and settings as the node's worker (:func:`~dinomix_ros.localization.verification.verify_candidates` over
:func:`~dinomix_ros.localization.verification.verify_pair`): local features of the image (the map's feature type,
``--features-max-features`` / ``--features-max-image-side``) against the features the map stores, with the query
camera's intrinsics (``--calibration``, a ROS camera_info YAML, as ``map build`` takes) and the keyframe camera's
intrinsics stored in the map; candidates are re-ranked by verified score (``--verification-rerank``). For each
verified candidate the output gives inliers, the verified score, the model, and the pose the node would publish
were it the best: the relative pose (the robot's motion since the keyframe: a loop-closure constraint) and the
verified pose prior in the keyframe's map frame with its case (metric, rotation, keyframe), using the camera's
mount on the robot (``--camera-mount-*``) and the covariance model (``--verified-prior-*``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.settings import add_flags, from_flags

if TYPE_CHECKING:  # imported where used: the model flags already pull these in when a query runs
    from dinomix_ros.imaging.camera import CameraModel
    from dinomix_ros.localization.matching import Candidate, Matcher
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["add_verification_flags", "QueryVerifier"]

_REPORTED = ("candidates", "ratio", "mutual", "threshold_px", "confidence", "min_inliers", "min_inlier_ratio",
             "rerank")


def _prefixed(cls: type, prefix: str) -> type:
    """``cls`` with a ``FLAG_PREFIX`` for the command line (the node parameters' group names stay as they are)."""
    return type(f"{cls.__name__}Flags", (cls,), {"FLAG_PREFIX": prefix})  # same fields, same checks


def _mount_flags() -> type:
    from dinomix_ros.localization.camera_pose import CameraMountConfig

    return _prefixed(CameraMountConfig, "camera-mount-")


def _prior_flags() -> type:
    from dinomix_ros.localization.camera_pose import VerifiedPriorConfig

    return _prefixed(VerifiedPriorConfig, "verified-prior-")


def add_verification_flags(parser: argparse.ArgumentParser) -> None:
    """The node's verification settings as ``map query`` flags (see the module docstring)."""
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.verification import VerificationConfig

    group = parser.add_argument_group("geometric verification of the candidates (as the node does it)")
    add_flags(group, VerificationConfig)
    add_flags(group, FeatureConfig, fields=("max_features", "max_image_side"))
    group.add_argument("--calibration", type=Path, metavar="YAML",
                       help="ROS camera_info YAML of the camera that took the query images (camera_calibration's "
                            "ost.yaml): with the keyframes' intrinsics stored in the map, verification estimates the "
                            "camera's motion and the verified pose; without it, the fundamental matrix (no pose)")
    add_flags(group, _mount_flags())
    add_flags(group, _prior_flags())


def _vector(values: Any) -> list[float]:
    return [round(float(v), 9) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _pose(position: np.ndarray, orientation: np.ndarray, covariance: np.ndarray) -> dict[str, Any]:
    return {"position": _vector(position), "orientation": _vector(orientation),
            "covariance_diagonal": _vector(np.diag(covariance))}


@dataclass
class QueryVerifier:
    """Verifies the candidates of query images against one map, as the node does.

    Attributes:
        kmap: the map (with local features).
        matcher: the node's matcher over the map's index (candidates, the keyframe pose prior).
        config: verification settings.
        features: the query's feature extraction (the map's feature type).
        query_camera: intrinsics of the query images, None without ``--calibration``.
        mount: (4, 4) ``T_base_cam`` of the camera (``--camera-mount-*``).
        prior: covariance model of verified priors.
    """

    kmap: KeyframeMap
    matcher: Matcher
    config: Any
    features: Any
    query_camera: CameraModel | None
    mount: np.ndarray
    prior: Any

    @classmethod
    def from_args(cls, args: argparse.Namespace, kmap: KeyframeMap, index: Any, top_k: int
                  ) -> tuple[QueryVerifier | None, dict[str, Any]]:
        """The verifier the flags describe, and what the output says about verification.

        Returns:
            (verifier, info): the verifier is None when verification is off (``--no-verification-enabled``) or the
            map stores no local features (format 1); ``info`` says which, and the settings used.

        Raises:
            SettingError / CameraModelError / FileNotFoundError: a bad flag value or calibration file.
        """
        from dinomix_ros.imaging.camera import camera_from_info_yaml
        from dinomix_ros.imaging.features import FeatureConfig
        from dinomix_ros.localization.matching import Matcher, MatcherConfig
        from dinomix_ros.localization.verification import VerificationConfig

        config = from_flags(VerificationConfig, args)
        camera = None if args.calibration is None else camera_from_info_yaml(args.calibration)
        mount = from_flags(_mount_flags(), args).matrix()
        prior = from_flags(_prior_flags(), args)
        store = kmap.local_features
        info: dict[str, Any] = {"enabled": False, "settings": {k: getattr(config, k) for k in _REPORTED}}
        if not config.enabled:
            info["note"] = "off (--no-verification-enabled)"
            return None, info
        if store is None:
            info["note"] = "off: the map has no local features (format 1); rebuild it with `dinomix map build`"
            return None, info
        features = from_flags(FeatureConfig, args, fields=("max_features", "max_image_side"), type=store.kind)
        info.update(enabled=True, features={"type": features.type, "max_features": features.max_features,
                                            "max_image_side": features.max_image_side},
                    query_intrinsics=camera is not None, keyframe_intrinsics=sorted(store.intrinsics))
        matcher = Matcher(kmap, index, MatcherConfig(top_k=top_k))
        return cls(kmap, matcher, config, features, camera, mount, prior), info

    def _query_features(self, path: Path) -> Any:
        from dinomix_ros.imaging.decode import read_image_file
        from dinomix_ros.imaging.features import FeatureExtractor, to_gray

        gray = to_gray(*read_image_file(path))
        camera = self.query_camera
        if camera is not None and (camera.width, camera.height) != (gray.shape[1], gray.shape[0]):
            raise ValueError(f"--calibration describes {camera.width}x{camera.height} images, {path} is "
                             f"{gray.shape[1]}x{gray.shape[0]}; give the calibration of the camera that took it")
        return FeatureExtractor(self.features).extract(gray)

    def verify(self, path: Path, descriptor: np.ndarray) -> tuple[list[Candidate], list[Any]]:
        """The candidates of one image, verified and re-ranked as the node does (verifications[i] belongs to
        candidates[i]; None where not verified)."""
        from dinomix_ros.localization.verification import verify_candidates, verify_pair

        features = self._query_features(path)
        store = self.kmap.local_features
        cands = self.matcher.candidates(descriptor, 0)

        def one(cand: Candidate) -> Any:
            return verify_pair(features, store.row(cand.row), self.config, self.query_camera,
                               store.intrinsics.get(cand.camera))

        return verify_candidates(cands, one, self.config)

    def describe(self, cands: list[Candidate], checks: list[Any], index: int) -> dict[str, Any]:
        """What the output says about candidate ``index``: its verification, and, verified, the poses."""
        from dataclasses import replace

        from dinomix_ros.localization.camera_pose import relative_base_pose, verified_prior
        from dinomix_ros.localization.matching import PosePrior

        v = checks[index]
        if v is None:
            return {"verification": None}
        out: dict[str, Any] = {"verification": {
            "verified": bool(v.passed), "inliers": int(v.inliers), "matches": int(v.matches),
            "inlier_ratio": round(v.inlier_ratio, 4), "verified_score": round(v.score, 4), "model": v.model,
            "metric": bool(v.metric), "residual": None if not math.isfinite(v.error) else round(v.error, 6),
            "seconds": round(v.seconds, 5)}}
        if not v.passed:
            return out
        relative = relative_base_pose(v, self.mount, self.mount, self.prior)
        if relative is not None:
            from dinomix_ros.localization.camera_pose import matrix_to_quat

            out["relative_pose"] = {"case": relative.case,
                                    **_pose(relative.T[:3, 3], matrix_to_quat(relative.T[:3, :3]),
                                            relative.covariance)}
        cand = cands[index]
        if not cand.has_position:
            out["pose"] = None
            return out
        # the node's prior when this candidate is the best: the matcher's keyframe prior, then the verified motion
        ranked = [replace(cand, verification=v)] + [c for i, c in enumerate(cands) if i != index]
        keyframe: PosePrior = self.matcher.pose_prior(ranked)
        pose, case = verified_prior(keyframe, v, self.mount, self.mount, self.prior)
        out["pose"] = {"case": case, "frame_id": pose.frame_id,
                       **_pose(pose.position, pose.orientation, pose.covariance)}
        return out
