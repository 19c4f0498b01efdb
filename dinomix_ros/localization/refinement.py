"""Least-squares refinement of a fitted model on its inliers, and what the fit says about its own uncertainty
(ROS-free).

* :func:`levenberg_marquardt`: Levenberg-Marquardt on a manifold (the model supplies whitened residuals, their
  Jacobian with respect to a local perturbation, and the retraction that applies a perturbation);
* :func:`noise_sigma`: the noise level of the inliers' residuals, corrected for the truncation an inlier gate
  applies (residuals beyond the gate were dropped, so the inliers' mean square under-states the noise);
* :func:`refine_with_gate`: refine, re-select the inliers at ``INLIER_GATES`` x the estimated noise, refine again;
* :func:`fit_covariance`: the covariance of the perturbation, ``sigma^2 (J^T J)^-1`` (the inverse Gauss-Newton
  Hessian of the whitened residuals, scaled by the residual variance ``sigma^2 = SSR / (m - p)``).

Residuals are WHITENED: each point's residual is divided by its own noise (see
:mod:`dinomix_ros.localization.relative_pose`), in pixels, so that one noise level ``sigma`` (pixels) applies to
all of them: a residual vector ``r`` of ``m`` scalars for ``n`` points (``m = n * k``, ``k`` = 1 for the Sampson
error of an essential matrix, 2 for a reprojection error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["levenberg_marquardt", "noise_sigma", "truncation_factor", "refine_with_gate", "fit_covariance",
           "Refined", "INLIER_GATE", "INLIER_GATES", "MIN_NOISE_PX", "TUKEY_SCALE", "tukey_irls", "tukey_irls_batch",
           "robust_sigma", "small_sample_factor", "chi2_quantile", "f_quantile", "MAX_LEVERAGE"]

#: Inliers of a refined model: residual norm below this many noise sigmas, by residual dimension: 3 for the 1-dof
#: Sampson error (99.7 % of Gaussian inliers; wider lets outliers near their epipolar line in, which pull the
#: essential matrix), 4 for 2-dof reprojection errors (99.97 %: ORB keypoints of coarse pyramid levels are noisier
#: than one sigma says; on the warped-photo PnP tests 3 sigmas left 1-5 % translation errors, 4 sigmas 0.4-2.6 %).
INLIER_GATES = {1: 3.0, 2: 4.0}
INLIER_GATE = INLIER_GATES[1]
#: The smallest pixel noise a fit may claim (keypoint localisation, descriptor quantisation; a handful of points
#: can show a residual far below their true noise by chance): chosen with the NEES suite (test_pose_nees.py).
MIN_NOISE_PX = 0.5
#: A point that absorbs more than half of its own residual (leverage, see ``_high_leverage``) is no inlier: it decides
#: a direction of the model alone. Applied when there are at least LEVERAGE_MIN_RATIO residuals per parameter (with
#: fewer, e.g. 8 PnP points for 6 parameters, every point's leverage is high).
MAX_LEVERAGE = 0.9
LEVERAGE_MIN_RATIO = 5
#: The scale of Tukey's biweight in noise sigmas for the robust start of a refinement (3.5: measured on the NEES
#: suite's outlier-rich pairs, against 4.685, the 95 %-efficiency constant, which let near-line outliers pull).
TUKEY_SCALE = 3.5

Evaluate = Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]]


def levenberg_marquardt(evaluate: Evaluate, retract: Callable[[Any, np.ndarray], Any], state: Any,
                        mask: np.ndarray, iterations: int = 20) -> tuple[Any, float]:
    """Minimise ``|r|^2`` over the points in ``mask``.

    Args:
        evaluate: ``(state, mask) -> (r, J)``: (m,) whitened residuals of the masked points and their (m, p)
            Jacobian with respect to the perturbation ``delta`` of :func:`retract`.
        retract: ``(state, delta) -> state``.
        state: the starting model.
        mask: the points to fit.
        iterations: at most this many steps.

    Returns:
        (state, cost) at the minimum found.
    """
    r, J = evaluate(state, mask)
    cost = float(r @ r)
    lam = 1e-4
    for _ in range(iterations):
        H, g = J.T @ J, J.T @ r
        damping = lam * (np.diag(H) + 1e-9 * max(float(np.trace(H)), 1e-12))
        try:
            delta = np.linalg.solve(H + np.diag(damping), -g)
        except np.linalg.LinAlgError:
            break
        if not np.isfinite(delta).all():
            break
        candidate = retract(state, delta)
        r2, J2 = evaluate(candidate, mask)
        cost2 = float(r2 @ r2)
        if np.isfinite(cost2) and cost2 <= cost:
            done = cost - cost2 <= 1e-6 * max(cost, 1e-30) or float(np.abs(delta).max()) < 1e-7
            state, r, J, cost = candidate, r2, J2, cost2
            lam = max(lam / 5.0, 1e-9)
            if done:
                break
        else:
            lam *= 8.0
            if lam > 1e8:
                break
    return state, cost


def tukey_irls(evaluate: Evaluate, norms: Callable[[Any], np.ndarray], retract: Callable[[Any, np.ndarray], Any],
               state: Any, allowed: np.ndarray, scale_px: float, k: int, iterations: int = 12) -> Any:
    """Minimise Tukey's biweight loss of scale ``scale_px`` over each point's residual norm (``norms``: infinite
    for a point that cannot be an inlier, e.g. behind a camera), Levenberg-Marquardt steps with the weights of the
    current state (iteratively reweighted): points beyond the scale get no weight, so outliers near the model stop
    pulling it, unlike with a hard gate around a biased start."""
    c2 = scale_px * scale_px

    def loss(s: Any) -> tuple[float, np.ndarray]:
        e = norms(s)
        u = np.where(allowed & np.isfinite(e), np.minimum(e * e / c2, 1.0), 1.0)
        return float(np.sum(c2 / 6.0 * (1.0 - (1.0 - u) ** 3))), (1.0 - u) ** 2

    cost, w = loss(state)
    lam = 1e-4
    for _ in range(iterations):
        use = w > 0
        if use.sum() * k <= 6:
            break
        r, J = evaluate(state, use)
        sw = np.repeat(np.sqrt(w[use]), k)
        r, J = r * sw, J * sw[:, None]
        H, g = J.T @ J, J.T @ r
        try:
            delta = np.linalg.solve(H + np.diag(lam * (np.diag(H) + 1e-9 * max(float(np.trace(H)), 1e-12))), -g)
        except np.linalg.LinAlgError:
            break
        if not np.isfinite(delta).all():
            break
        candidate = retract(state, delta)
        cost2, w2 = loss(candidate)
        if cost2 <= cost:
            done = cost - cost2 <= 1e-6 * max(cost, 1e-30)
            state, cost, w = candidate, cost2, w2
            lam = max(lam / 5.0, 1e-9)
            if done:
                break
        else:
            lam *= 8.0
            if lam > 1e8:
                break
    return state


def tukey_irls_batch(evaluate: Callable[[tuple, bool], tuple[np.ndarray, np.ndarray | None]],
                     retract: Callable[[tuple, np.ndarray], tuple], states: tuple, scale_px: float,
                     iterations: int) -> tuple[tuple, np.ndarray]:
    """:func:`tukey_irls` for K states of a model with one residual per point, all at once (each state with its own
    damping, its steps accepted or not on its own): what screening several starts of a fit needs.

    Args:
        evaluate: ``(states, jacobian) -> ((K, N) residuals, (K, N, p) Jacobians or None)`` over every point.
        retract: ``(states, (K, p) perturbations) -> states``.
        states: a tuple of arrays whose first axis is K.
        scale_px: Tukey's scale.
        iterations: at most this many steps.

    Returns:
        (the states, (K,) Tukey loss of each).
    """
    c2 = scale_px * scale_px

    def loss(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = np.where(np.isfinite(e), np.minimum(e * e / c2, 1.0), 1.0)
        return np.sum(c2 / 6.0 * (1.0 - (1.0 - u) ** 3), axis=1), (1.0 - u) ** 2

    def select(mask: np.ndarray, a: tuple, b: tuple) -> tuple:
        return tuple(np.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, y) for x, y in zip(a, b))

    e, J = evaluate(states, True)
    cost, w = loss(e)
    K, p = J.shape[0], J.shape[2]
    lam = np.full(K, 1e-4)
    active = np.ones(K, bool)
    e = np.where(np.isfinite(e), e, 0.0)
    for _ in range(iterations):
        JwT = (J * w[..., None]).transpose(0, 2, 1)
        H = JwT @ J
        g = (JwT @ e[..., None])[..., 0]
        diag = np.diagonal(H, axis1=1, axis2=2)
        ridge = 1e-9 * np.maximum(diag.sum(axis=1) / p, 1e-12)
        A = H + (lam[:, None] * (diag + ridge[:, None]))[:, :, None] * np.eye(p)
        try:
            delta = np.linalg.solve(A, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular system: that state stops
            delta = np.stack([np.linalg.lstsq(A[k], -g[k], rcond=None)[0] for k in range(K)])
        ok = active & np.isfinite(delta).all(axis=1)
        delta[~ok] = 0.0
        candidate = retract(states, delta)
        e2, J2 = evaluate(candidate, True)
        cost2, w2 = loss(e2)
        accept = ok & (cost2 <= cost)
        done = accept & (cost - cost2 <= 1e-6 * np.maximum(cost, 1e-30))
        states = select(accept, candidate, states)
        e = np.where(accept[:, None], np.where(np.isfinite(e2), e2, 0.0), e)
        J = np.where(accept[:, None, None], J2, J)
        w = np.where(accept[:, None], w2, w)
        cost = np.where(accept, cost2, cost)
        lam = np.where(accept, np.maximum(lam / 5.0, 1e-9), lam * 8.0)
        active &= ok & ~done & (lam <= 1e8)
        if not active.any():
            break
    return states, cost


def truncation_factor(a: float, k: int) -> float:
    """E[|r|^2 | |r| < a sigma] / E[|r|^2] for Gaussian residuals of ``k`` (1 or 2) dimensions."""
    if a > 8.0:
        return 1.0
    if k == 1:
        p = math.erf(a / math.sqrt(2.0))
        return max(1.0 - 2.0 * a * math.exp(-a * a / 2.0) / math.sqrt(2.0 * math.pi) / max(p, 1e-300), 1e-3)
    u = a * a / 2.0
    return max((1.0 - math.exp(-u) * (1.0 + u)) / max(-math.expm1(-u), 1e-300), 1e-3)


def noise_sigma(ssr: float, scalars: int, params: int, k: int, gate: float | None) -> float:
    """The noise sigma (pixels) of whitened residuals: ``sqrt(SSR / (m - p))``, corrected for a gate (residual norms
    above ``gate`` pixels were excluded), never below :data:`MIN_NOISE_PX`.

    Args:
        ssr: the sum of squared residuals of the inliers.
        scalars: residual scalars ``m`` (points x ``k``).
        params: the model's degrees of freedom ``p``.
        k: residual dimension per point.
        gate: the inlier gate in pixels (None: no truncation).
    """
    dof = scalars - params
    if dof <= 0:
        return math.inf
    s2 = ssr / dof
    sigma2 = s2
    if gate is not None and gate > 0:
        for _ in range(30):  # fixed point of s2 = sigma2 * factor(gate / sigma)
            new = s2 / truncation_factor(gate / math.sqrt(max(sigma2, 1e-300)), k)
            if abs(new - sigma2) <= 1e-9 * new:
                break
            sigma2 = new
        sigma2 = new
    return max(math.sqrt(sigma2), MIN_NOISE_PX)


def robust_sigma(norms: np.ndarray, k: int, cap_px: float) -> float:
    """The noise sigma (pixels) of residual norms of which some are outliers: the median of those below ``cap_px``
    (for Gaussian noise the median norm is 0.674 sigma for k = 1, 1.177 sigma for k = 2), then the truncated-corrected
    RMS of those below ``INLIER_GATES[k]`` times that; never below :data:`MIN_NOISE_PX`."""
    e = norms[np.isfinite(norms) & (norms < cap_px)]
    if e.size < 5:
        return MIN_NOISE_PX
    sigma = float(np.median(e)) / (0.6745 if k == 1 else 1.1774)
    gate = min(INLIER_GATES[k] * max(sigma, MIN_NOISE_PX), cap_px)
    inl = e[e < gate]
    return noise_sigma(float(np.sum(inl ** 2)), inl.size * k, 0, k, gate) if inl.size >= 5 else MIN_NOISE_PX


@dataclass
class Refined:
    """A refined model: the state, its inliers and their noise, and the whitened Jacobian at the solution."""

    state: Any
    inliers: np.ndarray  # bool mask over all points
    sigma_px: float
    ssr: float
    jacobian: np.ndarray  # (m, p) over the inliers
    norms: np.ndarray  # (n,) residual norm of every point (pixels)


def refine_with_gate(evaluate: Evaluate, norms: Callable[[Any], np.ndarray], retract: Callable[[Any, np.ndarray], Any],
                     state: Any, mask: np.ndarray, params: int, k: int, gate_px: float, max_gate_px: float,
                     rounds: int = 3, robust_on: np.ndarray | None = None, sigma_px: float | None = None,
                     leverage: bool = False) -> Refined | None:
    """Refine on ``mask``, then re-select the inliers at :data:`INLIER_GATES` x the estimated noise (at most
    ``max_gate_px``) and refine again until the inliers stop changing.

    A hard inlier set chosen around a biased model keeps it biased (the points that disagree stay out: seen with
    the essential matrix at 1.5 px of noise, 0.8 degrees off with RANSAC's inliers); with ``robust_on`` (the points
    allowed, e.g. all matches) the model is first refined on all of them with Tukey's biweight of scale
    :data:`TUKEY_SCALE` x ``sigma_px`` (:func:`tukey_irls`), and the inliers are selected from there.

    Args:
        evaluate: residuals and Jacobian of the masked points (see :func:`levenberg_marquardt`).
        norms: ``state -> (n,)`` residual norm of every point, in pixels.
        retract: applies a perturbation.
        state: the starting model (e.g. RANSAC's).
        mask: its inliers.
        params: degrees of freedom of the model.
        k: residual dimension per point.
        gate_px: the gate that selected ``mask`` (RANSAC's threshold, in pixels).
        max_gate_px: the widest gate allowed.
        rounds: at most this many refine / re-select rounds.
        leverage: drop points whose leverage exceeds :data:`MAX_LEVERAGE` (for good: see ``_high_leverage``).

    Returns:
        The refined model, None when too few inliers remain to estimate anything.
    """
    mask = np.asarray(mask, dtype=bool)
    gate = gate_px
    if robust_on is not None and sigma_px is not None and robust_on.sum() * k > params + 1:
        state = tukey_irls(evaluate, norms, retract, state, robust_on, TUKEY_SCALE * sigma_px, k)
        e = norms(state)
        gate = min(max(INLIER_GATES[k] * sigma_px, gate_px), max_gate_px)
        mask = np.isfinite(e) & (e < gate) & robust_on
    excluded = np.zeros(mask.shape[0], bool)
    dropped = False
    for i in range(rounds + (2 if leverage else 0)):  # a point dropped for its leverage moves the fit: more rounds
        if mask.sum() * k <= params + 1:
            return None
        state, cost = levenberg_marquardt(evaluate, retract, state, mask, iterations=20 if i == 0 or dropped else 8)
        e = norms(state)
        sigma = noise_sigma(cost, int(mask.sum()) * k, params, k, gate)
        gate = min(INLIER_GATES[k] * sigma, max_gate_px)
        dropped = False
        if leverage:
            high = _high_leverage(evaluate, state, mask, params, k)
            dropped = bool(high.any())
            excluded |= high
        new_mask = np.isfinite(e) & (e < gate) & ~excluded
        if np.array_equal(new_mask, mask):
            break
        mask = new_mask
    if mask.sum() * k <= params + 1:
        return None
    r, J = evaluate(state, mask)
    ssr = float(r @ r)
    sigma = noise_sigma(ssr, int(mask.sum()) * k, params, k, gate)
    return Refined(state, mask, sigma, ssr, J, norms(state))


def _high_leverage(evaluate: Evaluate, state: Any, mask: np.ndarray, params: int, k: int) -> np.ndarray:
    """(n,) bool: the points of ``mask`` whose LEVERAGE exceeds :data:`MAX_LEVERAGE` (none when there are fewer than
    :data:`LEVERAGE_MIN_RATIO` residuals per parameter: with few points every one carries much of the fit).

    A point's leverage is how much of its own residual the fit absorbs (the diagonal block ``J_i (J^T J)^-1 J_i^T`` of
    the hat matrix, its largest eigenvalue for 2-D residuals; the leverages sum to the parameter count). A point with
    leverage near 1 decides a direction of the model by itself: the fit passes through it whatever it is, so its
    residual tests nothing, and no other point checks it. Seen in the NEES suite's far scenes: a wrong match with a
    large disparity, where every true match has a parallax of a few pixels, set the essential matrix's translation
    direction alone (leverage 0.95-0.998, residual 0 where the truth leaves it 20-60 px), which turned the rotation
    by 0.2-0.3 degrees while the fit's covariance claimed 0.01-0.04 (NEES 25-69). Such a point is dropped for good: a
    motion needs a consensus."""
    n_res = int(mask.sum()) * k
    out = np.zeros(mask.shape[0], bool)
    if n_res < LEVERAGE_MIN_RATIO * params:
        return out
    _, J = evaluate(state, mask)
    H = J.T @ J
    try:
        C = np.linalg.inv(H + 1e-12 * max(float(np.trace(H)) / H.shape[0], 1e-300) * np.eye(H.shape[0]))
    except np.linalg.LinAlgError:
        return out
    JC = J @ C
    if k == 1:
        lev = np.sum(JC * J, axis=1)
    else:
        a = np.sum(JC[0::2] * J[0::2], axis=1)
        b = np.sum(JC[0::2] * J[1::2], axis=1)
        d = np.sum(JC[1::2] * J[1::2], axis=1)
        lev = 0.5 * (a + d) + np.sqrt(np.maximum(0.25 * (a - d) ** 2 + b * b, 0.0))
    out[np.flatnonzero(mask)[lev > MAX_LEVERAGE]] = True
    return out


def fit_covariance(J: np.ndarray, sigma_px: float, dof: int | None = None) -> np.ndarray:
    """``sigma^2 (J^T J)^-1``: the covariance of the perturbation at a least-squares solution (directions the data do
    not constrain get a huge variance, not a small one).

    With ``dof`` (the residual degrees of freedom ``sigma`` was estimated from), the covariance is widened by
    :func:`small_sample_factor`: an estimated ``sigma`` is itself uncertain, and with few residuals the normalized
    error of a 3-vector follows ``3 F(3, dof)``, not the chi-square."""
    H = J.T @ J
    scale = max(float(np.trace(H)) / H.shape[0], 1e-300)
    factor = small_sample_factor(dof) if dof is not None else 1.0
    return factor * sigma_px ** 2 * np.linalg.inv(H + 1e-12 * scale * np.eye(H.shape[0]))


def small_sample_factor(dof: int) -> float:
    """How much wider a covariance scaled by an estimated noise must be for a 3-vector's normalized error to stay within
    the chi-square's 99 % bound 99 % of the time: ``3 F_0.99(3, dof) / chi2_0.99(3)`` (2.0 at 8 residual degrees of
    freedom, 1.3 at 20, 1.05 at 100, -> 1)."""
    if dof <= 0:
        return math.inf
    return max(1.0, 3.0 * f_quantile(0.99, 3, dof) / chi2_quantile(0.99, 3))


def chi2_quantile(p: float, dof: int) -> float:
    """Quantile ``p`` of the chi-square distribution with ``dof`` degrees of freedom (Wilson-Hilferty; within 1 %
    for dof >= 3 at p = 0.99)."""
    z = _normal_quantile(p)
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def f_quantile(p: float, d1: int, d2: int) -> float:
    """Quantile ``p`` of the F distribution with (d1, d2) degrees of freedom (Paulson's normal approximation of the
    cube root; within a few % for d1, d2 >= 10)."""
    z = _normal_quantile(p)
    a, b = 1.0 - 2.0 / (9.0 * d2), 1.0 - 2.0 / (9.0 * d1)
    c, d = 2.0 / (9.0 * d2), 2.0 / (9.0 * d1)
    A = a * a - z * z * c
    disc = max(a * a * b * b - A * (b * b - z * z * d), 0.0)
    y = (a * b + math.sqrt(disc)) / A if A > 0 else math.inf
    return y ** 3


def _normal_quantile(p: float) -> float:
    """Standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
