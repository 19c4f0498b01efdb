"""The essential matrix's basins: the calibrated two-view motion with the lowest robust cost, found from many starts,
the other motions that explain the matches about as well, and the cheirality of points under a motion (ROS-free).

Used by :mod:`.relative_pose` (see its docstring, step 2). The residual is the Sampson error with each point's noise
(:class:`~.pose_models.EssentialModel`); costs are truncated (MSAC) in units of the pair's noise, so that a
difference of costs is twice a log-likelihood ratio.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from dinomix_ros.localization.pose_models import EssentialModel, Observations
from dinomix_ros.localization.refinement import (
    INLIER_GATE, TUKEY_SCALE, Refined, refine_with_gate, robust_sigma, tukey_irls, tukey_irls_batch,
)
from dinomix_ros.localization.se3 import so3_log

__all__ = ["essential_fit", "hemisphere", "behind", "triangulate", "translation_sign", "median_parallax",
           "noise_from_essential", "LIKELIHOOD_RATIO", "MARGIN", "MARGIN_PER_MATCH"]

#: Evidence that tells two solutions apart: a likelihood ratio of 100, as a difference of truncated costs in noise
#: variances (``2 ln 100`` = 9.2) ...
LIKELIHOOD_RATIO = 100.0
MARGIN = 2.0 * math.log(LIKELIHOOD_RATIO)
#: ... and at least this much per match: the noise model (one isotropic level for every keypoint) is not the keypoints'
#: (ORB's pyramid levels, anisotropic noise on slanted surfaces), and its error grows with the matches. Measured on the
#: real posed pairs: on a plane, whose two decompositions explain every match exactly, the wrong one's Sampson cost
#: came out 0.10-0.17 noise variances per match lower (23 and 37 over 227 and 218 matches); a 3-D scene near a plane
#: with 164 matches had a wrong basin (2.2 degrees, translation 59 degrees off) 15.7 ahead of the true one.
MARGIN_PER_MATCH = 0.2
_START_ITERATIONS = 3  # robust iterations from each start of the essential matrix (then the best go on)
_GRID_DIRECTIONS = 16  # translation directions the essential matrix is started from
_BASINS = 3  # distinct starts refined to convergence
_BASIN_ITERATIONS = 10
# matches the starts are screened on, and the best ones converge on (ranking basins needs no more; 1000 features
# give 500+ matches, and the cost of the batched steps grows with them: 7 of the 35 ms of verification per frame)
_SCREEN_POINTS, _BASIN_POINTS = 200, 300
_SAME_ROTATION_RAD, _SAME_TRANSLATION_RAD = math.radians(0.2), math.radians(2.0)
_PARALLAX_SIGMAS = 3.0  # a point's parallax tells the side of the cameras it is on beyond 3 noise sigmas
_MIN_SIGN_VOTES = 5


def hemisphere(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread evenly over the hemisphere z > 0 (a Fibonacci lattice): translation directions
    (an essential matrix does not tell ``t`` from ``-t``)."""
    i = np.arange(n) + 0.5
    z = i / n
    angle = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.c_[r * np.cos(angle), r * np.sin(angle), z]


#: translation directions the essential matrix is also started from (see :func:`essential_fit`)
_DIRECTIONS = hemisphere(_GRID_DIRECTIONS)


def essential_fit(obs: Observations, E: np.ndarray, mask: np.ndarray, extra_starts: list[tuple], max_gate: float,
                  sigma0: float) -> tuple[Refined | None, list[np.ndarray]]:
    """The essential matrix with the lowest robust cost over every match, from several starts, refined on 5 dof.

    The cost of an essential matrix has more than one basin: with little parallax a sideways translation and a
    rotation about the orthogonal axis move the image alike (the bas-relief ambiguity), and a scene near a plane has
    a second solution (the homography's other decomposition). RANSAC's model may sit in the wrong one (seen on the
    real posed pairs: 3-8 degrees off, with a covariance that claimed 0.1 degree, while another start reached the
    true motion at a clearly lower cost). So the model is started from RANSAC's essential matrix, from
    ``extra_starts`` ((R, t) pairs: the homography's decompositions) and from translations spread over the hemisphere
    (with RANSAC's rotation); each start takes a few robust steps (Tukey; all starts at once, on an evenly spread
    subset of at most :data:`_SCREEN_POINTS` matches), the :data:`_BASINS` best distinct ones go on to convergence
    (on at most :data:`_BASIN_POINTS`), and the one with the lowest truncated cost (MSAC: every match counts, at most
    ``INLIER_GATE`` noise sigmas; a point the motion puts behind a camera costs the most) is refined to the end on
    every match (inliers re-selected, least squares).

    Returns:
        (the refined model or None, the rotations of the other basins whose cost is within a likelihood ratio of
        :data:`LIKELIHOOD_RATIO` of the best: motions the data do not tell apart from it).
    """
    try:
        R1, R2, t = cv2.decomposeEssentialMat(E)
    except cv2.error:
        return None, []
    rays_k, rays_q = obs.rays_k[mask], obs.rays_q[mask]
    R = max((R1, R2), key=lambda Rc: float(np.median(np.sum((rays_k @ Rc.T) * rays_q, axis=1))))
    model = EssentialModel(obs)

    def norms(state: tuple) -> np.ndarray:  # a point that the motion puts behind a camera is no inlier
        e = model.norms(state)
        e[behind(obs, state[0], state[1], sigma0)] = np.inf
        return e

    starts = [(R, t.reshape(3) / np.linalg.norm(t))]
    for Rs, ts in extra_starts:
        ts = np.asarray(ts, dtype=np.float64).reshape(3)
        norm = float(np.linalg.norm(ts))
        if norm > 1e-9 and not any(np.allclose(Rs, s[0]) and abs(float(s[1] @ ts)) > 0.999 * norm for s in starts):
            starts.append((np.asarray(Rs, dtype=np.float64), ts / norm))
    starts += [(R, d) for d in _DIRECTIONS]
    # a few robust steps from every start at once on at most _SCREEN_POINTS of the matches, then the best distinct
    # ones to convergence on at most _BASIN_POINTS (their costs, on the same matches, rank the basins; cheirality only
    # in the costs: cheaper, same choice); the best one is refined on every match
    few, some = _subset(obs, _SCREEN_POINTS), _subset(obs, _BASIN_POINTS)
    few_model, some_model = EssentialModel(few), EssentialModel(some)
    screened, _ = tukey_irls_batch(few_model.batch_terms, few_model.batch_retract,
                                   (np.stack([s[0] for s in starts]), np.stack([s[1] for s in starts])),
                                   TUKEY_SCALE * sigma0, _START_ITERATIONS)
    order = np.argsort(_batch_costs(few, few_model, screened, sigma0)[0])
    keep: list[int] = []
    for i in order:
        if len(keep) == _BASINS:
            break
        if not any(_same_motion((screened[0][i], screened[1][i]), (screened[0][j], screened[1][j])) for j in keep):
            keep.append(int(i))
    converged, _ = tukey_irls_batch(some_model.batch_terms, some_model.batch_retract,
                                    (screened[0][keep], screened[1][keep]), TUKEY_SCALE * sigma0, _BASIN_ITERATIONS)
    costs, counts = _batch_costs(some, some_model, converged, sigma0)
    basins = [(float(costs[i]), (converged[0][i], converged[1][i])) for i in range(len(keep))]
    b = int(np.argmin(costs))
    best_cost, best = basins[b]
    best_state = tukey_irls(model.evaluate, norms, model.retract, best, np.ones(len(obs), bool),
                            TUKEY_SCALE * sigma0, 1, iterations=5)
    refined = refine_with_gate(model.evaluate, norms, model.retract, best_state,
                               norms(best_state) < INLIER_GATE * sigma0, model.params, 1, INLIER_GATE * sigma0,
                               max_gate, leverage=True)
    # other basins that explain the matches about as well (within a likelihood ratio of 100, or the noise model's
    # error) are other motions the data allow
    margin = max(MARGIN, MARGIN_PER_MATCH * int(counts[b]))
    plausible = [s[0] for c, s in basins if s is not best and c - best_cost <= margin * sigma0 ** 2]
    return refined, plausible


def _subset(obs: Observations, n: int) -> Observations:
    """At most ``n`` of the matches, evenly spread over their order (all of them when there are fewer)."""
    if len(obs) <= n:
        return obs
    idx = np.linspace(0, len(obs) - 1, n).round().astype(int)
    return Observations(obs.xk[idx], obs.xq[idx], obs.Ck[idx], obs.Cq[idx], obs.focal)


def _batch_costs(obs: Observations, model: EssentialModel, states: tuple, sigma0: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(K,) truncated costs (MSAC: squared Sampson errors capped at ``INLIER_GATE`` noise sigmas; a point the motion
    puts behind a camera costs the cap) of K essential-matrix states, and (K,) their inlier counts."""
    e, _ = model.batch_terms(states, jacobian=False)
    cap = (INLIER_GATE * sigma0) ** 2
    out, counts = np.empty(e.shape[0]), np.empty(e.shape[0], int)
    for k in range(e.shape[0]):
        ek = np.minimum(e[k] ** 2, cap)
        ek[behind(obs, states[0][k], states[1][k], sigma0)] = cap
        out[k], counts[k] = float(np.sum(ek)), int(np.sum(ek < cap))
    return out, counts


def _same_motion(a: tuple, b: tuple) -> bool:
    """Two essential-matrix states in one basin (rotations within 0.2 degrees, translations within 2 degrees)."""
    return float(np.linalg.norm(so3_log(a[0] @ b[0].T))) < _SAME_ROTATION_RAD and \
        abs(float(a[1] @ b[1])) > math.cos(_SAME_TRANSLATION_RAD)


def median_parallax(obs: Observations, R: np.ndarray, mask: np.ndarray) -> float:
    """The median angle (rad) between the query's rays and the keyframe's rotated by ``R``: what translation left."""
    return float(np.median(np.arccos(np.clip(np.sum((obs.rays_k[mask] @ R.T) * obs.rays_q[mask], axis=1), -1.0,
                                             1.0))))


def triangulate(obs: Observations, R: np.ndarray, t: np.ndarray, mask: np.ndarray | slice = slice(None)
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth along the keyframe ray, depth along the query ray, cosine of the parallax angle) of each point: the
    least-squares ``lambda_q f_q = lambda_k R f_k + t`` (2x2 normal equations per point; unit rays, unit or metric
    ``t``)."""
    u = obs.rays_k[mask] @ R.T
    f = obs.rays_q[mask]
    c = np.clip(np.sum(u * f, axis=1), -1.0, 1.0)
    det = np.maximum(1.0 - c * c, 1e-15)
    b0, b1 = -(u @ t), f @ t
    return (b0 + c * b1) / det, (c * b0 + b1) / det, c


def behind(obs: Observations, R: np.ndarray, t: np.ndarray, sigma_px: float) -> np.ndarray:
    """Points with parallax enough to tell that the motion puts them behind a camera (with the sign of ``t`` that
    puts the majority in front: the essential matrix does not tell its sign)."""
    lam_k, lam_q, cos = triangulate(obs, R, t)
    usable = cos < math.cos(_PARALLAX_SIGMAS * sigma_px / obs.focal)
    front = usable & (lam_k > 0) & (lam_q > 0)
    back = usable & (lam_k < 0) & (lam_q < 0)
    if back.sum() > front.sum():
        front = back
    return usable & ~front


def translation_sign(obs: Observations, R: np.ndarray, t: np.ndarray, mask: np.ndarray,
                     sigma_px: float) -> tuple[np.ndarray, float]:
    """(t with the sign that puts the points in front of both cameras, or zeros when too few points have parallax
    enough to tell; the median parallax of the inliers in degrees)."""
    lam_k, lam_q, cos = triangulate(obs, R, t, mask)
    parallax = np.arccos(cos)
    median = math.degrees(float(np.median(parallax))) if parallax.size else math.nan
    usable = parallax > _PARALLAX_SIGMAS * sigma_px / obs.focal
    front = int(np.sum(usable & (lam_k > 0) & (lam_q > 0)))
    back = int(np.sum(usable & (lam_k < 0) & (lam_q < 0)))
    if max(front, back) < _MIN_SIGN_VOTES or front == back:
        return np.zeros(3), median
    return (t if front > back else -t), median


def noise_from_essential(obs: Observations, E: np.ndarray, max_gate: float) -> float:
    """The pair's keypoint noise from RANSAC's essential matrix: a robust estimate over every match."""
    R1, _, t = cv2.decomposeEssentialMat(E)
    return robust_sigma(EssentialModel(obs).norms((R1, t.reshape(3) / np.linalg.norm(t))), 1, max_gate)
