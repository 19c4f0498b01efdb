"""Pose priors a SLAM backend can trust: the NEES suite (ROS-free, seeded).

Random 3-D scenes are seen by two real camera models (pinhole, distorted pinhole, the T265's fisheye) with pixel noise
(0.5-1.5 px) and outliers (10-30 %), and go through ``verify_pair`` -> ``relative_base_pose`` / ``verified_prior``
exactly as the node does it (synthetic_twoview.py builds the LocalFeatures). Families (synthetic_twoview.family_pair):
near 3-D scenes with and without keyframe depth; far scenes (30-120 m, the robot moved 0.5 m sideways: the issue's
flips); single planes facing the camera or tilted, with and without depth (the issue's 15-degree errors); a pure
rotation; forward and sideways motion; 7-13 keyframe depths (the issue's metric priors from a handful of PnP
inliers); a rear-camera keyframe matched by the front camera after the robot turned around, a side camera; the T265
fisheye and a distorted pinhole.

For each prior: the NEES of the orientation and of the position (3 dof each; the error is the truth as a right
perturbation of the estimate in the query base frame, what the covariance describes) must stay within the 99 %
chi-square bound (11.34) in at least 95 % of the cases of each family, no prior may be off by more than 3 std-devs
along its error's direction, and none may be flipped. ``PYTHONPATH=. python test/localization/test_pose_nees.py``
prints the per-family statistics (README, "Geometric verification and pose priors").
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from synthetic_twoview import FAMILIES, FRONT, REAR, family_pair, map_error, motion_error, nees, sigma_along

from dinomix_ros.localization.camera_pose import (
    VerifiedPriorConfig, matrix_to_quat, relative_base_pose, rpy_to_matrix, verified_prior,
)
from dinomix_ros.localization.matching import PosePrior
from dinomix_ros.localization.relative_pose import MIN_PNP_INLIERS
from dinomix_ros.localization.se3 import pose_matrix, so3_exp, so3_log
from dinomix_ros.localization.verification import Verification, VerificationConfig, verify_pair
from dinomix_ros.maps.sources.poses import quat_to_matrix

BOUND = 11.34  # chi-square, 3 dof, 99 %
SEEDS = 20
FAR_SEEDS = 30  # the far-scene regression: 14 of 30 seeds flipped
CONFIG = VerifiedPriorConfig()
FIT_ONLY = VerifiedPriorConfig(min_sigma_m=1e-9, min_sigma_rad=1e-9)  # the fit's own covariance, for the report
# the matcher's prior of the keyframe (what verified_prior starts from): at the keyframe pose, 0.5 m and 0.15 rad
KEYFRAME_POSE = pose_matrix(rpy_to_matrix(0.0, 0.0, 0.8), np.array([4.0, -2.0, 0.0]))
KEYFRAME_PRIOR = PosePrior("map", KEYFRAME_POSE[:3, 3].copy(), matrix_to_quat(KEYFRAME_POSE[:3, :3]),
                           np.diag([0.5 ** 2] * 3 + [0.15 ** 2] * 3))


def evaluate(family: str, seed: int) -> dict:
    """One pair through the pipeline: what was published and how far off it is."""
    pair = family_pair(family, seed)
    v = verify_pair(pair.query, pair.keyframe, VerificationConfig(), pair.cam_q, pair.cam_k)
    out = {"family": family, "seed": seed, "passed": v.passed, "model": v.model, "inliers": v.inliers,
           "pnp_inliers": v.pnp_inliers, "metric": v.metric, "depths": int(np.isfinite(pair.keyframe.depths).sum())}
    relative = relative_base_pose(v, pair.mount_k, pair.mount_q, CONFIG) if v.passed else None
    if relative is None:
        return out
    rho, phi = motion_error(relative.T, pair.T_kb_qb)
    fit = relative_base_pose(v, pair.mount_k, pair.mount_q, FIT_ONLY)
    prior, case = verified_prior(KEYFRAME_PRIOR, v, pair.mount_k, pair.mount_q, CONFIG)
    p_err, r_err = map_error(prior.position, quat_to_matrix(prior.orientation), KEYFRAME_POSE @ pair.T_kb_qb)
    out.update(case=relative.case, prior_case=case, relative_inliers=relative.inliers,
               nees_rot=nees(phi, relative.covariance[3:, 3:]), nees_pos=nees(rho, relative.covariance[:3, :3]),
               fit_nees_rot=nees(phi, fit.covariance[3:, 3:]),
               fit_nees_pos=nees(rho, fit.covariance[:3, :3]) if relative.case == "metric" else math.nan,
               along_rot=sigma_along(phi, relative.covariance[3:, 3:]),
               along_pos=sigma_along(rho, relative.covariance[:3, :3]),
               map_nees_rot=nees(r_err, prior.covariance[3:, 3:]), map_nees_pos=nees(p_err, prior.covariance[:3, :3]),
               error_deg=math.degrees(float(np.linalg.norm(phi))), error_m=float(np.linalg.norm(rho)),
               sigma_rot_deg=math.degrees(math.sqrt(float(np.max(np.linalg.eigvalsh(relative.covariance[3:, 3:]))))))
    return out


_CACHE: dict[str, list[dict]] = {}


def family_results(family: str) -> list[dict]:
    if family not in _CACHE:
        _CACHE[family] = [evaluate(family, s) for s in range(FAR_SEEDS if family == "far" else SEEDS)]
    return _CACHE[family]


def summary(family: str) -> dict:
    rows = family_results(family)
    pub = [r for r in rows if "case" in r]

    def frac(key: str) -> float:
        vals = [r[key] for r in pub if math.isfinite(r[key])]
        return round(float(np.mean(np.array(vals) <= BOUND)), 3) if vals else math.nan

    cases: dict[str, int] = {}
    for r in pub:
        cases[r["case"]] = cases.get(r["case"], 0) + 1
    return {"family": family, "pairs": len(rows), "published": len(pub), "cases": cases,
            "orientation_within_bound": frac("nees_rot"), "position_within_bound": frac("nees_pos"),
            "orientation_nees_median": round(float(np.median([r["nees_rot"] for r in pub])), 2) if pub else None,
            "orientation_nees_max": round(float(max(r["nees_rot"] for r in pub)), 2) if pub else None,
            "position_nees_max": round(float(max(r["nees_pos"] for r in pub)), 2) if pub else None,
            "fit_only_orientation_within_bound": frac("fit_nees_rot"),
            "fit_only_position_within_bound": frac("fit_nees_pos"),
            "max_error_deg": round(float(max(r["error_deg"] for r in pub)), 3) if pub else None,
            "max_sigmas_along_error": round(float(max(max(r["along_rot"], r["along_pos"]) for r in pub)), 2)
            if pub else None}


@pytest.mark.parametrize("family", FAMILIES)
def test_priors_are_calibrated_in_every_family(family: str) -> None:
    rows = family_results(family)
    published = [r for r in rows if "case" in r]
    assert len(published) >= 0.9 * len(rows), f"{family}: {len(published)} of {len(rows)} pairs give a prior"
    for key in ("nees_rot", "nees_pos", "map_nees_rot", "map_nees_pos"):
        within = np.mean([r[key] <= BOUND for r in published])
        assert within >= 0.95, f"{family}: {key} within {BOUND} in {within:.0%} ({summary(family)})"
    for r in published:
        assert r["along_rot"] <= 3.0 and r["along_pos"] <= 3.0, r  # never off by more than 3 sigma
        assert r["error_deg"] < 90.0, r  # never flipped


def test_the_expected_case_per_family() -> None:
    """Depth makes priors metric, its absence rotation-only; a facing wall is mostly not ambiguous, a pure rotation is
    a rotation; the suite must exercise each case.

    A facing wall has one plane solution in front of both cameras, but without depth nothing tells a plane from a
    shallow 3-D scene: where the essential matrix explains every match as well with a rotation more than 2 degrees
    from the plane's (seen at 1.4 px of noise), the pair is ambiguous (on the real posed pairs the same test caught
    depth_rtabmap_rgbd_154_5, a 3-D scene a plane explains as well, whose plane solution is 15 degrees off)."""
    def cases(family: str) -> set[str]:
        return {r["case"] for r in family_results(family) if "case" in r}

    for family in ("near_depth", "plane_facing_depth", "plane_tilted_depth", "cross_camera_depth",
                   "side_camera_depth", "fisheye_depth", "distorted_depth"):
        assert cases(family) == {"metric"}, family
    for family in ("near", "far", "pure_rotation", "forward", "sideways", "cross_camera", "side_camera", "fisheye",
                   "distorted"):
        assert cases(family) == {"rotation"}, family
    facing = [r["case"] for r in family_results("plane_facing") if "case" in r]
    assert set(facing) <= {"rotation", "keyframe"} and facing.count("rotation") >= 0.9 * len(facing), facing
    assert {r["model"] for r in family_results("pure_rotation") if r["passed"]} == {"rotation"}
    assert "keyframe" in cases("plane_tilted")  # a tilted plane without depth: some pairs are ambiguous


def test_far_scenes_without_depth_never_flip() -> None:
    """The issue: 30-120 m away, 0.5 m sideways, no depth: 14 of 30 seeds were published 165-177 degrees off in yaw
    with sigma 0.01 rad (recoverPose's distanceThresh)."""
    rows = family_results("far")
    assert len(rows) == 30 and all("case" in r for r in rows)
    assert max(r["error_deg"] for r in rows) < 2.0
    assert max(r["along_rot"] for r in rows) <= 3.0


def test_a_plane_without_depth_claims_no_orientation_it_does_not_have() -> None:
    """The issue: a wall 3 m ahead, moving sideways: 15 degrees off in 12 of 20 seeds at sigma 0.01 rad. Now each
    prior is within 3 sigma along its error, and a pair whose two plane solutions disagree says so (keyframe case:
    its orientation covariance covers both)."""
    for family in ("plane_facing", "plane_tilted"):
        for r in family_results(family):
            if "case" not in r:
                continue
            assert r["along_rot"] <= 3.0, r
            if r["error_deg"] > 2.0:  # a large error must come with a large sigma
                assert r["sigma_rot_deg"] >= r["error_deg"] / 3.0, r
    ambiguous = [r for r in family_results("plane_tilted") if r.get("case") == "keyframe"]
    assert ambiguous and all(r["sigma_rot_deg"] > 1.0 for r in ambiguous)


def test_few_pnp_inliers_are_counted_honestly() -> None:
    """The issue: a metric prior from 7-13 PnP inliers reported the essential matrix's 200+ inliers and a tight
    sigma. The metric case needs MIN_PNP_INLIERS of PnP's own, and reports them."""
    rows = [r for r in family_results("few_pnp") if "case" in r]
    assert {r["case"] for r in rows} == {"metric", "rotation"}  # both sides of the minimum occur
    for r in rows:
        if r["case"] == "metric":
            assert MIN_PNP_INLIERS <= r["pnp_inliers"] <= r["depths"] <= 13
            assert r["relative_inliers"] == r["pnp_inliers"] < r["inliers"]  # its own count, not the two-view one
        else:  # too few PnP inliers (or too concentrated): the rotation, with the two-view model's count
            assert not r["metric"] and r["relative_inliers"] == r["inliers"]


def test_sigma_grows_as_the_evidence_weakens() -> None:
    """The same scene with keyframe depths (metric), without (rotation), without intrinsics (keyframe): the map-frame
    prior's std-devs, orientation and position, grow in that order."""
    for seed in range(6):
        pair = family_pair("near_depth", seed)
        with_depth = verify_pair(pair.query, pair.keyframe, VerificationConfig(), pair.cam_q, pair.cam_k)
        no_depth_kf = type(pair.keyframe)(pair.keyframe.keypoints, pair.keyframe.descriptors,
                                          np.full(len(pair.keyframe), np.nan, np.float32), pair.keyframe.image_size)
        without_depth = verify_pair(pair.query, no_depth_kf, VerificationConfig(), pair.cam_q, pair.cam_k)
        without_intrinsics = verify_pair(pair.query, no_depth_kf, VerificationConfig())
        sigmas = []
        for v, expected in ((with_depth, "metric"), (without_depth, "rotation"), (without_intrinsics, "keyframe")):
            assert v.passed
            prior, case = verified_prior(KEYFRAME_PRIOR, v, pair.mount_k, pair.mount_q, CONFIG)
            assert case == expected
            c = prior.covariance
            sigmas.append((math.sqrt(np.trace(c[3:, 3:]) / 3), math.sqrt(np.trace(c[:3, :3]) / 3)))
        (rot_m, pos_m), (rot_r, pos_r), (rot_k, pos_k) = sigmas
        assert rot_m < rot_r < rot_k and pos_m < pos_r < pos_k, sigmas


def _se3_exp(xi: np.ndarray) -> np.ndarray:
    """SE(3) exponential of (rho, phi)."""
    rho, phi = xi[:3], xi[3:]
    angle = float(np.linalg.norm(phi))
    K = np.array([[0, -phi[2], phi[1]], [phi[2], 0, -phi[0]], [-phi[1], phi[0], 0]])
    if angle < 1e-9:
        V = np.eye(3) + 0.5 * K
    else:
        V = np.eye(3) + (1 - math.cos(angle)) / angle ** 2 * K + (angle - math.sin(angle)) / angle ** 3 * K @ K
    return pose_matrix(so3_exp(phi), V @ rho)


def test_covariance_propagation_through_the_mounts_by_monte_carlo() -> None:
    """The fit's covariance (the query CAMERA's pose in the keyframe camera's frame, perturbed on the right) carried
    through a rear keyframe camera and a front query camera to the relative base pose and to the map: sampled true
    poses scatter as the propagated covariances say (first order: small perturbations)."""
    rng = np.random.default_rng(5)
    motion = pose_matrix(rpy_to_matrix(0.02, -0.01, math.pi - 0.2), np.array([1.2, -0.4, 0.05]))
    T_q_k = np.linalg.inv(FRONT) @ np.linalg.inv(motion) @ REAR
    A = rng.normal(size=(6, 6))
    cov_cam = (A @ A.T + np.eye(6)) * 1e-6  # correlated, anisotropic
    v = Verification(matches=100, inliers=90, model="pnp", R=T_q_k[:3, :3], t=T_q_k[:3, 3], metric=True,
                     passed=True, two_view_model="essential", pnp_inliers=60, covariance=cov_cam,
                     rotation_covariance=cov_cam[3:, 3:])
    config = VerifiedPriorConfig(min_sigma_m=1e-9, min_sigma_rad=1e-9)
    relative = relative_base_pose(v, REAR, FRONT, config)
    prior, case = verified_prior(KEYFRAME_PRIOR, v, REAR, FRONT, config)
    assert case == "metric"
    T_kc_qc = np.linalg.inv(T_q_k)
    L = np.linalg.cholesky(cov_cam)
    rel_err, map_err = [], []
    for _ in range(4000):
        true_kc_qc = T_kc_qc @ _se3_exp(L @ rng.normal(size=6))
        true_kb_qb = REAR @ true_kc_qc @ np.linalg.inv(FRONT)
        rho, phi = motion_error(relative.T, true_kb_qb)
        rel_err.append(np.r_[rho, phi])
        p, r = map_error(prior.position, quat_to_matrix(prior.orientation), KEYFRAME_POSE @ true_kb_qb)
        map_err.append(np.r_[p, r])
    for errors, predicted in ((rel_err, relative.covariance), (map_err, prior.covariance)):
        empirical = np.cov(np.array(errors).T)
        scale = np.sqrt(np.outer(np.diag(predicted), np.diag(predicted)))
        assert np.abs(empirical - predicted).max() / scale.max() < 0.08, (empirical, predicted)
        assert np.allclose(np.diag(empirical) / np.diag(predicted), 1.0, atol=0.1)
    # a different mount for the query camera gives a different covariance: the mount is not ignored
    other = relative_base_pose(v, REAR, REAR, config)
    assert not np.allclose(other.covariance, relative.covariance)


def test_so3_log_and_exp_round_trip() -> None:
    rng = np.random.default_rng(3)
    for angle in (1e-9, 1e-4, 0.3, 2.0, math.pi - 1e-5, math.pi):
        axis = rng.normal(size=3)
        phi = axis / np.linalg.norm(axis) * angle
        back = so3_log(so3_exp(phi))
        assert np.allclose(so3_exp(back), so3_exp(phi), atol=1e-9)
        assert abs(np.linalg.norm(back) - angle) < 1e-6


if __name__ == "__main__":  # the per-family statistics for the README
    print(json.dumps([summary(f) for f in FAMILIES], indent=1))
