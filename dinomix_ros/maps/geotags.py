"""Keyframe geotags assembled in one place: WGS84 fixes -> the ``gps`` and ``utm_*`` columns of a keyframe map.

The live node, the bag builder and the folder builder all geotag keyframes through :func:`geotag_columns`, so a
keyframe gets the same columns whatever recorded it: latitude/longitude (altitude NaN when unknown), and UTM
easting/northing in one zone per map (the map's, or the first fix's) with each position's own latitude band.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinomix_ros.maps.sources.geo import latlon_to_utm_arrays, utm_band, utm_zone
from dinomix_ros.maps.sources.poses import PoseTrack

__all__ = ["NO_POSE_FRAME", "geotag_columns", "interpolate_fixes", "unknown_geotags"]

#: Frame id of keyframes without any pose (the map format needs a non-empty frame id).
NO_POSE_FRAME = "none"


def unknown_geotags(n: int) -> dict[str, Any]:
    """Columns of ``n`` keyframes without a geotag."""
    return {"gps": np.full((n, 3), np.nan), "utm_zones": np.zeros(n, dtype=np.int64), "utm_bands": [""] * n,
            "utm": np.full((n, 2), np.nan)}


def geotag_columns(gps: np.ndarray, zone: int | None = None) -> dict[str, Any]:
    """Geotag columns for :meth:`~dinomix_ros.maps.keyframes.KeyframeMap.add` from WGS84 fixes.

    Args:
        gps: (N, 3) latitude, longitude (degrees), altitude (metres, NaN when unknown); a row with NaN latitude or
            longitude is "no geotag".
        zone: UTM zone for every row (a map's zone, so that distances stay consistent); default: the zone of the
            first geotagged row.

    Returns:
        ``{"gps": (N, 3), "utm_zones": (N,), "utm_bands": list of N str, "utm": (N, 2)}``; rows without a geotag
        are NaN / 0 / "".
    """
    gps = np.array(gps, dtype=np.float64).reshape(-1, 3)
    out = unknown_geotags(gps.shape[0])
    valid = np.isfinite(gps[:, :2]).all(axis=1)
    out["gps"][valid] = gps[valid]
    if not valid.any():
        return out
    first = int(np.flatnonzero(valid)[0])
    zone = utm_zone(float(gps[first, 0]), float(gps[first, 1])) if zone is None else int(zone)
    northern = gps[first, 0] >= 0.0
    east, north = latlon_to_utm_arrays(gps[valid, 0], gps[valid, 1], zone, northern=bool(northern))
    out["utm"][valid] = np.stack([east, north], axis=1)
    out["utm_zones"][valid] = zone
    for i in np.flatnonzero(valid):
        out["utm_bands"][i] = utm_band(float(gps[i, 0]))
    return out


def interpolate_fixes(stamps_ns: np.ndarray, gps: np.ndarray, query_ns: np.ndarray, max_gap_s: float) -> np.ndarray:
    """WGS84 fixes at query stamps, interpolated linearly between the bracketing fixes.

    Latitude/longitude and altitude are interpolated apart: over all fixes, and over the fixes that have an altitude
    (GNSS receivers drop it more often than the position). Linear interpolation of degrees is exact to well below a
    millimetre over the metres between two fixes.

    Args:
        stamps_ns: (N,) int64 fix stamps.
        gps: (N, 3) latitude, longitude, altitude (NaN when unknown); latitude/longitude finite.
        query_ns: (M,) int64 stamps.
        max_gap_s: largest time between a query and the fixes used (see ``PoseTrack.interpolate``).

    Returns:
        (M, 3): NaN rows where no fix lies within ``max_gap_s``; NaN altitude where no altitude does.
    """
    stamps = np.asarray(stamps_ns, np.int64)
    gps = np.asarray(gps, np.float64).reshape(-1, 3)
    query = np.asarray(query_ns, np.int64)
    out = np.full((query.shape[0], 3), np.nan)
    latlon = PoseTrack(stamps, gps[:, :2], None, "wgs84").interpolate(query, max_gap_s)
    out[:, :2] = latlon.positions[:, :2]
    known = np.isfinite(gps[:, 2])
    if known.any():
        alt = PoseTrack(stamps[known], np.c_[gps[known, 2], np.zeros(int(known.sum()))], None, "altitude")
        got = alt.interpolate(query, max_gap_s)
        out[:, 2] = np.where(got.valid & latlon.valid, got.positions[:, 0], np.nan)
    return out
