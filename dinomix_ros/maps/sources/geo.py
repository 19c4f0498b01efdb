"""WGS84 latitude/longitude <-> UTM, and GPS positions from EXIF.

The projection is the transverse Mercator with Krüger's n-series to 6th order (Karney 2011, "Transverse Mercator
with an accuracy of a few nanometers", J. Geodesy 85(8), eqs. 7, 9, 11, 35, 36; the series GeographicLib's
``TransverseMercator`` uses). Within the UTM zones (and several degrees beyond) the error is far below a millimetre.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "WGS84_A",
    "WGS84_F",
    "UTM_K0",
    "UTM_BANDS",
    "ExifGPSError",
    "UTMCoord",
    "GeoFix",
    "utm_zone",
    "utm_band",
    "central_meridian",
    "latlon_to_utm",
    "utm_to_latlon",
    "latlon_to_utm_arrays",
    "utm_to_latlon_arrays",
    "read_exif_gps",
    "UTM_FRAME",
    "utm_frame_id",
    "parse_utm_frame",
    "is_utm_frame",
]

logger = logging.getLogger(__name__)

WGS84_A = 6378137.0  # semi-major axis [m]
WGS84_F = 1.0 / 298.257223563  # flattening
UTM_K0 = 0.9996  # scale on the central meridian
UTM_FALSE_EASTING = 500_000.0
UTM_FALSE_NORTHING_SOUTH = 10_000_000.0
UTM_LAT_MIN = -80.0  # UTM covers 80S .. 84N; the poles are UPS
UTM_LAT_MAX = 84.0
UTM_BANDS = "CDEFGHJKLMNPQRSTUVWX"  # MGRS latitude bands, 8 degrees each from 80S (X spans 72N..84N)
MAX_FORCED_ZONE_OFFSET_DEG = 30.0  # a forced zone may be this far from the point; the series stay sub-mm

_E2 = WGS84_F * (2.0 - WGS84_F)  # first eccentricity squared
_E = math.sqrt(_E2)
_N = WGS84_F / (2.0 - WGS84_F)  # third flattening


def _krueger_coefficients(n: float) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    """Rectifying radius A and the alpha (forward) and beta (inverse) coefficients (Karney 2011, eqs. 14, 35, 36)."""
    n2, n3, n4, n5, n6 = n**2, n**3, n**4, n**5, n**6
    big_a = WGS84_A / (1.0 + n) * (1.0 + n2 / 4.0 + n4 / 64.0 + n6 / 256.0)
    alpha = (
        n / 2 - 2 * n2 / 3 + 5 * n3 / 16 + 41 * n4 / 180 - 127 * n5 / 288 + 7891 * n6 / 37800,
        13 * n2 / 48 - 3 * n3 / 5 + 557 * n4 / 1440 + 281 * n5 / 630 - 1983433 * n6 / 1935360,
        61 * n3 / 240 - 103 * n4 / 140 + 15061 * n5 / 26880 + 167603 * n6 / 181440,
        49561 * n4 / 161280 - 179 * n5 / 168 + 6601661 * n6 / 7257600,
        34729 * n5 / 80640 - 3418889 * n6 / 1995840,
        212378941 * n6 / 319334400,
    )
    beta = (
        n / 2 - 2 * n2 / 3 + 37 * n3 / 96 - n4 / 360 - 81 * n5 / 512 + 96199 * n6 / 604800,
        n2 / 48 + n3 / 15 - 437 * n4 / 1440 + 46 * n5 / 105 - 1118711 * n6 / 3870720,
        17 * n3 / 480 - 37 * n4 / 840 - 209 * n5 / 4480 + 5569 * n6 / 90720,
        4397 * n4 / 161280 - 11 * n5 / 504 - 830251 * n6 / 7257600,
        4583 * n5 / 161280 - 108847 * n6 / 3991680,
        20648693 * n6 / 638668800,
    )
    return big_a, alpha, beta


_A, _ALPHA, _BETA = _krueger_coefficients(_N)


class ExifGPSError(ValueError):
    """An image's EXIF GPS tags are present but malformed, or the file is not a readable image."""


@dataclass(frozen=True)
class UTMCoord:
    """A UTM position: easting/northing in metres, zone 1..60 and MGRS latitude band letter C..X."""

    easting: float
    northing: float
    zone: int
    band: str

    def __post_init__(self) -> None:
        _check_zone(self.zone)
        if not isinstance(self.band, str) or len(self.band) != 1 or self.band.upper() not in UTM_BANDS:
            raise ValueError(
                f"UTM band {self.band!r} is not a latitude band letter; expected one of {UTM_BANDS} "
                "(C..X without I and O); use utm_band(lat) to compute it"
            )
        if self.band != self.band.upper():
            object.__setattr__(self, "band", self.band.upper())
        if not (math.isfinite(self.easting) and math.isfinite(self.northing)):
            raise ValueError(
                f"UTM easting/northing must be finite, got ({self.easting}, {self.northing}); check the source data"
            )

    @property
    def northern(self) -> bool:
        """True for bands N..X (northern hemisphere, no false northing)."""
        return self.band >= "N"

    def __str__(self) -> str:
        return f"{self.zone}{self.band} {self.easting:.3f} {self.northing:.3f}"


@dataclass(frozen=True)
class GeoFix:
    """A WGS84 position in degrees, with the altitude above sea level in metres when known."""

    lat: float
    lon: float
    alt: float | None = None


def _check_zone(zone: object) -> int:
    if isinstance(zone, (bool, np.bool_)) or not isinstance(zone, (int, np.integer)) or not 1 <= int(zone) <= 60:
        raise ValueError(f"UTM zone {zone!r} is invalid; expected an integer in 1..60")
    return int(zone)


def _check_latlon(lat: np.ndarray, lon: np.ndarray) -> None:
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise ValueError("latitude/longitude contain NaN or inf; expected finite degrees (drop points without a fix)")
    bad = (lat < UTM_LAT_MIN) | (lat > UTM_LAT_MAX)
    if np.any(bad):
        raise ValueError(
            f"latitude {float(lat[bad][0])} is outside UTM, which covers {UTM_LAT_MIN}..{UTM_LAT_MAX} degrees "
            "(the polar regions use UPS); check that latitude and longitude are not swapped"
        )
    bad = (lon < -180.0) | (lon > 180.0)
    if np.any(bad):
        raise ValueError(
            f"longitude {float(lon[bad][0])} is outside -180..180 degrees; check that latitude and longitude "
            "are not swapped and that the value is in degrees"
        )


def central_meridian(zone: int) -> float:
    """Longitude in degrees of the central meridian of UTM ``zone`` (1..60)."""
    return 6.0 * _check_zone(zone) - 183.0


def utm_band(lat: float) -> str:
    """MGRS latitude band letter (C..X) of ``lat`` in degrees.

    Raises:
        ValueError: if ``lat`` is outside -80..84 (not covered by UTM).
    """
    lat_arr = np.asarray([lat], dtype=np.float64)
    _check_latlon(lat_arr, np.zeros(1))
    return UTM_BANDS[min(int((float(lat) - UTM_LAT_MIN) // 8.0), len(UTM_BANDS) - 1)]


def utm_zone(lat: float, lon: float) -> int:
    """Standard UTM zone of a point, including the Norway (32V) and Svalbard (31X..37X) exceptions.

    Raises:
        ValueError: if the point is outside UTM or the longitude is outside -180..180.
    """
    _check_latlon(np.asarray([lat], dtype=np.float64), np.asarray([lon], dtype=np.float64))
    lon = float(lon)
    if lon >= 180.0:  # 180E is 180W
        lon -= 360.0
    zone = int((lon + 180.0) // 6.0) + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:  # band V: zone 32 is widened over south-west Norway
        zone = 32
    elif lat >= 72.0 and 0.0 <= lon < 42.0:  # band X (Svalbard): zones 31, 33, 35, 37 only
        zone = 31 if lon < 9.0 else 33 if lon < 21.0 else 35 if lon < 33.0 else 37
    return zone


def _forward(lat_deg: np.ndarray, dlon_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transverse Mercator (x, y) in metres, scale k0, relative to the central meridian (Karney 2011, sec. 4)."""
    phi = np.radians(lat_deg)
    lam = np.radians(dlon_deg)
    tau = np.tan(phi)
    sigma = np.sinh(_E * np.arctanh(_E * tau / np.hypot(1.0, tau)))
    tau_p = tau * np.hypot(1.0, sigma) - sigma * np.hypot(1.0, tau)  # conformal latitude, eq. 7
    xi_p = np.arctan2(tau_p, np.cos(lam))
    eta_p = np.arcsinh(np.sin(lam) / np.hypot(tau_p, np.cos(lam)))
    xi = xi_p.copy()
    eta = eta_p.copy()
    for j, a in enumerate(_ALPHA, start=1):  # eq. 11
        xi += a * np.sin(2 * j * xi_p) * np.cosh(2 * j * eta_p)
        eta += a * np.cos(2 * j * xi_p) * np.sinh(2 * j * eta_p)
    return UTM_K0 * _A * eta, UTM_K0 * _A * xi


def _inverse(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_forward`: (lat, dlon) in degrees (Karney 2011, eqs. 11 inverted with beta, 19-21)."""
    xi = y / (UTM_K0 * _A)
    eta = x / (UTM_K0 * _A)
    xi_p = xi.copy()
    eta_p = eta.copy()
    for j, b in enumerate(_BETA, start=1):
        xi_p -= b * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
        eta_p -= b * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
    tau_p = np.sin(xi_p) / np.hypot(np.sinh(eta_p), np.cos(xi_p))
    lam = np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    # Newton's method for tau from tau' (eqs. 19-21); converges to double precision in 2-3 steps.
    tau = tau_p.copy()
    for _ in range(5):
        sigma = np.sinh(_E * np.arctanh(_E * tau / np.hypot(1.0, tau)))
        tau_i = tau * np.hypot(1.0, sigma) - sigma * np.hypot(1.0, tau)
        dtau = (tau_p - tau_i) / np.hypot(1.0, tau_i) * (1.0 + (1.0 - _E2) * tau**2) / (
            (1.0 - _E2) * np.hypot(1.0, tau)
        )
        tau = tau + dtau
        if np.all(np.abs(dtau) <= 1e-14 * np.maximum(1.0, np.abs(tau))):
            break
    return np.degrees(np.arctan(tau)), np.degrees(lam)


def _wrap_dlon(lon: np.ndarray, zone: int) -> np.ndarray:
    dlon = lon - central_meridian(zone)
    return (dlon + 180.0) % 360.0 - 180.0  # zones 1 and 60 meet at the antimeridian


def latlon_to_utm_arrays(
    lat: np.ndarray, lon: np.ndarray, zone: int, northern: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Project many points into one fixed UTM zone (vectorised).

    Args:
        lat: latitudes in degrees, any shape, within -80..84.
        lon: longitudes in degrees, same shape as ``lat``.
        zone: the UTM zone (1..60) used for every point, e.g. ``latlon_to_utm(lat[0], lon[0]).zone``.
        northern: hemisphere convention for the northing; None picks it per point from the sign of the latitude
            (standard UTM: false northing 10,000 km south of the equator). Pass True/False to keep one
            continuous northing for a map that crosses the equator.

    Returns:
        (easting, northing) in metres, float64 arrays of the input shape.

    Raises:
        ValueError: for non-finite or out-of-range coordinates, mismatched shapes, an invalid zone, or a point
            more than 30 degrees of longitude from the zone's central meridian.
    """
    zone = _check_zone(zone)
    lat_a = np.asarray(lat, dtype=np.float64)
    lon_a = np.asarray(lon, dtype=np.float64)
    if lat_a.shape != lon_a.shape:
        raise ValueError(f"lat has shape {lat_a.shape} but lon has shape {lon_a.shape}; expected equal shapes")
    _check_latlon(lat_a, lon_a)
    dlon = _wrap_dlon(lon_a, zone)
    far = np.abs(dlon) > MAX_FORCED_ZONE_OFFSET_DEG
    if np.any(far):
        raise ValueError(
            f"longitude {float(lon_a[far][0])} is {float(np.abs(dlon[far][0])):.1f} degrees from the central meridian "
            f"of UTM zone {zone} ({central_meridian(zone)}); expected at most {MAX_FORCED_ZONE_OFFSET_DEG} degrees. "
            "Use the point's own zone (zone=None) or a nearer zone"
        )
    x, y = _forward(lat_a, dlon)
    easting = x + UTM_FALSE_EASTING
    south = (lat_a < 0.0) if northern is None else np.full(lat_a.shape, not northern)
    northing = np.where(south, y + UTM_FALSE_NORTHING_SOUTH, y)
    return easting, northing


def utm_to_latlon_arrays(
    easting: np.ndarray, northing: np.ndarray, zone: int, northern: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse projection of many points of one UTM zone and hemisphere (vectorised).

    Args:
        easting: eastings in metres (with the 500 km false easting), any shape.
        northing: northings in metres, same shape (southern hemisphere: with the 10,000 km false northing).
        zone: UTM zone 1..60.
        northern: True for the northern hemisphere (bands N..X).

    Returns:
        (lat, lon) in degrees, float64 arrays of the input shape; lon is wrapped to [-180, 180).

    Raises:
        ValueError: for non-finite values, mismatched shapes or an invalid zone.
    """
    zone = _check_zone(zone)
    e = np.asarray(easting, dtype=np.float64)
    n = np.asarray(northing, dtype=np.float64)
    if e.shape != n.shape:
        raise ValueError(f"easting has shape {e.shape} but northing has shape {n.shape}; expected equal shapes")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(n))):
        raise ValueError("easting/northing contain NaN or inf; expected finite metres")
    y = n if northern else n - UTM_FALSE_NORTHING_SOUTH
    lat, dlon = _inverse(e - UTM_FALSE_EASTING, y)
    lon = (dlon + central_meridian(zone) + 180.0) % 360.0 - 180.0
    return lat, lon


def latlon_to_utm(lat: float, lon: float, zone: int | None = None) -> UTMCoord:
    """Project one WGS84 point to UTM.

    Args:
        lat: latitude in degrees, -80..84.
        lon: longitude in degrees, -180..180.
        zone: force this zone (1..60) instead of the standard one, e.g. to keep a map that straddles a zone
            boundary in one metric frame. The band letter always follows the latitude.

    Returns:
        The UTM coordinate (standard false easting/northing; southern latitudes get the 10,000 km false northing).

    Raises:
        ValueError: if the point is outside UTM (latitude outside -80..84, longitude outside -180..180), not
            finite, or more than 30 degrees from the forced zone's central meridian.
    """
    zone = utm_zone(lat, lon) if zone is None else _check_zone(zone)
    e, n = latlon_to_utm_arrays(np.asarray([lat]), np.asarray([lon]), zone)
    return UTMCoord(float(e[0]), float(n[0]), zone, utm_band(lat))


def utm_to_latlon(easting: float, northing: float, zone: int, northern: bool) -> tuple[float, float]:
    """Inverse-project one UTM coordinate to WGS84 (lat, lon) in degrees.

    Args:
        easting: metres, with the 500 km false easting.
        northing: metres; for the southern hemisphere with the 10,000 km false northing.
        zone: UTM zone 1..60.
        northern: True for bands N..X (``UTMCoord.northern``).

    Returns:
        (lat, lon) in degrees.

    Raises:
        ValueError: for an invalid zone, non-finite values or a northing outside 0..10,000 km.
    """
    if not (math.isfinite(northing) and 0.0 <= northing <= UTM_FALSE_NORTHING_SOUTH):
        raise ValueError(
            f"UTM northing {northing} is outside 0..10,000,000 m; southern-hemisphere northings include the "
            "10,000 km false northing (pass northern=False), northern ones start at 0 on the equator"
        )
    lat, lon = utm_to_latlon_arrays(np.asarray([easting]), np.asarray([northing]), zone, northern)
    return float(lat[0]), float(lon[0])


def _ref_letter(value: object, tag: str, allowed: str, path: Path) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    letter = str(value).strip("\x00 ").upper() if value is not None else ""
    if len(letter) != 1 or letter not in allowed:  # note: "" is "in" every string
        raise ExifGPSError(
            f"{path}: EXIF {tag} is {value!r}; expected one of {', '.join(allowed)}. The GPS tags are malformed: "
            "rewrite them (e.g. exiftool) or use another geotag source"
        )
    return letter


def _dms_to_degrees(value: object, tag: str, limit: float, path: Path) -> float:
    try:
        parts = [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)]  # type: ignore
    except (TypeError, ValueError, ZeroDivisionError):
        parts = []
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0.0 for p in parts):
        raise ExifGPSError(
            f"{path}: EXIF {tag} is {value!r}; expected 1-3 non-negative finite rationals (degrees, minutes, "
            "seconds). The GPS tags are malformed: rewrite them or use another geotag source"
        )
    degrees = sum(p / 60.0**i for i, p in enumerate(parts))
    if degrees > limit:
        raise ExifGPSError(
            f"{path}: EXIF {tag} is {degrees} degrees; expected at most {limit}. The GPS tags are malformed: "
            "rewrite them or use another geotag source"
        )
    return degrees


def read_exif_gps(path: str | Path) -> GeoFix | None:
    """Read the GPS position from an image's EXIF GPS IFD (tag 0x8825).

    Args:
        path: an image file Pillow can open (JPEG, TIFF, PNG or WebP with EXIF).

    Returns:
        The fix (latitude/longitude in degrees, signed by their N/S and E/W references; altitude in metres, negative
        when GPSAltitudeRef says below sea level, None when absent), or None when the image has no GPS position.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ExifGPSError: (a ValueError) if the file is not a readable image or its GPS tags are malformed, e.g. a
            latitude without a longitude, a missing or unknown reference letter, or a zero denominator.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; expected a path to an image file")
    try:
        with Image.open(path) as img:
            gps = dict(img.getexif().get_ifd(0x8825))
    except UnidentifiedImageError as exc:
        raise ExifGPSError(f"{path} is not an image Pillow can read ({exc}); expected a JPEG/PNG/TIFF/WebP") from exc
    has_lat, has_lon = 2 in gps, 4 in gps
    if not has_lat and not has_lon:
        return None
    if has_lat != has_lon:
        missing = "GPSLongitude" if has_lat else "GPSLatitude"
        raise ExifGPSError(
            f"{path}: EXIF GPS has {'GPSLatitude' if has_lat else 'GPSLongitude'} but no {missing}; expected both. "
            "Rewrite the GPS tags or use another geotag source"
        )
    lat = _dms_to_degrees(gps[2], "GPSLatitude", 90.0, path)
    lon = _dms_to_degrees(gps[4], "GPSLongitude", 180.0, path)
    if _ref_letter(gps.get(1), "GPSLatitudeRef", "NS", path) == "S":
        lat = -lat
    if _ref_letter(gps.get(3), "GPSLongitudeRef", "EW", path) == "W":
        lon = -lon
    alt = None
    if 6 in gps:
        try:
            alt = float(gps[6])
        except (TypeError, ValueError, ZeroDivisionError):
            alt = math.nan
        if not math.isfinite(alt):
            # Some cameras write 0/0 for "no altitude"; the horizontal fix is still usable.
            logger.warning("%s: EXIF GPSAltitude is %r, not a finite number; altitude ignored", path, gps[6])
            alt = None
        else:
            raw = gps.get(5, 0)  # a BYTE tag: Pillow gives b"\x01" or 1
            try:
                ref = raw[0] if isinstance(raw, bytes) and len(raw) == 1 else int(raw)
            except (TypeError, ValueError):
                ref = raw
            if ref not in (0, 1):
                raise ExifGPSError(
                    f"{path}: EXIF GPSAltitudeRef is {ref!r}; expected 0 (above sea level) or 1 (below). "
                    "Rewrite the GPS tags or use another geotag source"
                )
            if ref == 1:
                alt = -alt
    return GeoFix(lat=lat, lon=lon, alt=alt)


#: Frame id of positions given as UTM easting, northing, altitude: ``utm``, the frame that robot_localization's
#: navsat_transform_node broadcasts (``broadcast_cartesian_transform``: ``world_frame -> utm``, navsat_transform.cpp),
#: so a TF tree can relate it to ``map``. The zone is not in the name: each keyframe stores its zone and band
#: (``utm_zone``/``utm_band`` columns), one zone per map; navsat_transform uses the zone of its first fix (or the one
#: its ``setUTMZone`` service sets), which must be the map's.
UTM_FRAME = "utm"
_LEGACY_UTM_FRAME_RE = re.compile(r"^utm_(\d{1,2})([C-HJ-NP-X])$")


def utm_frame_id() -> str:
    """Frame id of positions given as UTM easting/northing/altitude: :data:`UTM_FRAME`."""
    return UTM_FRAME


def parse_utm_frame(frame_id: str) -> tuple[int, str] | None:
    """(zone, band) of a legacy ``utm_<zone><band>`` frame id (e.g. ``utm_33U``: maps made before the frame became
    :data:`UTM_FRAME`; they are renamed when loaded), or None for any other frame."""
    m = _LEGACY_UTM_FRAME_RE.match(frame_id)
    return (int(m.group(1)), m.group(2)) if m else None


def is_utm_frame(frame_id: str) -> bool:
    """Whether positions in ``frame_id`` are UTM coordinates (:data:`UTM_FRAME`, or a legacy ``utm_33U``)."""
    return frame_id == UTM_FRAME or parse_utm_frame(frame_id) is not None
