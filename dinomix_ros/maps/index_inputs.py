"""Argument checks of :class:`~dinomix_ros.maps.index.PlaceIndex`: descriptors and queries, choices, and which
backend runs a kind on a device. One place for the messages a bad input to a search gets.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import numpy as np
import torch

from dinomix_ros.maps.errors import DescriptorError, IndexConfigError

__all__ = ["ADD_CHUNK", "as_matrix", "check_choice", "check_matrix", "check_positive_int", "largest_divisor_at_most",
           "resolve_device_backend"]

LOG = logging.getLogger("dinomix_ros.maps.index")

ADD_CHUNK = 65536  # rows converted (or checked) at a time: no full-size temporaries for a large map


def resolve_device_backend(kind: str, device: str, backend: str) -> tuple[str, str]:
    cuda = torch.cuda.is_available()
    if backend == "torch" and kind != "exact":
        raise IndexConfigError(f"backend='torch' only implements kind 'exact', found kind {kind!r}. "
                               "Use backend='auto' or 'faiss' for hnsw/ivfpq.")
    if backend == "faiss" and device == "cuda":
        raise IndexConfigError("backend='faiss' runs on the CPU only (faiss-cpu), found device='cuda'. Use "
                               "backend='auto' or 'torch' for exact search on CUDA, or device='cpu'.")
    if device == "cuda" and not cuda:
        raise IndexConfigError("device='cuda' was requested but torch.cuda.is_available() is False. "
                               "Use device='auto' (CUDA when present) or device='cpu'.")
    if kind != "exact":
        if device == "cuda":
            raise IndexConfigError(f"kind {kind!r} runs on CPU only, found device='cuda'. Use device='cpu'/'auto', "
                                   "or kind='exact' (a brute-force float16 scan) on CUDA.")
        if device == "auto":
            LOG.info("device='auto': kind %r runs on CPU", kind)
        return "cpu", "faiss"
    if device == "auto":
        device = "cuda" if cuda and backend != "faiss" else "cpu"
        LOG.debug("device='auto' resolved to %s (torch.cuda.is_available()=%s, backend=%s)", device, cuda, backend)
    if device == "cpu":
        return "cpu", "torch" if backend == "torch" else "faiss"
    return "cuda", "torch"  # exact search on CUDA is the torch backend: faiss here is faiss-cpu


def check_matrix(x: np.ndarray, dim: int, name: str, limit: float | None = None) -> np.ndarray:
    """Validate descriptors/queries: float dtype, (n, dim) or (dim,) shape, finite, |x| <= limit; return (n, dim)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DescriptorError(f"{name} must be a float32/float16 array, found dtype {x.dtype}. "
                              "Pass the float descriptors returned by the encoder.")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise DescriptorError(f"{name} has shape {x.shape}, expected (n, {dim}) or ({dim},). "
                              "Check that the map and the encoder use the same descriptor dimension.")
    if limit is None and x.dtype.itemsize > 4:
        limit = float(np.finfo(np.float32).max)  # float64 values beyond this become inf in float32
    n_bad, first_bad, peak = 0, -1, 0.0
    for j0 in range(0, x.shape[0], ADD_CHUNK):  # chunked: no full-size temporaries for a large map
        chunk = x[j0:j0 + ADD_CHUNK]
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if bad.size and first_bad < 0:
            first_bad = j0 + int(bad[0])
        n_bad += bad.size
        if limit is not None and not bad.size and chunk.size:
            peak = max(peak, float(np.abs(chunk).max()))
    if n_bad:
        raise DescriptorError(f"{name} has {n_bad} row(s) with NaN/inf values (first: row {first_bad}), expected "
                              "finite descriptors. Drop those rows or fix the encoder input.")
    if limit is not None and peak > limit:
        raise DescriptorError(f"{name} has |value| {peak:.6g} > {limit:.6g}, the largest value the index stores "
                              "(float16 max for float16 storage). L2-normalise the descriptors, or store float32.")
    return x


def as_matrix(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Validate queries and return them as a C-contiguous float32 (n, dim) array."""
    return np.ascontiguousarray(check_matrix(x, dim, name), dtype=np.float32)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise IndexConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, found {value!r}.")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise IndexConfigError(f"{name} must be an int >= 1, found {value!r}.")


def largest_divisor_at_most(n: int, m: int) -> int:
    return max(d for d in range(1, min(n, m) + 1) if n % d == 0)
