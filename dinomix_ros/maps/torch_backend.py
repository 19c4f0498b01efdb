"""Exact top-k inner products by blocked matmul in torch: the ``backend="torch"`` storage of
:class:`~dinomix_ros.maps.index.PlaceIndex` (CPU or CUDA), and the masked scan of faiss flat storage.

These classes trust their inputs: :class:`~dinomix_ros.maps.index.PlaceIndex` validates descriptors, queries and
masks, clamps ``k`` to the number of rows and holds the lock around every call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TORCH_DTYPES", "TorchBackend", "matmul_topk"]

#: Storage dtypes of the torch backend, by name.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_BLOCK_ELEMENTS = 1 << 26  # bound on the (queries x rows) score block and the re-scoring gather


class TorchBackend:
    """Brute-force inner product on one torch tensor: (N, dim) storage, matmul + topk, optional float32 re-scoring.

    Args:
        dim: Descriptor dimension.
        device: Where the tensor lives (CPU or CUDA).
        dtype: Storage dtype; float16 and bfloat16 candidates are re-scored in float32 (see :func:`matmul_topk`).
    """

    is_trained = True  # nothing to train: the same interface as FaissBackend

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.ntotal = 0
        self._xb = torch.empty((0, dim), dtype=dtype, device=device)

    def add(self, xb: np.ndarray) -> None:
        """Append (n, dim) float32 rows."""
        n_new = self.ntotal + xb.shape[0]
        if n_new > self._xb.shape[0]:  # grow by 1.5x so that one-by-one appends stay amortised O(1)
            cap = max(n_new, int(self._xb.shape[0] * 1.5), 1024)
            grown = torch.empty((cap, self.dim), dtype=self.dtype, device=self.device)
            grown[: self.ntotal] = self._xb[: self.ntotal]
            self._xb = grown
        src = torch.from_numpy(xb if xb.flags.writeable else xb.copy())  # from_numpy warns on read-only arrays
        self._xb[self.ntotal:n_new] = src.to(device=self.device, dtype=self.dtype)
        self.ntotal = n_new

    def vectors(self) -> np.ndarray:
        """The stored rows as a (ntotal, dim) float32 host array (float16 storage: the rounded values)."""
        return self._xb[: self.ntotal].float().cpu().numpy()

    def search(self, xq: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for (nq, dim) float32 queries, 1 <= k <= ntotal; see :func:`matmul_topk`."""
        return matmul_topk(self._xb[: self.ntotal], xq, k, mask)


@torch.inference_mode()
def matmul_topk(
    xb: torch.Tensor, xq: np.ndarray, k: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products by blocked matmul + topk; masked rows score -inf.

    Low-precision storage (float16/bfloat16) ranks ``max(2k, k + 16)`` candidates with the low-precision scores, then
    re-scores them in float32 against the float32 queries, so returned scores are exact for the stored vectors.

    Args:
        xb: (n, dim) stored rows, on the device where the search runs.
        xq: (nq, dim) float32 queries.
        k: Results per query, 1 <= k <= n.
        mask: None, (n,) or (nq, n) bool: rows that may be returned.

    Returns:
        ``(D, I)``: (nq, k) float32 scores in descending order (``-inf`` where the mask allows fewer than k rows) and
        (nq, k) int64 row numbers (arbitrary where the score is ``-inf``: the caller pads them).
    """
    n, dim = xb.shape
    nq = xq.shape[0]
    rescore = xb.dtype != torch.float32
    kc = min(n, max(2 * k, k + 16)) if rescore else k
    block = max(1, _BLOCK_ELEMENTS // n)
    if rescore:
        block = min(block, max(1, _BLOCK_ELEMENTS // (kc * dim)))
    mask_t = None if mask is None else torch.tensor(mask, device=xb.device)
    D = np.empty((nq, k), dtype=np.float32)
    I = np.empty((nq, k), dtype=np.int64)  # noqa: E741
    for i0 in range(0, nq, block):
        i1 = min(nq, i0 + block)
        q32 = torch.tensor(xq[i0:i1], device=xb.device)  # (b, dim) float32 copy (xq may be read-only)
        S = q32.to(xb.dtype) @ xb.T  # (b, n) in the storage dtype
        if mask_t is not None:
            S.masked_fill_(~(mask_t if mask_t.ndim == 1 else mask_t[i0:i1]), -math.inf)
        Dc, Ic = torch.topk(S, kc, dim=1)
        if rescore:
            # float16 scores are rounded to ~5e-4 near 1: re-score the candidates exactly in float32
            cand = xb[Ic].float()  # (b, kc, dim)
            R = torch.bmm(cand, q32.unsqueeze(2)).squeeze(2)  # (b, kc)
            R = torch.where(torch.isneginf(Dc), -math.inf, R)
            Dc, order = torch.topk(R, k, dim=1)
            Ic = torch.gather(Ic, 1, order)
        D[i0:i1] = Dc.float().cpu().numpy()
        I[i0:i1] = Ic.cpu().numpy()
    return D, I
