"""Maps for fleet tests: keyframes placed at known distances (positions and GPS fixes), and points on the sphere.

A helper module, not a test file (``from fleetfactory import ...``), for the map, localization, CLI and node tests.
"""

from __future__ import annotations

import math

import numpy as np

from dinomix_ros.maps.fleet.region import EARTH_RADIUS_M
from dinomix_ros.maps.geotags import geotag_columns
from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["destination", "fleet_fingerprint", "placed_map", "random_map", "unit"]

DIM = 4096  # DINO-Mix's descriptor length: the fleet collection is tested at its real width


def fleet_fingerprint(model_id: str = "dmx-f1ee7f1ee7f1ee70", dim: int = DIM) -> dict:
    return {"id": model_id, "architecture": "dinomix_vitb14", "weights_sha256": "ab" * 32,
            "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": dim}


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """``n`` random unit vectors."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def destination(lat: float, lon: float, bearing_deg: float, distance_m: float) -> tuple[float, float]:
    """The point ``distance_m`` from (lat, lon) along ``bearing_deg`` on the sphere of EARTH_RADIUS_M."""
    p1, l1, t, d = math.radians(lat), math.radians(lon), math.radians(bearing_deg), distance_m / EARTH_RADIUS_M
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(t))
    l2 = l1 + math.atan2(math.sin(t) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 540.0) % 360.0 - 180.0


def random_map(rng: np.random.Generator, n: int, fp: dict | None = None, *, camera: str = "front",
               source: str = "live:/front") -> KeyframeMap:
    """``n`` keyframes with random descriptors, posed along x in frame map."""
    fp = fp or fleet_fingerprint()
    kmap = KeyframeMap.empty(fp)
    positions = np.column_stack([np.arange(n, dtype=np.float64), np.zeros(n), np.zeros(n)])
    kmap.add(unit(rng, n, fp["descriptor_dim"]), stamps_ns=np.arange(n, dtype=np.int64) * 10**8, cameras=camera,
             frame_ids="map", positions=positions, sources=source)
    return kmap


def placed_map(rng: np.random.Generator, center_xy: tuple[float, float], center_gps: tuple[float, float],
               radius: float, fp: dict | None = None) -> tuple[KeyframeMap, set[int], set[int]]:
    """Keyframes at known distances from a position centre (frame map) and from a GPS centre, with the rows that
    trip naive filters: corners of the bounding box outside the circle, the centre in another frame, no position.

    Returns:
        The map, the ids within ``radius`` of ``center_xy`` in frame map, and those within ``radius`` of
        ``center_gps``.
    """
    fp = fp or fleet_fingerprint()
    kmap = KeyframeMap.empty(fp)
    near_xy, near_gps = set(), set()
    cx, cy = center_xy
    fractions = (0.0, 0.4, 0.95, 1.05, 1.3, 2.5)
    rows = []  # (frame, position, gps)
    for bearing in range(0, 360, 45):
        for f in fractions:
            a = math.radians(bearing)
            rows.append(("map", (cx + f * radius * math.cos(a), cy + f * radius * math.sin(a), 0.5), None, f <= 1))
    for corner in ((1, 1), (-1, 1), (1, -1), (-1, -1)):  # in the box, outside the circle
        rows.append(("map", (cx + 0.95 * radius * corner[0], cy + 0.95 * radius * corner[1], 0.0), None, False))
    rows.append(("odom", (cx, cy, 0.0), None, False))  # the centre, in another frame
    rows.append(("none", None, None, False))  # no position at all
    for bearing in range(0, 360, 30):
        for f in fractions:
            rows.append(("utm", None, destination(*center_gps, bearing + 7.0, f * radius), f <= 1))
    for i, (frame, pos, gps, inside) in enumerate(rows):
        columns = {} if gps is None else geotag_columns(np.array([[gps[0], gps[1], 12.0]]))
        kmap.add(unit(rng, 1, fp["descriptor_dim"]), stamps_ns=[i * 10**8], cameras="front", frame_ids=frame,
                 positions=None if pos is None else np.array([pos]), sources=f"test:{i}", **columns)
        if inside:
            (near_gps if gps is not None else near_xy).add(i)
    return kmap, near_xy, near_gps
