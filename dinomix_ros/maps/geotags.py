"""Keyframe geotags assembled in one place: WGS84 fixes -> the ``gps`` and ``utm_*`` columns of a keyframe map.

The live node, the bag builder and the folder builder all geotag keyframes through :func:`geotag_columns`, so a
keyframe gets the same columns whatever recorded it: latitude/longitude (altitude NaN when unknown), and UTM
easting/northing in one zone per map (the map's, or the first fix's) with each position's own latitude band.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinomix_ros.maps.sources import geo
from dinomix_ros.maps.sources.poses import PoseTrack

__all__ = ["NO_POSE_FRAME", "GpsTrack", "geotag_columns", "interpolate_fixes", "unknown_geotags",
           "rename_legacy_utm_frames"]

#: Frame id of keyframes without any pose (the map format needs a non-empty frame id).
NO_POSE_FRAME = "none"


def unknown_geotags(n: int) -> dict[str, Any]:
    """Columns of ``n`` keyframes without a geotag."""
    return {"gps": np.full((n, 3), np.nan), "utm_zones": np.zeros(n, dtype=np.int64), "utm_bands": [""] * n,
            "utm": np.full((n, 2), np.nan)}


def geotag_columns(gps: np.ndarray, zone: int | None = None, *, northern: bool | None = None,
                   utm: np.ndarray | None = None, bands: list[str] | None = None) -> dict[str, Any]:
    """Geotag columns for :meth:`~dinomix_ros.maps.keyframes.KeyframeMap.add` from WGS84 fixes.

    Args:
        gps: (N, 3) latitude, longitude (degrees), altitude (metres, NaN when unknown); a row with NaN latitude or
            longitude has no fix.
        zone: UTM zone for every row (a map's zone, so that distances stay consistent); default: the zone of the
            first row with a fix or a given UTM position.
        northern: hemisphere convention of the northings (default: that of the first fix), so that a track which
            crosses the equator keeps one continuous northing.
        utm: (N, 2) easting, northing already known in ``zone`` (e.g. from ``@UTM@`` file names): used as they are;
            NaN rows are projected from their fix. Needs ``zone`` and ``bands``.
        bands: latitude band letter per row of ``utm`` (rows without a fix take theirs from here).

    Returns:
        ``{"gps": (N, 3), "utm_zones": (N,), "utm_bands": list of N str, "utm": (N, 2)}``; rows without a geotag
        are NaN / 0 / "".
    """
    gps = np.array(gps, dtype=np.float64).reshape(-1, 3)
    n = gps.shape[0]
    out = unknown_geotags(n)
    fixed = np.isfinite(gps[:, :2]).all(axis=1)
    out["gps"][fixed] = gps[fixed]
    given = np.zeros(n, dtype=bool) if utm is None else np.isfinite(np.asarray(utm, np.float64)).all(axis=1)
    if given.any():
        if zone is None or bands is None:
            raise ValueError("given UTM positions need their zone and band letters")
        out["utm"][given] = np.asarray(utm, np.float64)[given]
    project = fixed & ~given
    if project.any():
        first = int(np.flatnonzero(fixed)[0])
        zone = geo.utm_zone(float(gps[first, 0]), float(gps[first, 1])) if zone is None else int(zone)
        northern = bool(gps[first, 0] >= 0.0) if northern is None else northern
        east, north = geo.latlon_to_utm_arrays(gps[project, 0], gps[project, 1], zone, northern=northern)
        out["utm"][project] = np.stack([east, north], axis=1)
    for i in np.flatnonzero(fixed | given):
        out["utm_zones"][i] = zone
        out["utm_bands"][i] = bands[i] if given[i] else geo.utm_band(float(gps[i, 0]))
    return out


def rename_legacy_utm_frames(frame_ids: np.ndarray, utm_zones: np.ndarray) -> np.ndarray:
    """Frame ids with the legacy ``utm_<zone><band>`` frames of older maps renamed to ``utm`` (a frame a TF tree has:
    navsat_transform's), when that changes nothing they mean: one zone in the map, and every renamed row's stored
    ``utm_zone`` (0 = none stored) equal to its frame's. Anything else is returned unchanged (and still loads)."""
    parsed = {f: geo.parse_utm_frame(f) for f in set(frame_ids.tolist())}
    legacy = {f: p for f, p in parsed.items() if p is not None}
    if not legacy or len({zone for zone, _ in legacy.values()}) != 1:
        return frame_ids
    zone = next(iter(legacy.values()))[0]
    rows = np.isin(frame_ids, list(legacy))
    if np.any((utm_zones[rows] != 0) & (utm_zones[rows] != zone)):
        return frame_ids
    out = frame_ids.astype(object)  # a copy: the loaded column stays read-only
    out[rows] = geo.UTM_FRAME
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


class GpsTrack:
    """GNSS fixes -> keyframe geotags at image stamps (bag builds; the live node's pose buffer does the same).

    Fixes are interpolated by :func:`interpolate_fixes` and projected by :func:`geotag_columns` in one UTM zone for
    the whole track (the first fix's, or ``utm_zone``) and the first fix's hemisphere.

    Args:
        stamps_ns: (N,) int64 fix stamps.
        lat: (N,) degrees.
        lon: (N,) degrees.
        alt: (N,) metres, NaN where unknown; None = all unknown.
        utm_zone: force this UTM zone (1..60).

    Raises:
        PoseTrackError: empty, non-integer stamps or non-finite coordinates.
    """

    def __init__(self, stamps_ns: np.ndarray, lat: np.ndarray, lon: np.ndarray, alt: np.ndarray | None = None,
                 utm_zone: int | None = None) -> None:
        lat = np.asarray(lat, dtype=np.float64)
        alt = np.full(lat.shape, np.nan) if alt is None else np.asarray(alt, dtype=np.float64)
        self._stamps = np.asarray(stamps_ns)
        self._gps = np.stack([lat, np.asarray(lon, dtype=np.float64), alt], axis=1)
        PoseTrack(self._stamps, self._gps[:, :2], None, "wgs84")  # the same checks as the interpolation will make
        self.zone = utm_zone if utm_zone is not None else geo.utm_zone(float(lat[0]), float(self._gps[0, 1]))
        self.northern = bool(lat[0] >= 0.0)

    @classmethod
    def from_fixes(cls, fixes: Any, utm_zone: int | None = None) -> GpsTrack:
        """A track over :func:`~dinomix_ros.maps.sources.bags.read_gps_fixes` output."""
        return cls(fixes.stamps_ns, fixes.lat, fixes.lon, fixes.alt, utm_zone)

    def __len__(self) -> int:
        return int(self._stamps.shape[0])

    def geotag(self, stamps_ns: np.ndarray, max_gap_s: float) -> dict[str, Any]:
        """Geotag columns at the given stamps, plus ``"valid"`` (M,) bool: a fix within ``max_gap_s``."""
        gps = interpolate_fixes(self._stamps, self._gps, stamps_ns, max_gap_s)
        columns = geotag_columns(gps, self.zone, northern=self.northern)
        columns["valid"] = np.isfinite(gps[:, 0])
        return columns
