"""The region a robot pulls from the fleet map: a circle around a position (in one frame) or a GPS fix.

A pull asks the server for the keyframes in the circle's bounding box (a filter expression on scalar fields, which
the server evaluates: :meth:`Region.box_filter`) and keeps those inside the circle (:meth:`Region.distances`, exact,
on the client). Positions: horizontal (x, y) distance in the region's frame (keyframes of other frames are never in
it). GPS: great-circle distance on the sphere of the WGS84 mean radius (:func:`great_circle_m`; within 0.5 % of the
ellipsoidal distance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinomix_ros.maps.masks import mask_within_radius

__all__ = ["EARTH_RADIUS_M", "Region", "great_circle_m", "parse_center", "quote"]

#: WGS84 mean radius (IUGG R1), metres.
EARTH_RADIUS_M = 6_371_008.8
_MARGIN = 1.01  # the box is 1 % larger than the circle: float rounding never drops a keyframe on its edge
_MAX_COORD = 1e9  # positions beyond this are refused (a typo, not a place)


def quote(text: str) -> str:
    """``text`` as a string literal of a Milvus filter expression (backslashes and double quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(value: float) -> str:
    """A float literal without an exponent (filter parsers differ on ``1e-05``)."""
    return f"{value:.9f}"


def great_circle_m(lat1: np.ndarray, lon1: np.ndarray, lat2: float, lon2: float) -> np.ndarray:
    """Great-circle distance in metres (haversine, sphere of :data:`EARTH_RADIUS_M`) from each fix to one point."""
    p1, p2 = np.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - np.asarray(lon1, dtype=np.float64))
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * math.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


@dataclass(frozen=True)
class Region:
    """A circle: ``kind`` "position" (``center`` x, y in ``frame``) or "gps" (``center`` lat, lon), or "all".

    ``radius_m`` 0 with kind "all" is the whole collection.
    """

    kind: str
    center: tuple[float, float] = (0.0, 0.0)
    radius_m: float = 0.0
    frame: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("position", "gps", "all"):
            raise ValueError(f"region kind must be position, gps or all, got {self.kind!r}")
        if self.kind == "all":
            return
        a, b = self.center
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"region centre must be finite, got {self.center}")
        if not (math.isfinite(self.radius_m) and 0 < self.radius_m <= 2e7):
            raise ValueError(f"region radius must be > 0 and <= 2e7 m, got {self.radius_m}")
        if self.kind == "gps" and not (-90.0 <= a <= 90.0 and -180.0 <= b <= 180.0):
            raise ValueError(f"GPS centre must be lat in [-90, 90] and lon in [-180, 180], got {a}, {b}")
        if self.kind == "position" and (not self.frame or max(abs(a), abs(b)) > _MAX_COORD):
            raise ValueError(f"a position centre needs a frame and |x|, |y| <= {_MAX_COORD:g}, got {self.center} in "
                             f"{self.frame!r}")

    @classmethod
    def everything(cls) -> Region:
        return cls("all")

    def describe(self) -> str:
        """In words, for logs and service answers."""
        if self.kind == "all":
            return "the whole collection"
        if self.kind == "gps":
            return f"{self.radius_m:g} m around lat {self.center[0]:.7f}, lon {self.center[1]:.7f}"
        return f"{self.radius_m:g} m around ({self.center[0]:g}, {self.center[1]:g}) in frame {self.frame}"

    def box_filter(self) -> str:
        """A Milvus filter expression selecting the circle's bounding box (a superset of the circle), "" for all."""
        if self.kind == "all":
            return ""
        r = self.radius_m * _MARGIN
        if self.kind == "position":
            x, y = self.center
            return (f"frame_id == {quote(self.frame)} and x >= {_number(x - r)} and x <= {_number(x + r)} and "
                    f"y >= {_number(y - r)} and y <= {_number(y + r)}")
        lat, lon = self.center
        delta = math.degrees(r / EARTH_RADIUS_M)  # the circle's angular radius
        lat_lo, lat_hi = lat - delta, lat + delta
        if lat_lo <= -90.0 or lat_hi >= 90.0:  # the circle holds a pole: every longitude
            return f"lat >= {_number(max(lat_lo, -90.0))} and lat <= {_number(min(lat_hi, 90.0))}"
        # the widest longitude span of a spherical cap (exact on the sphere, then the margin)
        dlon = math.degrees(math.asin(min(1.0, math.sin(math.radians(delta)) / math.cos(math.radians(lat)))))
        lat_part = f"lat >= {_number(lat_lo)} and lat <= {_number(lat_hi)}"
        if dlon >= 180.0 - 1e-9:
            return lat_part
        lo, hi = lon - dlon, lon + dlon
        if lo < -180.0:  # across the antimeridian: two longitude ranges
            return f"{lat_part} and (lon >= {_number(lo + 360.0)} or lon <= {_number(hi)})"
        if hi > 180.0:
            return f"{lat_part} and (lon >= {_number(lo)} or lon <= {_number(hi - 360.0)})"
        return f"{lat_part} and lon >= {_number(lo)} and lon <= {_number(hi)}"

    def coordinate_fields(self) -> list[str]:
        """The scalar fields :meth:`distances` reads."""
        return {"position": ["frame_id", "x", "y"], "gps": ["lat", "lon"], "all": []}[self.kind]

    def distances(self, rows: list[dict]) -> np.ndarray:
        """Distance of each row (dicts with :meth:`coordinate_fields`) to the centre; inf outside the circle (and
        for rows without coordinates or in another frame); 0 for every row of "all"."""
        n = len(rows)
        if self.kind == "all":
            return np.zeros(n)
        a, b = self.coordinate_fields()[-2:]
        coords = np.array([[_float(r.get(a)), _float(r.get(b))] for r in rows], dtype=np.float64).reshape(n, 2)
        if self.kind == "position":
            d = np.hypot(coords[:, 0] - self.center[0], coords[:, 1] - self.center[1])
            inside = mask_within_radius(coords, np.asarray(self.center, np.float64), self.radius_m)
            inside &= np.array([r.get("frame_id") == self.frame for r in rows], dtype=bool)
        else:
            with np.errstate(invalid="ignore"):
                d = great_circle_m(coords[:, 0], coords[:, 1], *self.center)
            inside = np.isfinite(d) & (d <= self.radius_m)
        return np.where(inside, d, np.inf)


def _float(value: object) -> float:
    return float("nan") if value is None else float(value)


def parse_center(text: str, radius_m: float, default_frame: str = "map") -> Region:
    """A region from ``x,y``, ``x,y,frame`` or ``gps:lat,lon`` and a radius (0: the whole collection).

    Raises:
        ValueError: the text is not one of these forms, or a value is out of range (one line, naming the form).
    """
    if radius_m == 0:
        return Region.everything()
    forms = "expected 'x,y', 'x,y,frame' or 'gps:lat,lon'"
    text = text.strip()
    gps = text.startswith("gps:")
    parts = [p.strip() for p in (text[4:] if gps else text).split(",")]
    try:
        if gps and len(parts) == 2:
            return Region("gps", (float(parts[0]), float(parts[1])), float(radius_m))
        if not gps and len(parts) in (2, 3):
            frame = parts[2] if len(parts) == 3 else default_frame
            return Region("position", (float(parts[0]), float(parts[1])), float(radius_m), frame)
    except ValueError as exc:
        raise ValueError(f"region centre {text!r}: {exc} ({forms})") from None
    raise ValueError(f"region centre {text!r}: {forms}")
