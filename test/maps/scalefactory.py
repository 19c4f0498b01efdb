"""Clustered descriptors for the large-map tests: places along streets, each seen a few times with noise.

A helper module, not a test file. Like bench/bench_scale.py's city (smaller): a random walk of places in a low-rank
latent space with a decaying spectrum and a shared mean, so neighbouring places look alike (hard negatives) and
uniform-noise shortcuts (every vector orthogonal to every other) do not make approximate search look good.
"""

from __future__ import annotations

import numpy as np

from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["SCALE_DIM", "city", "city_map", "fingerprint_of"]

SCALE_DIM = 256
_LATENT = 48


def fingerprint_of(dim: int = SCALE_DIM) -> dict:
    return {"id": "dmx-5ca1e00000000001", "architecture": "dinomix_vits14", "weights_sha256": "cd" * 32,
            "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": dim}


def _basis(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    basis = rng.standard_normal((_LATENT, dim)).astype(np.float32) / np.sqrt(dim)
    basis *= ((np.arange(_LATENT) + 1.0) ** -0.5).astype(np.float32)[:, None] * 4
    mean = rng.standard_normal(dim).astype(np.float32)
    return basis, mean / np.linalg.norm(mean)


def _views(z: np.ndarray, rng: np.random.Generator, dim: int) -> np.ndarray:
    basis, mean = _basis(dim)
    x = (z + 0.5 * rng.standard_normal(z.shape)).astype(np.float32) @ basis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x += 0.3 * mean + 0.3 * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def city(n: int, n_queries: int, seed: int = 0, dim: int = SCALE_DIM, views: int = 4,
         places_per_street: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(map rows (n, dim), place of each row, queries (n_queries, dim), place of each query): unit float32."""
    rng = np.random.default_rng(seed)
    n_places = -(-n // views)
    streets = -(-n_places // places_per_street)
    steps = rng.standard_normal((streets, places_per_street, _LATENT)) * 0.7
    steps[:, 0] = rng.standard_normal((streets, _LATENT))
    z = np.cumsum(steps, axis=1).reshape(-1, _LATENT)[:n_places]
    place = np.repeat(np.arange(n_places), views)[:n]
    x = _views(z[place], rng, dim)
    q_place = rng.choice(n_places, size=n_queries, replace=False)
    return x, place, _views(z[q_place], rng, dim), q_place


def city_map(n: int, seed: int = 0, dim: int = SCALE_DIM) -> tuple[KeyframeMap, np.ndarray]:
    """A float16 map of ``city(n)`` rows with positions along the streets, and the queries."""
    x, place, queries, _ = city(n, 200, seed, dim)
    m = KeyframeMap.empty(fingerprint_of(dim))
    positions = np.column_stack([place * 10.0, (place // 10) * 100.0, np.zeros(n)])
    m.add(x, stamps_ns=np.arange(n, dtype=np.int64) * 10**8, cameras="front", frame_ids="map", positions=positions,
          sources=[f"img_{i}.jpg" for i in range(n)])
    return m, queries
