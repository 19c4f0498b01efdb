"""The relative camera motion between a keyframe and a query, from matched points: model fitting, model selection,
decomposition, refinement and the covariance of the result (ROS-free).

What it publishes is only what the data determine (:func:`fit_two_view`, :func:`fit_pnp`):

1. robust fits (OpenCV USAC MAGSAC++ on normalized coordinates): the essential matrix E and a homography H; the
   pair's keypoint noise from E's residuals (robust);
2. E's basins (:func:`~.essential_basins.essential_fit`): E refined from RANSAC's model, from H's decompositions and
   from translations spread over the hemisphere, the one with the lowest robust cost kept (of its decompositions
   the rotation that aligns the rays, decisive also for far points, where OpenCV's ``recoverPose`` and its
   ``distanceThresh`` fail), the other basins within a likelihood ratio of 100 kept as motions the data allow (a
   wrong basin of RANSAC's model is the bas-relief valley of small parallax, or a plane's second solution);
3. did the camera move? When the parallax E leaves is small, a pure rotation fitted to E's inliers: if it explains
   them as well as E (F-test on their whitened residuals) the rotation is what is determined (model "rotation");
4. it moved; when H explains E's inliers as well as E does (the same points, an F-test on their residuals), the
   scene may be a plane: its decompositions that put the points in front of both cameras (one or two), each refined
   on 8 dof. Only the points OFF the plane tell them apart (:func:`_plane_choice`; on the plane both fit exactly);
   E explaining enough of those makes it a 3-D scene near a plane (E's motion, step 5); a solution that explains
   clearly fewer of them, or puts clearly more of the plane's points behind a camera, is ruled out. The remaining
   solutions and E's rotation (without depth nothing tells a plane from a shallow 3-D scene) give their mean with a
   covariance that covers them all (model "homography"), or, when two of them disagree (:func:`_disagree`: beyond
   their uncertainty and by more than 2 degrees), an AMBIGUOUS pair: no rotation is claimed. ORB-SLAM's score ratio
   ``R_H = S_H / (S_H + S_E)`` is reported, not used to decide: a plane scores about 0.44, on either side of its
   0.40 (seen on the real posed pairs);
5. else E (model "essential"): its rotation, ambiguous when another basin's rotation disagrees with it, else with a
   covariance widened to cover them; the translation's sign from the points with parallax (zeros when too few have
   any);
6. every refinement on the model's own degrees of freedom (Levenberg-Marquardt, whitened residuals;
   :mod:`.pose_models`, :mod:`.refinement`), the inliers re-selected at 3 (1 dof) / 4 (2 dof) noise sigmas (for E
   without the points that decide a direction of the model alone: high leverage), and the covariance of the result,
   ``sigma^2 (J^T J)^-1``, widened by the rotations of other motions the data allow;
7. with keyframe depths, PnP (RANSAC, then refinement on 6 dof with reprojection errors) gives the metric motion
   when it has :data:`MIN_PNP_INLIERS` inliers of its own.

Covariances are over the perturbation of the QUERY camera's pose in the KEYFRAME camera's frame, on the right
(``T_kc_qc_true = T_kc_qc @ exp(xi)``, ``xi = (rho, phi)``), where ``T_kc_qc = inverse([R | t])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from dinomix_ros.localization.essential_basins import (
    behind, essential_fit, median_parallax, noise_from_essential, translation_sign,
)
from dinomix_ros.localization.pose_models import (
    EssentialModel, Observations, PlaneModel, PnPModel, RotationModel, homogeneous, whitened_projection,
)
from dinomix_ros.localization.refinement import (
    INLIER_GATE, INLIER_GATES, Refined, chi2_quantile, f_quantile, fit_covariance, levenberg_marquardt,
    refine_with_gate,
)
from dinomix_ros.localization.se3 import mean_rotation, so3_log

__all__ = ["MotionEstimate", "TwoViewInfo", "fit_two_view", "fit_pnp", "MIN_PNP_INLIERS"]

#: A metric (PnP) motion needs at least this many PnP inliers of its own (never the essential matrix's count). Chosen
#: on the NEES suite's few-depth pairs (300 pairs, depths on 5-25 random matches, outliers included; covariance from
#: the fit, its noise widened for the few residuals, plus the floors): with 6 inliers a 10.6 cm error came at NEES
#: 5.9, from 7 on every NEES stayed below 3; 8 keeps a margin (and 10 residual degrees of freedom for the noise).
MIN_PNP_INLIERS = 8
_MAX_GATE_FACTOR = 3.0  # the inlier gate never widens beyond 3 x verification.threshold_px
_VISIBLE_FRACTION = 0.9  # a plane decomposition must put 90 % of its inliers in front of both cameras
_CHI2_1, _CHI2_2 = 3.841, 5.991  # ORB-SLAM's 95 % bounds (1 and 2 dof) and its score Gamma (5.991)
_AGREE_QUANTILE = 0.99
_SMALL_PARALLAX_RAD = math.radians(3.0)
_SAME_INLIERS = 0.8  # a model explains another's inliers when it has 80 % of them
# a point is off the plane when the plane misses it by twice its inlier gate (8 noise sigmas): the noise is one level
# for all keypoints, but ORB's coarse pyramid levels are noisier (1.2 x per level), and a plane's inliers reach 4-7
# sigmas (seen on the real posed pairs: those tails, not points off the plane, voted for the wrong decomposition)
_OFF_PLANE = 2.0
_MIN_OFF_PLANE = 5  # points off a plane that tell its solutions apart (see _plane_choice)
_MIN_BEHIND = 3  # a plane solution that puts this many more of the plane's points behind a camera is ruled out
_AGREE_RAD = math.radians(2.0)  # solutions closer than this are one rotation (see _disagree)
_RATIO_FLOOR = 1.5  # a 2-D model is worse than the essential matrix beyond this variance ratio (see _worse_fit)
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


def _from_rotation(rotation: Refined, essential: Refined | None = None) -> MotionEstimate:
    """The pure rotation's estimate. When the essential matrix explains the matches as well (a translation too small
    to tell, e.g. 0.5 m sideways with the scene 30-120 m away), the rotation absorbed the parallax the translation
    left (the bas-relief trade; seen: 0.54 degrees off at a claimed 0.02): the essential matrix's rotation is another
    motion the data allow, the covariance covers it (ambiguous when they disagree, :func:`_disagree`)."""
    cov = _rotation_block(rotation, slice(0, 3))
    R = rotation.state
    if essential is not None:
        R_e, cov_e = essential.state[0], _rotation_block(essential, slice(0, 3))
        d = so3_log(R_e @ R.T)
        if _disagree([R, R_e], [cov, cov_e]):
            return MotionEstimate("rotation", R, np.zeros(3), rotation.inliers, rotation.sigma_px,
                                  cov + np.outer(d, d), alternatives=(R, R_e), ambiguous=True)
        cov = cov + np.outer(d, d)
    return MotionEstimate("rotation", R, np.zeros(3), rotation.inliers, rotation.sigma_px, cov, alternatives=(R,))


def _disagree(rotations: list[np.ndarray], covs: list[np.ndarray]) -> bool:
    """Whether two of the rotations differ beyond their uncertainty (chi-square at 99 % on the sum of their
    covariances) AND by more than :data:`_AGREE_RAD`: solutions closer than that are one rotation whose covariance
    covers them all (statistically distinct basins a fraction of a degree apart occur in far scenes)."""
    bound = chi2_quantile(_AGREE_QUANTILE, 3)
    for i in range(len(rotations)):
        for j in range(i + 1, len(rotations)):
            d = so3_log(rotations[i] @ rotations[j].T)
            if float(np.linalg.norm(d)) > _AGREE_RAD and float(d @ np.linalg.solve(covs[i] + covs[j], d)) > bound:
                return True
    return False


def _from_planes(planes: list[Refined], others: list[tuple[np.ndarray, np.ndarray]] = ()) -> MotionEstimate:
    """The plane solutions' rotation, with a covariance that covers every motion the data allow (the plane solutions
    and ``others``, (rotation, covariance) of other motions: the essential matrix's); AMBIGUOUS when two of them
    disagree (:func:`_disagree`): no rotation is claimed. One plane solution alone: its rotation and translation
    direction; more: their mean, no translation."""
    covs = [_rotation_block(p, slice(0, 3)) for p in planes]
    rotations = [p.state[0] for p in planes]
    every_rotation, every_cov = rotations + [o[0] for o in others], covs + [o[1] for o in others]
    ambiguous = _disagree(every_rotation, every_cov)
    mean = mean_rotation(rotations)
    cover = sum(covs) / len(covs) + sum(np.outer(d, d) for d in (so3_log(R @ mean.T) for R in every_rotation))
    inliers = np.logical_or.reduce([p.inliers for p in planes])
    t = np.zeros(3)
    if len(planes) == 1 and not ambiguous:
        tau = planes[0].state[1]
        t = tau / max(np.linalg.norm(tau), 1e-12)
    return MotionEstimate("homography", mean, t, inliers, max(p.sigma_px for p in planes), cover,
                          alternatives=tuple(every_rotation) if ambiguous else (mean,), ambiguous=ambiguous)


def _plane_behind(obs: Observations, plane: Refined) -> int:
    """How many of the plane's inliers its solution puts behind a camera (a point on the plane is behind the keyframe
    camera when ``n . x_k <= 0``, behind the query camera when its depth there is negative)."""
    R, tau, n = plane.state
    h = obs.hk[plane.inliers]
    s = h @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        zq = (h @ R.T)[:, 2] / s + tau[2]
    return int(np.sum(~((s > 0) & (zq > 0))))


def _plane_choice(obs: Observations, planes: list[Refined], essential: Refined, sigma_px: float,
                  H: np.ndarray) -> tuple[list[Refined], list[tuple[np.ndarray, np.ndarray]]] | None:
    """Which motions the matches allow when a plane explains them, told apart by the points OFF the plane only (the
    plane misses them by more than :data:`_OFF_PLANE` x its inlier gate).

    Every point on the plane fits both of its decompositions exactly (they make the same homography); their epipolar
    (Sampson) errors differ only by how the keypoint noise projects on each solution's epipolar lines, and real
    keypoint noise is not isotropic: on the real posed pairs of a plane the wrong decomposition came out 23 and 37
    noise variances ahead on them. A point off the plane is explained (within ``INLIER_GATE`` noise sigmas, in front of
    both cameras) by the true motion and not by the other. Outliers are off the plane too, and a few fit some motion
    by chance (up to 3 of 45 in the NEES suite's planes), so evidence is counted, not weighed:

    * the essential matrix explains at least :data:`_MIN_OFF_PLANE` points off the plane, and a third of them: a 3-D
      scene near a plane (its decompositions are biased), None: the essential matrix's motion applies;
    * of the plane's solutions, those that explain no fewer than :data:`_MIN_OFF_PLANE` points less than the best;
    * the essential matrix's rotation is another motion the data allow unless it is one of the homography's
      decompositions (on a plane it has the other decomposition as a degenerate second solution).

    Returns:
        None for a 3-D scene, else (the plane solutions chosen, [(the essential matrix's rotation, its covariance)] or
        []).
    """
    model = EssentialModel(obs)
    off = np.min([p.norms for p in planes], axis=0) > _OFF_PLANE * INLIER_GATES[2] * sigma_px

    def explained(R: np.ndarray, t: np.ndarray) -> int:
        t = t / max(float(np.linalg.norm(t)), 1e-12)
        return int(np.sum(off & (model.norms((R, t)) < INLIER_GATE * sigma_px) & ~behind(obs, R, t, sigma_px)))

    by_essential = explained(*essential.state)
    if by_essential >= _MIN_OFF_PLANE and 3 * by_essential >= int(off.sum()):
        return None
    counts = [explained(p.state[0], p.state[1]) for p in planes]
    hidden = [_plane_behind(obs, p) for p in planes]
    chosen = [p for p, c, b in zip(planes, counts, hidden)
              if c > max(counts) - _MIN_OFF_PLANE and b < min(hidden) + _MIN_BEHIND]
    return chosen, [(essential.state[0], _rotation_block(essential, slice(0, 3)))]


def _plane_covers(obs: Observations, H: np.ndarray, essential: Refined, sigma_px: float) -> bool:
    """Whether RANSAC's homography (not refined) puts most (:data:`_SAME_INLIERS`) of the essential matrix's inliers on
    its plane (within :data:`_OFF_PLANE` x its inlier gate): a cheap test before the plane's solutions are refined
    (a 3-D scene near a plane or far away passes it too; :func:`_worse_fit` and :func:`_plane_choice` tell)."""
    mask = essential.inliers
    p = obs.hk[mask] @ H.T
    r, _ = whitened_projection(p, None, H[:, :2], obs.xq[mask], obs.Ck[mask], obs.Cq[mask])
    on = np.linalg.norm(r, axis=1) < _OFF_PLANE * INLIER_GATES[2] * sigma_px
    return bool(on.sum() >= _SAME_INLIERS * mask.sum())


def _worse_fit(a: Refined, b: Refined, dof_a: int, dof_b: int, mask: np.ndarray, evaluate_a, evaluate_b) -> bool:
    """Whether model ``a`` (2-D residuals: a rotation, a plane) explains the points of ``mask`` worse than the
    essential matrix ``b`` (1-D residuals): the variance ratio of their whitened residuals beyond the F-test's 99 %
    quantile AND beyond :data:`_RATIO_FLOOR`: ``a`` misses a motion that ``b`` sees.

    For isotropic noise the ratio is 1; but the essential matrix's residual sees the noise across its epipolar lines
    only, the 2-D one all of it, and real keypoint noise is anisotropic (ORB on a slanted or warped surface): on the
    real posed pairs' planes the ratio reached 1.35, and with 300+ matches the F-test alone (quantile 1.25) called
    such a plane a 3-D scene, whose essential matrix then chose the plane's wrong decomposition (5.5 degrees off);
    3-D scenes measured 1.4-5.8 (with fewer matches some lower: those go on to the evidence of the points off the
    plane, :func:`_plane_choice`)."""
    ra, _ = evaluate_a(a.state, mask)
    rb, _ = evaluate_b(b.state, mask)
    da, db = ra.size - dof_a, rb.size - dof_b
    if da <= 0 or db <= 0:
        return False
    ratio = (float(ra @ ra) / da) / max(float(rb @ rb) / db, 1e-300)
    return ratio > max(f_quantile(_AGREE_QUANTILE, da, db), _RATIO_FLOOR)


def _from_essential(obs: Observations, refined: Refined, plausible: list[np.ndarray],
                    info: TwoViewInfo) -> MotionEstimate:
    """The refined essential matrix's rotation and its translation's sign from the points with parallax; other
    plausible motions (:func:`essential_fit`) whose rotations disagree with it beyond their uncertainty make the pair
    AMBIGUOUS (no rotation is claimed, the covariance covers them all); ones that agree widen its covariance."""
    R, t = refined.state
    t, info.parallax_deg = translation_sign(obs, R, t, refined.inliers, refined.sigma_px)
    cov = _rotation_block(refined, slice(0, 3))
    deltas = [so3_log(other @ R.T) for other in plausible]
    if _disagree([R, *plausible], [cov] * (1 + len(plausible))):
        return MotionEstimate("essential", R, np.zeros(3), refined.inliers, refined.sigma_px,
                              cov + sum(np.outer(d, d) for d in deltas), alternatives=(R, *plausible),
                              ambiguous=True)
    for d in deltas:
        cov = cov + np.outer(d, d)
    return MotionEstimate("essential", R, t, refined.inliers, refined.sigma_px, cov, alternatives=(R,))


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
    sigma = noise_from_essential(obs, E, max_gate) if E is not None and m_e.sum() > 6 else threshold_px / 2.0
    info.noise_px = sigma
    s_e, s_h = _scores(obs, E, H, sigma)
    info.homography_ratio = s_h / (s_h + s_e) if s_h + s_e > 0 else math.nan
    info.candidates = {"essential": int(m_e.sum()) if m_e is not None else 0,
                       "homography": int(m_h.sum()) if m_h is not None else 0}
    starts = list(zip(*_decompositions(H)[:2])) if H is not None else []
    essential, plausible = essential_fit(obs, E, m_e, starts, max_gate, sigma) if E is not None and \
        m_e.sum() >= 6 else (None, [])
    # a pure rotation is only worth fitting when the parallax left by the essential matrix's rotation is small
    start = essential.inliers if essential is not None else m_h
    small = essential is None or median_parallax(obs, essential.state[0], essential.inliers) < _SMALL_PARALLAX_RAD
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
            return _from_rotation(rotation, essential), info
    info.translation_seen = True
    # it moved; a plane (or a scene far away) holds most of the matches and explains them as well as the essential
    # matrix: the plane's decompositions, which only the points off the plane tell apart, and which those points may
    # still show to be a 3-D scene (whatever R_H says: a plane scores about 0.44, on either side of ORB-SLAM's 0.40)
    if H is not None and m_h.sum() >= 8 and _plane_covers(obs, H, essential, sigma):
        planes = _plane_fits(obs, H, m_h, threshold_px, max_gate, sigma)
        if planes:
            best = min(planes, key=lambda p: p.ssr / max(2 * int(p.inliers.sum()) - 8, 1))
            common = best.inliers & essential.inliers
            if common.sum() >= _SAME_INLIERS * essential.inliers.sum() and \
                    not _worse_fit(best, essential, 8, 5, common, PlaneModel(obs).evaluate, E_model.evaluate):
                choice = _plane_choice(obs, planes, essential, sigma, H)
                if choice is not None:
                    return _from_planes(*choice), info
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
