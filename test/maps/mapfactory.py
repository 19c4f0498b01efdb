"""Sample keyframe maps and a bit-exact map comparison, shared by test_keyframes.py (table) and test_storage.py (disk).

A helper module, not a test file: tests import it from the test directory (``from mapfactory import ...``).
"""

from __future__ import annotations

import numpy as np

from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["COLUMNS", "DIM", "STAMP0", "assert_same_map", "fingerprint", "full_map", "quats", "unit"]

DIM = 64
STAMP0 = 1_700_000_000_123_456_789  # not representable as float64: any float round trip would change it


def fingerprint(model_id: str = "dmx-1a2b3c4d5e6f7a8b", dim: int = DIM) -> dict:
    return {"id": model_id, "architecture": "dinomix_vitb14", "weights_sha256": "ab" * 32,
            "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": dim}


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def quats(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.standard_normal((n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def full_map(rng: np.random.Generator, n: int = 12, storage_dtype: str = "float16") -> tuple[KeyframeMap, np.ndarray]:
    """A map exercising every field: unknowns, unicode, awkward strings and floats; returns it and the input."""
    m = KeyframeMap.empty(fingerprint(), storage_dtype=storage_dtype,
                          metadata={"name": "office", "notes": "ünïcode ✓", "calibration": {"min_similarity": 0.61}})
    desc = unit(rng, n)
    positions = rng.standard_normal((n, 3)) * 1e3
    positions[2] = np.nan
    positions[3] = [-0.0, 5e-324, 1.7976931348623157e308]
    orientations = quats(rng, n)
    orientations[4] = np.nan
    gps = np.column_stack([55.69 + rng.random(n) * 1e-3, 13.19 + rng.random(n) * 1e-3, rng.random(n) * 40])
    gps[5] = np.nan
    gps[6, 2] = np.nan  # altitude alone unknown
    utm = np.column_stack([386581.59 + rng.random(n), 6173962.88 + rng.random(n)])
    zones = np.full(n, 33)
    bands = ["U"] * n
    utm[7], zones[7], bands[7] = np.nan, 0, ""
    cameras = ["front", "caméra_arrière", "前カメラ"] * (n // 3) + ["front"] * (n % 3)
    sources = [f'bag:/cam, "{i}"/image_raw@{STAMP0 + i}' for i in range(n)]
    sources[8] = ""
    m.add(desc, stamps_ns=STAMP0 + np.arange(n, dtype=np.int64) * 33_333_333, cameras=cameras,
          frame_ids=["map"] * (n - 2) + ["utm", "odom"], positions=positions, orientations=orientations, gps=gps,
          utm_zones=zones, utm_bands=bands, utm=utm, sources=sources)
    return m, desc


COLUMNS = ("ids", "stamps_ns", "cameras", "frame_ids", "positions", "orientations", "gps", "utm_zones", "utm_bands",
           "utm", "sources")


def assert_same_map(a: KeyframeMap, b: KeyframeMap) -> None:
    assert len(a) == len(b)
    assert a.descriptor_dim == b.descriptor_dim and a.storage_dtype == b.storage_dtype
    assert a.fingerprint == b.fingerprint and a.metadata == b.metadata and a.next_id == b.next_id
    for col in COLUMNS:
        x, y = getattr(a, col), getattr(b, col)
        assert x.dtype == y.dtype and x.shape == y.shape, col
        if x.dtype.kind == "f":  # bit-exact, so -0.0 and NaN placement count
            assert np.array_equal(x.view(np.int64), y.view(np.int64)), col
        else:
            assert x.tolist() == y.tolist(), col
    assert a.descriptors.dtype == b.descriptors.dtype
    assert np.array_equal(np.asarray(a.descriptors), np.asarray(b.descriptors))
