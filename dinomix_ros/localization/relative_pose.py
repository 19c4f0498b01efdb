"""The relative camera motion between a keyframe and a query, from matched points: model fitting, model selection,
decomposition, refinement and the covariance of the result (ROS-free).

What it publishes is only what the data determine (:func:`fit_two_view`, :func:`fit_pnp`):

1. robust fits (OpenCV USAC MAGSAC++ on normalized coordinates): the essential matrix E and a homography H; the
   pair's keypoint noise from E's residuals (robust);
2. E refined (:func:`_essential_fit`): of its four decompositions the rotation that aligns the rays (``R f_k`` close
   to ``f_q``; the other turns them by 180 degrees about the baseline, decisive also for far points, where OpenCV's
   ``recoverPose`` and its ``distanceThresh`` fail); with little parallax more starts (the bas-relief valley);
3. did the camera move? When the parallax E leaves is small, a pure rotation fitted to E's inliers: if it explains
   them as well as E (F-test on their whitened residuals) the rotation is what is determined (model "rotation");
4. it moved: model selection as ORB-SLAM does it, both scored on the same matches (``S_M = sum(Gamma - d^2)`` over
   the matches whose error, in noise sigmas, is below the model's chi-square bound: the symmetric epipolar distances
   for E, the symmetric transfer errors for H), ``R_H = S_H / (S_H + S_E)``; above :data:`HOMOGRAPHY_RATIO`, and
   when H explains E's inliers as well as E does, the scene is a plane (an essential matrix of a plane has a
   degenerate second solution): the decompositions of H that put the points in front of both cameras (one or two),
   each refined on 8 dof; of two, the one the matches clearly support as an essential matrix, else both: two whose
   rotations disagree beyond their uncertainty make the pair AMBIGUOUS (no rotation is claimed), two that agree give
   their mean with a covariance that covers both (model "homography"); else E (model "essential"), the
   translation's sign from the points with parallax (zeros when too few have any);
5. every refinement on the model's own degrees of freedom (Levenberg-Marquardt, whitened residuals;
   :mod:`.pose_models`, :mod:`.refinement`), the inliers re-selected at 3 (1 dof) / 4 (2 dof) noise sigmas, and the
   covariance of the result, ``sigma^2 (J^T J)^-1``, widened by the rotations of other motions the data allow;
6. with keyframe depths, PnP (RANSAC, then refinement on 6 dof with reprojection errors) gives the metric motion
   when it has :data:`MIN_PNP_INLIERS` inliers of its own.

Covariances are over the perturbation of the QUERY camera's pose in the KEYFRAME camera's frame, on the right
(``T_kc_qc_true = T_kc_qc @ exp(xi)``, ``xi = (rho, phi)``), where ``T_kc_qc = inverse([R | t])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from dinomix_ros.localization.pose_models import (
    EssentialModel, Observations, PlaneModel, PnPModel, RotationModel, homogeneous, whitened_projection,
)
from dinomix_ros.localization.refinement import (
    INLIER_GATE, INLIER_GATES, TUKEY_SCALE, Refined, chi2_quantile, f_quantile, fit_covariance, levenberg_marquardt,
    refine_with_gate, robust_sigma, tukey_irls,
)
from dinomix_ros.localization.se3 import mean_rotation, so3_log

__all__ = ["MotionEstimate", "TwoViewInfo", "fit_two_view", "fit_pnp", "HOMOGRAPHY_RATIO", "MIN_PNP_INLIERS"]

#: ORB-SLAM's threshold on R_H = S_H / (S_H + S_E) (ORB-SLAM2 uses 0.40): above it, the homography.
HOMOGRAPHY_RATIO = 0.40
#: A metric (PnP) motion needs at least this many PnP inliers of its own (never the essential matrix's count). Chosen
#: on the NEES suite's few-depth pairs (300 pairs, depths on 5-25 random matches, outliers included; covariance from
#: the fit, its noise widened for the few residuals, plus the floors): with 6 inliers a 10.6 cm error came at NEES
#: 5.9, from 7 on every NEES stayed below 3; 8 keeps a margin (and 10 residual degrees of freedom for the noise).
MIN_PNP_INLIERS = 8
_MAX_GATE_FACTOR = 3.0  # the inlier gate never widens beyond 3 x verification.threshold_px
_VISIBLE_FRACTION = 0.9  # a plane decomposition must put 90 % of its inliers in front of both cameras
_CHI2_1, _CHI2_2 = 3.841, 5.991  # ORB-SLAM's 95 % bounds (1 and 2 dof) and its score Gamma (5.991)
_AGREE_QUANTILE = 0.99
_PARALLAX_SIGMAS = 3.0  # a point's parallax tells the side of the cameras it is on beyond 3 noise sigmas
_MIN_SIGN_VOTES = 5
_START_ITERATIONS = 3  # robust iterations from each start of the essential matrix (then the best goes on)
_SMALL_PARALLAX_RAD = math.radians(3.0)
_LIKELIHOOD_RATIO = 100.0  # evidence that tells two solutions apart
_DECOMPOSITION_MATCH_RAD = math.radians(0.5)  # an essential matrix this close to a homography's decomposition is it
_SAME_INLIERS = 0.8  # a model explains another's inliers when it has 80 % of them
# RANSAC iterations for the homography: a plane (or a rotation) is found within a few dozen; a 3-D scene runs to the
# limit, which OpenCV's default (2000-10000) made cost 10 ms per pair
_HOMOGRAPHY_ITERATIONS = 500


@dataclass(frozen=True)
class MotionEstimate:
    """A fitted relative motion ``X_q = R X_k + t`` and what the fit says about it.

    Attributes:
        model: "rotation" (pure rotation), "homography" (a plane's decomposition), "essential" or "pnp".
        R: (3, 3) rotation keyframe camera -> query camera (the mean of the solutions when ``ambiguous``).
        t: (3,) metres for "pnp"; else the unit direction when determined, zeros when not (pure rotation, an
            ambiguous plane, or no parallax to tell its sign).
        inliers: (N,) bool mask over the matches.
        sigma_px: the inliers' noise (pixels) estimated from the fit.
        rotation_covariance: (3, 3) of the rotation perturbation (see the module docstring).
        covariance: (6, 6) over (rho, phi) for "pnp", else None.
        alternatives: the rotations of every solution that explains the data (two for an ambiguous plane).
        ambiguous: solutions that disagree in rotation explain the data: no rotation is determined.
    """

    model: str
    R: np.ndarray
    t: np.ndarray
    inliers: np.ndarray
    sigma_px: float
    rotation_covariance: np.ndarray
    covariance: np.ndarray | None = None
    alternatives: tuple = ()
    ambiguous: bool = False

    @property
    def count(self) -> int:
        return int(self.inliers.sum())


@dataclass
class TwoViewInfo:
    """Model-selection details of a pair (reported in :class:`~.verification.Verification`)."""

    homography_ratio: float = math.nan
    parallax_deg: float = math.nan
    noise_px: float = math.nan
    translation_seen: bool = True
    candidates: dict = field(default_factory=dict)


def _scores(obs: Observations, E: np.ndarray | None, H: np.ndarray | None, sigma: float) -> tuple[float, float]:
    """ORB-SLAM's scores S_E and S_H on all matches, errors in noise sigmas (whitened with each point's noise)."""
    hk, hq = obs.hk, obs.hq
    s_e = s_h = 0.0
    inv2 = 1.0 / (sigma * sigma)
    if E is not None:
        lq, lk = hk @ E.T, hq @ E  # epipolar lines in the query and in the keyframe
        a = np.sum(hq * lq, axis=1)
        for line, C in ((lq, obs.Cq), (lk, obs.Ck)):
            g = line[:, :2]
            d2 = a * a / np.maximum(np.einsum("ni,nij,nj->n", g, C, g), 1e-300) * inv2
            s_e += float(np.sum(np.where(d2 < _CHI2_1, _CHI2_2 - d2, 0.0)))
    if H is not None:
        try:
            Hinv = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            return s_e, 0.0
        for src, dst, M, C in ((hk, obs.xq, H, obs.Cq), (hq, obs.xk, Hinv, obs.Ck)):
            p = src @ M.T
            with np.errstate(divide="ignore", invalid="ignore"):
                r = p[:, :2] / p[:, 2:3] - dst
            d2 = np.einsum("ni,nij,nj->n", r, np.linalg.inv(C), r) * inv2
            d2 = np.where(np.isfinite(d2) & (p[:, 2] > 0), d2, np.inf)
            s_h += float(np.sum(np.where(d2 < _CHI2_2, _CHI2_2 - d2, 0.0)))
    return s_e, s_h


def _refine(model, state, mask: np.ndarray, gate_px: float, max_gate_px: float, sigma_px: float | None = None,
            norms=None) -> Refined | None:
    """Refine a model (robustly on every match first when the noise ``sigma_px`` is known)."""
    every = np.ones(mask.shape[0], bool) if sigma_px is not None else None
    return refine_with_gate(model.evaluate, norms or model.norms, model.retract, state, mask, model.params, model.k,
                            gate_px, max_gate_px, robust_on=every, sigma_px=sigma_px)


def _kabsch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation that best maps unit rays ``a`` onto ``b`` (least squares)."""
    U, _, Vt = np.linalg.svd(b.T @ a)
    return U @ np.diag([1.0, 1.0, float(np.sign(np.linalg.det(U @ Vt)))]) @ Vt


def _rotation_block(refined: Refined, phi: slice) -> np.ndarray:
    return _covariance(refined)[phi, phi]


def _covariance(refined: Refined) -> np.ndarray:
    return fit_covariance(refined.jacobian, refined.sigma_px, refined.jacobian.shape[0] - refined.jacobian.shape[1])


def _decompositions(H: np.ndarray) -> tuple[list, list, list]:
    """All (up to four) decompositions ``(R, t / d, n)`` of a homography of normalized coordinates."""
    try:
        _, Rs, ts, ns = cv2.decomposeHomographyMat(H / np.linalg.svd(H, compute_uv=False)[1], np.eye(3))
    except cv2.error:
        return [], [], []
    return list(Rs), list(ts), list(ns)


def _plane_solutions(obs: Observations, H: np.ndarray, mask: np.ndarray) -> list[tuple]:
    """The decompositions of H that put at least 90 % of ``mask``'s points in front of both cameras."""
    h = obs.hk[mask]
    out = []
    Rs, ts, ns = _decompositions(H)
    for R, tau, n in zip(Rs, ts, ns):
        tau, n = tau.reshape(3), n.reshape(3)
        s = h @ n  # keyframe depth = d / s
        with np.errstate(divide="ignore", invalid="ignore"):
            zq = (h @ R.T)[:, 2] / s + tau[2]  # query depth / d
        visible = (s > 0) & (zq > 0)
        if visible.mean() >= _VISIBLE_FRACTION:
            out.append((R, tau, n / np.linalg.norm(n)))
    return out


def _rotation_fit(obs: Observations, start_mask: np.ndarray, gate_px: float, max_gate: float,
                  sigma0: float, quick: bool = False) -> Refined | None:
    """The pure rotation that best explains the matches (from the rays of ``start_mask``). ``quick``: least squares
    on ``start_mask``, then on those of its points within the gate of ``sigma0`` (enough to test whether the camera
    moved; no covariance)."""
    model = RotationModel(obs)
    start = _kabsch(obs.rays_k[start_mask], obs.rays_q[start_mask])
    if not quick:
        return _refine(model, start, start_mask, gate_px, max_gate)
    mask = start_mask & (model.norms(start) < max_gate)  # the widest gate first: gross outliers pull least squares
    for _ in range(2):  # those of the essential matrix's inliers the rotation explains, then again at its gate
        if mask.sum() * 2 <= 4:
            return None
        state, cost = levenberg_marquardt(model.evaluate, model.retract, start, mask, iterations=8)
        norms = model.norms(state)
        start, mask = state, start_mask & (norms < INLIER_GATES[2] * sigma0)
    return Refined(state, norms < INLIER_GATES[2] * sigma0, sigma0, cost, np.zeros((0, 3)), norms)


def _plane_fits(obs: Observations, H: np.ndarray, mask: np.ndarray, gate_px: float, max_gate: float,
                sigma0: float) -> list[Refined]:
    """Each decomposition of H that puts the points in front of both cameras, refined on the plane's 8 dof."""
    out = []
    for R, tau, n in _plane_solutions(obs, H, mask):
        refined = _refine(PlaneModel(obs), (R, tau, n), mask, gate_px, max_gate)
        if refined is not None:
            out.append(refined)
    return out


def _from_rotation(rotation: Refined) -> MotionEstimate:
    cov = _rotation_block(rotation, slice(0, 3))
    return MotionEstimate("rotation", rotation.state, np.zeros(3), rotation.inliers, rotation.sigma_px, cov,
                          alternatives=(rotation.state,))


def _from_planes(planes: list[Refined], others: list[np.ndarray] = ()) -> MotionEstimate:
    """One plane solution's rotation; two: their mean, with a covariance that covers both, ambiguous when they
    disagree beyond their uncertainty (see the module docstring, step 3). ``others``: rotations of other motions the
    data allow (the essential matrix's), which the covariance covers too."""
    covs = [_rotation_block(p, slice(0, 3)) for p in planes]
    rotations = [p.state[0] for p in planes]
    widen = sum((np.outer(d, d) for d in (so3_log(R @ mean_rotation(rotations).T) for R in others)), np.zeros((3, 3)))
    if len(planes) == 1:
        tau = planes[0].state[1]
        return MotionEstimate("homography", rotations[0], tau / max(np.linalg.norm(tau), 1e-12), planes[0].inliers,
                              planes[0].sigma_px, covs[0] + widen, alternatives=(rotations[0],))
    mean = mean_rotation(rotations)
    deltas = [so3_log(R @ mean.T) for R in rotations]
    diff = so3_log(rotations[0] @ rotations[1].T)
    d2 = float(diff @ np.linalg.solve(covs[0] + covs[1], diff))
    cover = sum(covs) / len(covs) + sum(np.outer(d, d) for d in deltas) + widen
    inliers = np.logical_or.reduce([p.inliers for p in planes])
    return MotionEstimate("homography", mean, np.zeros(3), inliers, max(p.sigma_px for p in planes), cover,
                          alternatives=tuple(rotations), ambiguous=d2 > chi2_quantile(_AGREE_QUANTILE, 3))


def _epipolar_choice(obs: Observations, planes: list[Refined], essential: Refined, sigma_px: float,
                     H: np.ndarray) -> tuple[list[Refined], list[np.ndarray]]:
    """What the essential matrix says about the plane solutions, on the truncated Sampson errors of every match, a point
    the motion puts behind a camera costing the most (no solution's own inlier set decides; "clearly": a likelihood
    ratio above 100:1; on the NEES suite's tilted planes the wrong solution never came out ahead by more than 2.6,
    without the cheirality term chance outliers made it 13.6 ahead):

    * of two plane solutions, the one that fits the matches clearly better as an essential matrix (points off the
      plane see the true motion), else both;
    * the essential matrix's own rotation is another motion the data allow when it is not clearly worse than the
      chosen solution and is not one of the homography's decompositions (on a plane the essential matrix has a
      degenerate second solution, the other decomposition, which the plane's visibility already ruled out; and with
      the freedom of a depth per point it fits a plane's noise better than the plane does, so a lower cost is no
      evidence against the plane).
    """
    model = EssentialModel(obs)
    cap = (INLIER_GATE * sigma_px) ** 2

    def cost(R: np.ndarray, t: np.ndarray) -> float:  # points behind a camera fit no motion (chance outliers do)
        t = t / max(float(np.linalg.norm(t)), 1e-12)
        e = model.norms((R, t))
        e[_behind(obs, R, t, sigma_px)] = np.inf
        return float(np.sum(np.minimum(e * e, cap))) / sigma_px ** 2

    margin = 2.0 * math.log(_LIKELIHOOD_RATIO)
    costs = [cost(p.state[0], p.state[1]) for p in planes]
    best = min(costs)
    chosen = [p for p, c in zip(planes, costs) if c <= best + margin]
    R_e = essential.state[0]
    near = max(_DECOMPOSITION_MATCH_RAD, 3.0 * math.sqrt(float(np.max(np.linalg.eigvalsh(_rotation_block(
        essential, slice(0, 3)))))))
    degenerate = any(np.linalg.norm(so3_log(R_e @ R.T)) < near for R in _decompositions(H)[0])
    plausible = cost(*essential.state) <= best + margin and not degenerate
    return chosen, ([R_e] if plausible else [])


def _homography_adequate(obs: Observations, H: np.ndarray, essential: Refined, sigma_px: float) -> bool:
    """Whether RANSAC's homography (not yet refined: its residuals can only shrink) explains the essential matrix's
    inliers about as well as the essential matrix: the plane's solutions are then worth refining (a cheap test first:
    a 3-D scene far away often scores R_H above 0.40)."""
    mask = essential.inliers
    p = obs.hk[mask] @ H.T
    r, _ = whitened_projection(p, None, H[:, :2], obs.xq[mask], obs.Ck[mask], obs.Cq[mask])
    e = np.linalg.norm(r, axis=1)
    inl = e < INLIER_GATES[2] * sigma_px
    if inl.sum() < _SAME_INLIERS * mask.sum():
        return False
    r_e, _ = EssentialModel(obs).evaluate(essential.state, np.flatnonzero(mask)[inl])
    d_h, d_e = 2 * int(inl.sum()) - 8, int(inl.sum()) - 5
    if d_h <= 0 or d_e <= 0:
        return False
    ratio = (float(np.sum(e[inl] ** 2)) / d_h) / max(float(r_e @ r_e) / d_e, 1e-300)
    return ratio <= f_quantile(_AGREE_QUANTILE, d_h, d_e)


def _worse_fit(a: Refined, b: Refined, dof_a: int, dof_b: int, mask: np.ndarray, evaluate_a, evaluate_b) -> bool:
    """Whether model ``a`` explains the points of ``mask`` significantly worse than model ``b`` (variance ratio of
    their whitened residuals, F-test at 99 %): ``a`` misses a motion that ``b`` sees."""
    ra, _ = evaluate_a(a.state, mask)
    rb, _ = evaluate_b(b.state, mask)
    da, db = ra.size - dof_a, rb.size - dof_b
    if da <= 0 or db <= 0:
        return False
    ratio = (float(ra @ ra) / da) / max(float(rb @ rb) / db, 1e-300)
    return ratio > f_quantile(_AGREE_QUANTILE, da, db)


def _essential_fit(obs: Observations, E: np.ndarray, mask: np.ndarray, gate_px: float, max_gate: float,
                   sigma0: float) -> tuple[Refined | None, list[np.ndarray]]:
    """RANSAC's essential matrix refined on 5 dof, or a better one found from other starts.

    With little parallax (far scenes) the essential matrix's cost has more than one basin (a sideways translation and
    a rotation about the orthogonal axis move the image alike, the bas-relief ambiguity): RANSAC's model may sit in
    the wrong one (seen: a forward translation 70 degrees from the true sideways one, the rotation 0.5 degrees off,
    three times the true residual, and a covariance that claimed the translation to 1.4 degrees). So RANSAC's model
    and translations along the camera's three axes (with RANSAC's rotation) are each refined robustly on every match,
    and the one with the lowest truncated cost (MSAC: every match counts, at most ``INLIER_GATE`` noise sigmas) is
    refined to the end (inliers re-selected, least squares). The extra starts are tried when the parallax is small
    (median below :data:`_SMALL_PARALLAX_RAD`): with more, the basins do not meet. Returns the refined model and
    the rotations of every start that ended about as likely (the data do not tell those motions apart).
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
        e[_behind(obs, state[0], state[1], sigma0)] = np.inf
        return e

    every = np.ones(len(obs), bool)
    cap = (INLIER_GATE * sigma0) ** 2
    t0 = t.reshape(3) / np.linalg.norm(t)
    starts = [t0] + (list(np.eye(3)) if _median_parallax(obs, R, mask) < _SMALL_PARALLAX_RAD else [])
    screened = []
    for t0 in starts:  # a few robust steps from each start (cheirality only at the end: cheaper, same choice)
        state = tukey_irls(model.evaluate, model.norms, model.retract, (R, t0), every, TUKEY_SCALE * sigma0, 1,
                           iterations=_START_ITERATIONS)
        screened.append((float(np.sum(np.minimum(norms(state) ** 2, cap))), state))
    best_cost, best = min(screened, key=lambda c: c[0])
    best = tukey_irls(model.evaluate, norms, model.retract, best, every, TUKEY_SCALE * sigma0, 1, iterations=5)
    refined = refine_with_gate(model.evaluate, norms, model.retract, best, norms(best) < INLIER_GATE * sigma0,
                               model.params, 1, INLIER_GATE * sigma0, max_gate)
    # other starts that explain the matches about as well (within a likelihood ratio of 100) are other motions the
    # data allow: their rotations widen the covariance
    plausible = [s[0] for c, s in screened if c - best_cost <= 2.0 * math.log(_LIKELIHOOD_RATIO) * sigma0 ** 2]
    return refined, plausible


def _from_essential(obs: Observations, refined: Refined, plausible: list[np.ndarray],
                    info: TwoViewInfo) -> MotionEstimate:
    """The refined essential matrix's rotation, with a covariance that also covers the other plausible motions'
    rotations, and its translation's sign from the points with parallax."""
    R, t = refined.state
    t, info.parallax_deg = _translation_sign(obs, R, t, refined.inliers, refined.sigma_px)
    cov = _rotation_block(refined, slice(0, 3))
    for other in plausible:
        delta = so3_log(other @ R.T)
        cov = cov + np.outer(delta, delta)
    return MotionEstimate("essential", R, t, refined.inliers, refined.sigma_px, cov, alternatives=(R,))


def _median_parallax(obs: Observations, R: np.ndarray, mask: np.ndarray) -> float:
    """The median angle (rad) between the query's rays and the keyframe's rotated by ``R``: what translation left."""
    return float(np.median(np.arccos(np.clip(np.sum((obs.rays_k[mask] @ R.T) * obs.rays_q[mask], axis=1), -1.0,
                                             1.0))))


def _triangulate(obs: Observations, R: np.ndarray, t: np.ndarray, mask: np.ndarray | slice = slice(None)
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


def _behind(obs: Observations, R: np.ndarray, t: np.ndarray, sigma_px: float) -> np.ndarray:
    """Points with parallax enough to tell that the motion puts them behind a camera (with the sign of ``t`` that
    puts the majority in front: the essential matrix does not tell its sign)."""
    lam_k, lam_q, cos = _triangulate(obs, R, t)
    usable = cos < math.cos(_PARALLAX_SIGMAS * sigma_px / obs.focal)
    front = usable & (lam_k > 0) & (lam_q > 0)
    behind = usable & (lam_k < 0) & (lam_q < 0)
    if behind.sum() > front.sum():
        front = behind
    return usable & ~front


def _translation_sign(obs: Observations, R: np.ndarray, t: np.ndarray, mask: np.ndarray,
                      sigma_px: float) -> tuple[np.ndarray, float]:
    """(t with the sign that puts the points in front of both cameras, or zeros when too few points have parallax
    enough to tell; the median parallax of the inliers in degrees)."""
    lam_k, lam_q, cos = _triangulate(obs, R, t, mask)
    parallax = np.arccos(cos)
    median = math.degrees(float(np.median(parallax))) if parallax.size else math.nan
    usable = parallax > _PARALLAX_SIGMAS * sigma_px / obs.focal
    front = int(np.sum(usable & (lam_k > 0) & (lam_q > 0)))
    behind = int(np.sum(usable & (lam_k < 0) & (lam_q < 0)))
    if max(front, behind) < _MIN_SIGN_VOTES or front == behind:
        return np.zeros(3), median
    return (t if front > behind else -t), median


def _noise_from_essential(obs: Observations, E: np.ndarray, max_gate: float) -> float:
    """The pair's keypoint noise from RANSAC's essential matrix: a robust estimate over every match."""
    R1, _, t = cv2.decomposeEssentialMat(E)
    return robust_sigma(EssentialModel(obs).norms((R1, t.reshape(3) / np.linalg.norm(t))), 1, max_gate)


def fit_two_view(obs: Observations, threshold_px: float,
                 confidence: float) -> tuple[MotionEstimate | None, TwoViewInfo]:
    """The relative motion of a calibrated pair without depth (see the module docstring, steps 1-5).

    Args:
        obs: the putative matches with their noise.
        threshold_px: RANSAC's inlier threshold (pixels).
        confidence: RANSAC's confidence.

    Returns:
        (the estimate, None when nothing fits; the model-selection details).
    """
    info = TwoViewInfo()
    thr = threshold_px / obs.focal
    max_gate = _MAX_GATE_FACTOR * threshold_px
    E, mask_e = cv2.findEssentialMat(obs.xk, obs.xq, np.eye(3), cv2.USAC_MAGSAC, confidence, thr)
    if E is None or mask_e is None or E.shape != (3, 3):
        E, mask_e = None, None
    # the homography on normalized coordinates scaled back to pixels (USAC's homography finds nothing with a
    # threshold of a few thousandths), then brought to normalized coordinates
    S = np.diag([obs.focal, obs.focal, 1.0])
    H, mask_h = cv2.findHomography(obs.xk * obs.focal, obs.xq * obs.focal, cv2.USAC_MAGSAC, threshold_px,
                                   maxIters=_HOMOGRAPHY_ITERATIONS, confidence=confidence)
    if H is None or mask_h is None or not np.isfinite(H).all() or not mask_h.any():
        H, mask_h = None, None
    else:
        H = np.linalg.inv(S) @ H @ S
    if E is None and H is None:
        return None, info
    m_e = mask_e.reshape(-1).astype(bool) if mask_e is not None else None
    m_h = mask_h.reshape(-1).astype(bool) if mask_h is not None else None
    sigma = _noise_from_essential(obs, E, max_gate) if E is not None and m_e.sum() > 6 else threshold_px / 2.0
    info.noise_px = sigma
    s_e, s_h = _scores(obs, E, H, sigma)
    info.homography_ratio = s_h / (s_h + s_e) if s_h + s_e > 0 else math.nan
    info.candidates = {"essential": int(m_e.sum()) if m_e is not None else 0,
                       "homography": int(m_h.sum()) if m_h is not None else 0}
    essential, plausible = _essential_fit(obs, E, m_e, threshold_px, max_gate, sigma) if E is not None and \
        m_e.sum() >= 6 else (None, [])
    # a pure rotation is only worth fitting when the parallax left by the essential matrix's rotation is small
    start = essential.inliers if essential is not None else m_h
    small = essential is None or _median_parallax(obs, essential.state[0], essential.inliers) < _SMALL_PARALLAX_RAD
    rotation = _rotation_fit(obs, start, threshold_px, max_gate, sigma, quick=True) if small and \
        start is not None and start.sum() >= 4 else None
    if rotation is not None:
        info.candidates["rotation"] = int(rotation.inliers.sum())
    if essential is None:
        rotation = _rotation_fit(obs, start, threshold_px, max_gate, sigma) if rotation is not None else None
        return (_from_rotation(rotation) if rotation is not None else None), info
    R_model, E_model = RotationModel(obs), EssentialModel(obs)
    # did the camera move? The rotation explains most of the essential matrix's inliers as well as it does:
    # a pure rotation (or too little parallax to tell), the rotation is what is determined
    common = essential.inliers & rotation.inliers if rotation is not None else None
    if rotation is not None and common.sum() >= _SAME_INLIERS * essential.inliers.sum() and \
            not _worse_fit(rotation, essential, 3, 5, common, R_model.evaluate, E_model.evaluate):
        info.translation_seen = False
        rotation = _rotation_fit(obs, essential.inliers, threshold_px, max_gate, sigma)  # now to the end
        if rotation is not None:
            return _from_rotation(rotation), info
    info.translation_seen = True
    # it moved; a plane (or a scene far away) explains the matches as well as the essential matrix: the plane's
    # decompositions, which do not put the rotation in an essential matrix's degenerate family
    if H is not None and m_h.sum() >= 8 and info.homography_ratio > HOMOGRAPHY_RATIO and \
            _homography_adequate(obs, H, essential, sigma):
        planes = _plane_fits(obs, H, m_h, threshold_px, max_gate, sigma)
        if planes:
            best = min(planes, key=lambda p: p.ssr / max(2 * int(p.inliers.sum()) - 8, 1))
            common = best.inliers & essential.inliers
            if common.sum() >= _SAME_INLIERS * essential.inliers.sum() and \
                    not _worse_fit(best, essential, 8, 5, common, PlaneModel(obs).evaluate, E_model.evaluate):
                return _from_planes(*_epipolar_choice(obs, planes, essential, sigma, H)), info
    return _from_essential(obs, essential, plausible, info), info


def fit_pnp(obs: Observations, depths: np.ndarray, threshold_px: float, confidence: float) -> MotionEstimate | None:
    """The metric motion from keyframe depths: PnP RANSAC (SQPnP), then 6-dof refinement on the reprojection errors
    with re-selected inliers; None with fewer than :data:`MIN_PNP_INLIERS` inliers.

    Args:
        obs: the putative matches with their noise.
        depths: (N,) keyframe depth of each match (metres along the optical axis; NaN or <= 0: unknown).
        threshold_px: RANSAC's inlier threshold (pixels).
        confidence: RANSAC's confidence.
    """
    has = np.isfinite(depths) & (depths > 0)
    if has.sum() < max(MIN_PNP_INLIERS, 6):
        return None
    idx = np.flatnonzero(has)
    X = homogeneous(obs.xk[idx]) * depths[idx, None]
    try:
        ok, rvec, tvec, inl = cv2.solvePnPRansac(X, obs.xq[idx], np.eye(3), None, iterationsCount=1000,
                                                 reprojectionError=threshold_px / obs.focal, confidence=confidence,
                                                 flags=cv2.SOLVEPNP_SQPNP)
    except cv2.error:
        return None
    if not ok or inl is None or len(inl) < 6:
        return None
    mask = np.zeros(len(obs), bool)
    mask[idx[inl.reshape(-1)]] = True
    model = PnPModel(obs, np.where(has, depths, 1.0))
    state = (cv2.Rodrigues(rvec)[0], tvec.reshape(3).astype(np.float64))
    refined = _refine_subset(model, state, mask, has, threshold_px, _MAX_GATE_FACTOR * threshold_px)
    if refined is None or refined.inliers.sum() < MIN_PNP_INLIERS:
        return None
    cov = _covariance(refined)
    R, t = refined.state
    return MotionEstimate("pnp", R, t, refined.inliers, refined.sigma_px, cov[3:, 3:], covariance=cov,
                          alternatives=(R,))


def _refine_subset(model: PnPModel, state, mask: np.ndarray, allowed: np.ndarray, gate_px: float,
                   max_gate: float) -> Refined | None:
    """Refinement restricted to the points with depth."""
    def norms(s):
        e = model.norms(s)
        e[~allowed] = np.inf
        return e
    return refine_with_gate(model.evaluate, norms, model.retract, state, mask, model.params, model.k, gate_px,
                            max_gate)
