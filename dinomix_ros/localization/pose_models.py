"""The motion models geometric verification fits, as whitened residuals with analytic Jacobians (ROS-free).

Every model maps keyframe observations to the query image; each point's residual is WHITENED by its own noise, so
that residuals are in pixels and one noise level applies to all points (:class:`Observations` holds, per point, the
covariance of its normalized coordinates for 1 px^2 of pixel noise: ``K^-1`` for a pinhole camera, the local
Jacobian of the undistortion for a distorted or fisheye one, where a pixel at the edge is many times wider).

Models (``state`` -> residuals; ``delta`` -> ``retract(state, delta)``), all with the relative motion ``X_q = R X_k
+ t`` (keyframe camera -> query camera) and the rotation perturbed on the left, ``R <- exp(phi) R``, which is the
right perturbation of the query camera's orientation in the keyframe camera's frame by ``-phi``:

* :class:`RotationModel`: a pure rotation, ``x_q ~ R x_k`` (3 dof; 2 residuals per point);
* :class:`PlaneModel`: a plane, ``x_q ~ (R + tau n^T) x_k`` with ``tau = t / d`` (8 dof; 2 residuals per point);
* :class:`EssentialModel`: ``x_q^T [t]x R x_k = 0`` with ``|t| = 1``, the Sampson error with each point's own
  covariance (5 dof; 1 residual per point);
* :class:`PnPModel`: keyframe points ``X_k`` (depth x ray) reprojected into the query, ``T <- exp((rho, phi)) T``
  (6 dof; 2 residuals per point; the keyframe keypoint's pixel noise is propagated into the residual's covariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.localization.se3 import skew, skew_batch, so3_exp, so3_exp_batch

__all__ = ["Observations", "homogeneous", "RotationModel", "PlaneModel", "EssentialModel", "PnPModel",
           "tangent_basis", "tangent_basis_batch", "cross", "whitened_projection", "MIN_DEPTH"]

#: Points projected this close to (or behind) the camera plane count as not visible (a huge residual).
MIN_DEPTH = 1e-6
_SKEW_EX, _SKEW_EY = skew(np.array([1.0, 0.0, 0.0])), skew(np.array([0.0, 1.0, 0.0]))
_PIXEL_STEP = 0.5  # finite-difference step (pixels) for the Jacobian of a distorted camera's undistortion


def homogeneous(x: np.ndarray) -> np.ndarray:
    """(N, 3) ``(x, y, 1)`` of (N, 2) normalized coordinates."""
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def _pixel_jacobian(camera: CameraModel, pixels: np.ndarray, normalized: np.ndarray) -> np.ndarray:
    """(N, 2, 2) d(normalized) / d(pixel) at each point."""
    if camera.fisheye or (camera.D.size and np.any(camera.D)):
        dx = (camera.normalized(pixels + [_PIXEL_STEP, 0.0]) - normalized) / _PIXEL_STEP
        dy = (camera.normalized(pixels + [0.0, _PIXEL_STEP]) - normalized) / _PIXEL_STEP
        return np.stack([dx, dy], axis=2)
    Kinv = np.linalg.inv(camera.K)[:2, :2]
    return np.broadcast_to(Kinv, (pixels.shape[0], 2, 2)).copy()


@dataclass
class Observations:
    """Matched points of a pair in normalized coordinates, with each point's noise.

    Attributes:
        xk, xq: (N, 2) undistorted normalized coordinates in the keyframe and the query camera.
        Ck, Cq: (N, 2, 2) covariance of ``xk`` / ``xq`` for one square pixel of keypoint noise.
        focal: the mean focal length of both cameras (pixels; turns pixel thresholds into normalized ones).
        hk, hq: (N, 3) homogeneous ``(x, y, 1)``; rays_k, rays_q: (N, 3) unit rays (derived).
    """

    xk: np.ndarray
    xq: np.ndarray
    Ck: np.ndarray
    Cq: np.ndarray
    focal: float

    @classmethod
    def from_pixels(cls, pk: np.ndarray, pq: np.ndarray, cam_k: CameraModel, cam_q: CameraModel) -> Observations:
        xk, xq = cam_k.normalized(pk), cam_q.normalized(pq)
        Jk, Jq = _pixel_jacobian(cam_k, pk, xk), _pixel_jacobian(cam_q, pq, xq)
        return cls(xk, xq, Jk @ Jk.transpose(0, 2, 1), Jq @ Jq.transpose(0, 2, 1), 0.5 * (cam_k.focal + cam_q.focal))

    def __len__(self) -> int:
        return int(self.xk.shape[0])

    def __post_init__(self) -> None:
        self.hk, self.hq = homogeneous(self.xk), homogeneous(self.xq)
        self.rays_k = self.hk / np.linalg.norm(self.hk, axis=1, keepdims=True)
        self.rays_q = self.hq / np.linalg.norm(self.hq, axis=1, keepdims=True)


def whitened_projection(P: np.ndarray, Jp: np.ndarray | None, Mk: np.ndarray, xq: np.ndarray, Ck: np.ndarray,
                        Cq: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Whitened reprojection residuals of predicted points ``P`` (N, 3) against the query's ``xq`` (N, 2).

    Args:
        P: the predicted points in the query camera (projected: ``P[:2] / P[2]``; behind the camera: far away).
        Jp: (N, 3, p) dP / d(perturbation), None for residuals only.
        Mk: (3, 2) or (N, 3, 2) dP / d(keyframe point's normalized coordinates): how its noise moves the prediction.
        xq, Ck, Cq: the query's normalized coordinates and both points' covariances (per square pixel).

    Returns:
        (N, 2) residuals and (N, 2, p) Jacobians, each point whitened by its covariance ``Cq + A Ck A^T`` (``A`` =
        d projection / d keyframe point), i.e. in pixels. Written out per component: numpy's batched 2x2 products
        cost more than the arithmetic here.
    """
    z = P[:, 2]
    bad = z < MIN_DEPTH
    iz = 1.0 / np.where(bad, MIN_DEPTH, z)
    x0, x1 = P[:, 0] * iz, P[:, 1] * iz
    r0, r1 = np.where(bad, 1e6, x0 - xq[:, 0]), np.where(bad, 1e6, x1 - xq[:, 1])
    if Mk.ndim == 2:
        Mk = Mk[None]
    a0 = (Mk[:, 0, :] - x0[:, None] * Mk[:, 2, :]) * iz[:, None]  # rows of A = d x / d x_k, (N, 2) each
    a1 = (Mk[:, 1, :] - x1[:, None] * Mk[:, 2, :]) * iz[:, None]
    k00, k01, k11 = Ck[:, 0, 0], Ck[:, 0, 1], Ck[:, 1, 1]
    v0 = np.stack([a0[:, 0] * k00 + a0[:, 1] * k01, a0[:, 0] * k01 + a0[:, 1] * k11], axis=1)
    v1 = np.stack([a1[:, 0] * k00 + a1[:, 1] * k01, a1[:, 0] * k01 + a1[:, 1] * k11], axis=1)
    c00 = Cq[:, 0, 0] + np.sum(v0 * a0, axis=1)
    c10 = Cq[:, 1, 0] + np.sum(v1 * a0, axis=1)
    c11 = Cq[:, 1, 1] + np.sum(v1 * a1, axis=1)
    la = np.sqrt(np.maximum(c00, 1e-300))  # C = L L^T, L = [[la, 0], [lb, lc]]
    lb = c10 / la
    lc = np.sqrt(np.maximum(c11 - lb * lb, 1e-300))
    w0 = r0 / la
    r = np.stack([w0, (r1 - lb * w0) / lc], axis=1)
    if Jp is None:
        return r, None
    j0 = (Jp[:, 0, :] - x0[:, None] * Jp[:, 2, :]) * (iz / la)[:, None]
    j1 = ((Jp[:, 1, :] - x1[:, None] * Jp[:, 2, :]) * iz[:, None] - lb[:, None] * j0) / lc[:, None]
    J = np.stack([j0, j1], axis=1)
    J[bad] = 0.0
    return r, J


def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross products of (N, 3) arrays (or a (3,) with an (N, 3)); numpy's own is ~10x slower here."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[..., 0] = a1 * b2 - a2 * b1
    out[..., 1] = a2 * b0 - a0 * b2
    out[..., 2] = a0 * b1 - a1 * b0
    return out


def tangent_basis(v: np.ndarray) -> np.ndarray:
    """(3, 2) orthonormal basis of the plane orthogonal to unit vector ``v``."""
    x, y, z = float(v[0]), float(v[1]), float(v[2])
    if abs(x) < 0.9:  # v x e_x
        b1 = np.array([0.0, z, -y])
    else:  # v x e_y
        b1 = np.array([-z, 0.0, x])
    b1 /= np.linalg.norm(b1)
    b2 = np.array([y * b1[2] - z * b1[1], z * b1[0] - x * b1[2], x * b1[1] - y * b1[0]])
    return np.stack([b1, b2], axis=1)


def tangent_basis_batch(v: np.ndarray) -> np.ndarray:
    """(K, 3, 2) orthonormal bases of the planes orthogonal to (K, 3) unit vectors (as :func:`tangent_basis`)."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    zero = np.zeros_like(x)
    b1 = np.where((np.abs(x) < 0.9)[:, None], np.stack([zero, z, -y], axis=1), np.stack([-z, zero, x], axis=1))
    b1 /= np.linalg.norm(b1, axis=1, keepdims=True)
    return np.stack([b1, cross(v, b1)], axis=2)


class _Masked:
    """The masked points' arrays, cached for the mask last used (Levenberg-Marquardt reuses it every step)."""

    def __init__(self, obs: Observations) -> None:
        self.obs, self.h = obs, obs.hk
        self._mask: np.ndarray | slice | None = None
        self._arrays: tuple = ()

    def _subset(self, m: np.ndarray | slice) -> tuple:
        if self._mask is not m:
            self._mask, self._arrays = m, (self.h[m], self.obs.xq[m], self.obs.Ck[m], self.obs.Cq[m])
        return self._arrays


class RotationModel(_Masked):
    """``x_q ~ R x_k``; state: R."""

    params, k = 3, 2

    def _terms(self, R: np.ndarray, m: np.ndarray | slice, jacobian: bool = True
               ) -> tuple[np.ndarray, np.ndarray | None]:
        h, xq, Ck, Cq = self._subset(m)
        p = h @ R.T
        return whitened_projection(p, -skew_batch(p) if jacobian else None, R[:, :2], xq, Ck, Cq)

    def evaluate(self, R: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, J = self._terms(R, mask)
        return r.reshape(-1), J.reshape(-1, 3)

    def norms(self, R: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self._terms(R, slice(None), jacobian=False)[0], axis=1)

    @staticmethod
    def retract(R: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return so3_exp(delta) @ R


class PlaneModel(_Masked):
    """``x_q ~ (R + tau n^T) x_k``; state: (R, tau, n) with unit n (the plane's normal in the keyframe camera)."""

    params, k = 8, 2

    def _terms(self, state: tuple, m: np.ndarray | slice, jacobian: bool = True
               ) -> tuple[np.ndarray, np.ndarray | None]:
        R, tau, n = state
        h, xq, Ck, Cq = self._subset(m)
        Rh = h @ R.T
        s = h @ n
        p = Rh + s[:, None] * tau
        Jp = None
        if jacobian:
            B = tangent_basis(n)
            Jp = np.concatenate([-skew_batch(Rh), s[:, None, None] * np.eye(3),
                                 tau[None, :, None] * (h @ B)[:, None, :]], axis=2)
        Hm = R + np.outer(tau, n)
        return whitened_projection(p, Jp, Hm[:, :2], xq, Ck, Cq)

    def evaluate(self, state: tuple, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, J = self._terms(state, mask)
        return r.reshape(-1), J.reshape(-1, self.params)

    def norms(self, state: tuple) -> np.ndarray:
        return np.linalg.norm(self._terms(state, slice(None), jacobian=False)[0], axis=1)

    @staticmethod
    def retract(state: tuple, delta: np.ndarray) -> tuple:
        R, tau, n = state
        n2 = n + tangent_basis(n) @ delta[6:8]
        return so3_exp(delta[:3]) @ R, tau + delta[3:6], n2 / np.linalg.norm(n2)


class EssentialModel:
    """``x_q^T [t]x R x_k = 0``; state: (R, t) with unit t; residual: the Sampson error with per-point covariance
    (its Jacobian includes the derivative of the Sampson error's denominator, see ``_terms``)."""

    params, k = 5, 1

    def __init__(self, obs: Observations) -> None:
        self.obs, self.hk, self.hq = obs, obs.hk, obs.hq
        self._mask: np.ndarray | slice | None = None
        self._arrays: tuple = ()

    def _subset(self, m: np.ndarray | slice) -> tuple:
        """The masked points' arrays, cached for the mask last used (Levenberg-Marquardt reuses it every step)."""
        if self._mask is not m:
            Ck, Cq = self.obs.Ck[m], self.obs.Cq[m]
            self._mask = m
            self._arrays = (self.hk[m], self.hq[m], Ck[:, 0, 0], Ck[:, 0, 1], Ck[:, 1, 1], Cq[:, 0, 0], Cq[:, 0, 1],
                            Cq[:, 1, 1])
        return self._arrays

    def _terms(self, state: tuple, m: np.ndarray | slice, jacobian: bool = True
               ) -> tuple[np.ndarray, np.ndarray | None]:
        R, t = state
        hk, hq, k00, k01, k11, q00, q01, q11 = self._subset(m)
        u = hk @ R.T  # R x_k
        tu = cross(t, u)  # E x_k = [t]x R x_k
        a = np.sum(hq * tu, axis=1)
        gq0, gq1 = tu[:, 0], tu[:, 1]
        qt = cross(hq, t)
        gk = qt @ R[:, :2]  # (E^T x_q)[:2] = (R^T [t]x^T x_q)[:2] = (R^T (x_q x t))[:2]
        gk0, gk1 = gk[:, 0], gk[:, 1]
        kg0, kg1 = k00 * gk0 + k01 * gk1, k01 * gk0 + k11 * gk1  # Ck gk
        qg0, qg1 = q00 * gq0 + q01 * gq1, q01 * gq0 + q11 * gq1  # Cq gq
        var = gk0 * kg0 + gk1 * kg1 + gq0 * qg0 + gq1 * qg1
        s = 1.0 / np.sqrt(np.maximum(var, 1e-300))
        e = a * s
        if not jacobian:
            return e, None
        # the full derivative of e = a / sqrt(var): with var frozen (Sampson's reweighting) the fixed point is biased
        # (measured: 1-1.4 std-devs of rotation bias at 1-1.5 px), with it the minimum is the Sampson cost's own; a
        # robust start with the frozen one also stalled in the valley of small parallax (measured on the T265 pair).
        # Rows of the 2x3 / 2x2 derivatives of gq = ([t]x R x_k)[:2] and gk = (R^T (x_q x t))[:2], as cross products.
        B = tangent_basis(t)
        d_a = np.concatenate([cross(u, qt), cross(u, hq) @ B], axis=1)  # d a / d (phi, beta)
        # with a constant v: u x v = u @ [v]x and v x h = -(h @ [v]x); e_x, e_y the image axes, c_i = R[:, i]
        sc0, sc1 = skew(R[:, 0]), skew(R[:, 1])
        ex_t, ey_t = skew(np.array([0.0, -t[2], t[1]])), skew(np.array([t[2], 0.0, -t[0]]))  # [e_x x t]x, [e_y x t]x
        UM = u @ np.concatenate([ex_t, ey_t, _SKEW_EX @ B, _SKEW_EY @ B], axis=1)
        QM = qt @ np.concatenate([-sc0, -sc1], axis=1)
        HM = hq @ np.concatenate([-sc0 @ B, -sc1 @ B], axis=1)
        d_var = np.empty((e.shape[0], 5))  # d var / d (phi, beta) / 2: rows x and y of dgq and dgk, weighted
        d_var[:, :3] = (qg0[:, None] * UM[:, 0:3] + qg1[:, None] * UM[:, 3:6] + kg0[:, None] * QM[:, 0:3]
                        + kg1[:, None] * QM[:, 3:6])
        d_var[:, 3:] = (qg0[:, None] * UM[:, 6:8] + qg1[:, None] * UM[:, 8:10] + kg0[:, None] * HM[:, 0:2]
                        + kg1[:, None] * HM[:, 2:4])
        return e, d_a * s[:, None] - (a * s ** 3)[:, None] * d_var

    def evaluate(self, state: tuple, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._terms(state, mask)

    def norms(self, state: tuple) -> np.ndarray:
        return np.abs(self._terms(state, slice(None), jacobian=False)[0])

    @staticmethod
    def retract(state: tuple, delta: np.ndarray) -> tuple:
        R, t = state
        t2 = t + tangent_basis(t) @ delta[3:5]
        return so3_exp(delta[:3]) @ R, t2 / np.linalg.norm(t2)

    def batch_terms(self, states: tuple, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`_terms` of every point for K states at once (``states``: (K, 3, 3) rotations, (K, 3) unit
        translations): (K, N) Sampson errors and their (K, N, 5) Jacobians. Several starts of a fit cost little more
        than one this way (numpy's per-call overhead dominates at a few hundred points)."""
        R, t = states
        hk, hq, k00, k01, k11, q00, q01, q11 = self._subset(slice(None))
        u = hk @ R.transpose(0, 2, 1)  # R x_k, (K, N, 3)
        tb = t[:, None, :]
        tu = cross(tb, u)
        a = np.sum(hq[None] * tu, axis=2)
        gq0, gq1 = tu[..., 0], tu[..., 1]
        qt = cross(hq[None], tb)
        gk = qt @ R[:, :, :2]
        gk0, gk1 = gk[..., 0], gk[..., 1]
        kg0, kg1 = k00 * gk0 + k01 * gk1, k01 * gk0 + k11 * gk1
        qg0, qg1 = q00 * gq0 + q01 * gq1, q01 * gq0 + q11 * gq1
        var = gk0 * kg0 + gk1 * kg1 + gq0 * qg0 + gq1 * qg1
        s = 1.0 / np.sqrt(np.maximum(var, 1e-300))
        e = a * s
        if not jacobian:
            return e, None
        B = tangent_basis_batch(t)
        d_a = np.concatenate([cross(u, qt), cross(u, hq[None]) @ B], axis=2)
        sc0, sc1 = skew_batch(R[:, :, 0]), skew_batch(R[:, :, 1])
        zero = np.zeros(t.shape[0])
        ex_t = skew_batch(np.stack([zero, -t[:, 2], t[:, 1]], axis=1))
        ey_t = skew_batch(np.stack([t[:, 2], zero, -t[:, 0]], axis=1))
        UM = u @ np.concatenate([ex_t, ey_t, _SKEW_EX @ B, _SKEW_EY @ B], axis=2)
        QM = qt @ np.concatenate([-sc0, -sc1], axis=2)
        HM = hq @ np.concatenate([-sc0 @ B, -sc1 @ B], axis=2)
        d_var = np.empty(e.shape + (5,))
        d_var[..., :3] = (qg0[..., None] * UM[..., 0:3] + qg1[..., None] * UM[..., 3:6] + kg0[..., None] * QM[..., 0:3]
                          + kg1[..., None] * QM[..., 3:6])
        d_var[..., 3:] = (qg0[..., None] * UM[..., 6:8] + qg1[..., None] * UM[..., 8:10] + kg0[..., None] * HM[..., 0:2]
                          + kg1[..., None] * HM[..., 2:4])
        return e, d_a * s[..., None] - (a * s ** 3)[..., None] * d_var

    @staticmethod
    def batch_retract(states: tuple, delta: np.ndarray) -> tuple:
        """:meth:`retract` of K states by (K, 5) perturbations."""
        R, t = states
        t2 = t + (tangent_basis_batch(t) @ delta[:, 3:5, None])[:, :, 0]
        return so3_exp_batch(delta[:, :3]) @ R, t2 / np.linalg.norm(t2, axis=1, keepdims=True)


class PnPModel:
    """Keyframe points reprojected into the query; state: (R, t) of ``X_q = R X_k + t``; perturbation (rho, phi):
    ``X_q <- exp(phi) (R X_k + t) + rho``."""

    params, k = 6, 2

    def __init__(self, obs: Observations, depths: np.ndarray) -> None:
        self.obs, self.depths = obs, depths
        self.X = obs.hk * depths[:, None]

    def _terms(self, state: tuple, m: np.ndarray | slice, jacobian: bool = True
               ) -> tuple[np.ndarray, np.ndarray | None]:
        R, t = state
        P = self.X[m] @ R.T + t
        Jp = None
        if jacobian:
            Jp = np.concatenate([np.broadcast_to(np.eye(3), (P.shape[0], 3, 3)), -skew_batch(P)], axis=2)
        Mk = R[:, :2][None] * self.depths[m][:, None, None]
        return whitened_projection(P, Jp, Mk, self.obs.xq[m], self.obs.Ck[m], self.obs.Cq[m])

    def evaluate(self, state: tuple, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, J = self._terms(state, mask)
        return r.reshape(-1), J.reshape(-1, 6)

    def norms(self, state: tuple) -> np.ndarray:
        return np.linalg.norm(self._terms(state, slice(None), jacobian=False)[0], axis=1)

    @staticmethod
    def retract(state: tuple, delta: np.ndarray) -> tuple:
        R, t = state
        dR = so3_exp(delta[3:6])
        return dR @ R, dR @ t + delta[:3]
