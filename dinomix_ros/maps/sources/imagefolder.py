"""Geotagged image folders for offline map building and evaluation.

Geotags come from the VPR-datasets file name format (Pitts30k, Tokyo 24/7, SF-XL tools), a CSV file, or EXIF GPS.
Positions end up as WGS84 lat/lon, UTM, and/or local metric map coordinates (x, y, yaw).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dinomix_ros.maps.sources.geo import UTM_BANDS, ExifGPSError, UTMCoord, latlon_to_utm, read_exif_gps, utm_to_latlon

__all__ = [
    "IMAGE_EXTENSIONS",
    "GEOTAG_SOURCES",
    "UTM_FILENAME_FORMAT",
    "ImageFolderError",
    "GeotagFormatError",
    "GeotagCSVError",
    "ImageGeotag",
    "natural_sort_key",
    "list_images",
    "parse_utm_filename",
    "read_geotag_csv",
    "read_geotag_rows",
    "geotag_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})  # compared lower-case
GEOTAG_SOURCES = ("auto", "filename", "csv", "exif", "none")
UTM_FILENAME_FORMAT = (
    "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude@pano_id@tile_num@heading@pitch@roll"
    "@height@timestamp@note@extension"
)
MAX_LISTED = 10  # names quoted in an error message

# Accepted CSV column names (lower-case); the first present wins.
CSV_IMAGE_COLUMNS = ("image", "name", "filename", "file", "path")
CSV_LAT_COLUMNS = ("lat", "latitude")
CSV_LON_COLUMNS = ("lon", "longitude")
CSV_ALT_COLUMNS = ("alt", "alt_m")
CSV_X_COLUMNS = ("x",)
CSV_Y_COLUMNS = ("y",)
CSV_YAW_COLUMNS = ("yaw",)
CSV_EAST_COLUMNS = ("utm_east", "easting")
CSV_NORTH_COLUMNS = ("utm_north", "northing")
CSV_ZONE_COLUMNS = ("utm_zone", "zone")
CSV_BAND_COLUMNS = ("utm_letter", "band")
CSV_ACCEPTED = (
    "image column: image|name|filename|file|path; positions: (lat, lon[, alt|alt_m]) and/or (x, y[, yaw in radians]) "
    "and/or (utm_east|easting, utm_north|northing, utm_zone|zone, utm_letter|band), case-insensitive"
)


class ImageFolderError(FileNotFoundError):
    """An image folder is missing, not a folder, or holds no images."""


class GeotagFormatError(ValueError):
    """A file name does not follow the VPR-datasets ``@UTM_east@UTM_north@...`` format."""


class GeotagCSVError(ValueError):
    """A geotag CSV has no usable header, an unknown column set, a bad value, or misses images."""


@dataclass(frozen=True)
class ImageGeotag:
    """Where an image was taken; every position field is optional.

    Attributes:
        path: the image file.
        lat: WGS84 latitude in degrees.
        lon: WGS84 longitude in degrees.
        alt: altitude in metres.
        utm: the UTM position (from the source, or projected from lat/lon).
        x: local metric map frame x in metres.
        y: local metric map frame y in metres.
        yaw: heading in the local map frame, radians (counter-clockwise from +x).
    """

    path: Path
    lat: float | None = None
    lon: float | None = None
    alt: float | None = None
    utm: UTMCoord | None = None
    x: float | None = None
    y: float | None = None
    yaw: float | None = None

    @property
    def metric_xy(self) -> tuple[float, float] | None:
        """(x, y) if known, else UTM (easting, northing) if known, else None."""
        if self.x is not None and self.y is not None:
            return (self.x, self.y)
        if self.utm is not None:
            return (self.utm.easting, self.utm.northing)
        return None

    @property
    def has_position(self) -> bool:
        """True when any position (lat/lon, UTM or x/y) is known."""
        return self.metric_xy is not None or (self.lat is not None and self.lon is not None)


_DIGITS = re.compile(r"(\d+)")


def natural_sort_key(name: str) -> tuple:
    """Sort key putting ``2.jpg`` before ``10.jpg`` (case-insensitive; ties broken by the exact name)."""
    parts = _DIGITS.split(name)  # alternates text, digits, text, ...: equal positions have equal types
    return (tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name)


def _is_image(path: Path) -> bool:
    # Names starting with '.' are hidden files such as macOS "._01.jpg" resource forks, not images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` in natural order.

    Args:
        folder: the folder to list.
        recursive: also list sub-folders (ordered by their relative path, naturally).

    Returns:
        Paths of files whose extension is in :data:`IMAGE_EXTENSIONS` (any case), hidden files excluded.

    Raises:
        ImageFolderError: (a FileNotFoundError) if the folder does not exist, is not a folder, or has no images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"image folder {folder} does not exist; expected a folder of images (check the path)")
    if not folder.is_dir():
        raise ImageFolderError(f"{folder} is a file, not a folder; expected a folder of images (pass its parent)")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p for p in candidates if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not images:
        where = " or its sub-folders" if recursive else ""
        raise ImageFolderError(
            f"no images found in {folder}{where}; expected files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}{'' if recursive else _subfolder_hint(folder)}"
        )
    images.sort(key=lambda p: tuple(natural_sort_key(part) for part in p.relative_to(folder).parts))
    return images


def _subfolder_hint(folder: Path) -> str:
    """Where the images are when they sit one level down (images are listed from the folder itself only)."""
    holding = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and any(_is_image(c) for c in p.iterdir())), key=lambda p: natural_sort_key(p.name))
    if not holding:
        return ""
    named = ", ".join(str(p) for p in holding[:3]) + (", ..." if len(holding) > 3 else "")
    return f"; sub-folders are not searched, and {named} {'holds' if len(holding) == 1 else 'hold'} images: pass " \
           f"{'it' if len(holding) == 1 else 'one of them'}"


def _format_error(name: str, why: str) -> GeotagFormatError:
    return GeotagFormatError(
        f"file name {name!r} is not in the VPR-datasets UTM format ({why}); expected {UTM_FILENAME_FORMAT}, "
        "e.g. '@0543256.96@4178906.71@10@S@037.75389@-122.49182@@@@@@@@@.jpg' (trailing fields may be empty). "
        "Use source='csv' or 'exif' for other folders"
    )


def _parse_float(text: str, what: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _format_error(name, f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _format_error(name, f"{what} {text!r} is not finite")
    return value


def parse_utm_filename(path: str | Path) -> ImageGeotag:
    """Geotag from a VPR-datasets file name ``@UTM_east@UTM_north@zone@letter@lat@lon@...@extension``.

    Latitude/longitude are taken from the name when present, else computed from the UTM position.

    Args:
        path: the image path; only its name is parsed.

    Returns:
        The geotag with ``path``, ``utm``, ``lat`` and ``lon`` set.

    Raises:
        GeotagFormatError: (a ValueError) if the name does not start with '@', has fewer than four fields, or a field
            is not a valid number, zone (1..60) or band letter.
    """
    path = Path(path)
    name = path.name
    stem = name[: -len(path.suffix)] if path.suffix.lower() in IMAGE_EXTENSIONS else name
    fields = stem.split("@")
    if fields[0] != "":
        raise _format_error(name, "it does not start with '@'")
    fields = fields[1:]
    if len(fields) < 4 or any(not f.strip() for f in fields[:4]):
        raise _format_error(name, "UTM east, north, zone number and zone letter are required")
    east = _parse_float(fields[0], "UTM_east", name)
    north = _parse_float(fields[1], "UTM_north", name)
    if not fields[2].strip().isdigit() or not 1 <= int(fields[2]) <= 60:
        raise _format_error(name, f"UTM_zone_number {fields[2]!r} is not an integer in 1..60")
    zone = int(fields[2])
    band = fields[3].strip().upper()
    if len(band) != 1 or band not in UTM_BANDS:
        raise _format_error(name, f"UTM_zone_letter {fields[3]!r} is not a latitude band letter {UTM_BANDS}")
    utm = UTMCoord(east, north, zone, band)
    lat_text = fields[4].strip() if len(fields) > 4 else ""
    lon_text = fields[5].strip() if len(fields) > 5 else ""
    if bool(lat_text) != bool(lon_text):
        raise _format_error(name, "latitude and longitude must both be given or both be empty")
    if lat_text:
        lat = _parse_float(lat_text, "latitude", name)
        lon = _parse_float(lon_text, "longitude", name)
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise _format_error(name, f"latitude/longitude ({lat}, {lon}) are out of range")
    else:
        try:
            lat, lon = utm_to_latlon(east, north, zone, utm.northern)
        except ValueError as exc:
            raise _format_error(name, str(exc)) from exc
    return ImageGeotag(path=path, lat=lat, lon=lon, utm=utm)


def _pick(columns: dict[str, str], names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in columns:
            return columns[n]
    return None


def _cell_float(row: dict[str, str], column: str | None, line: int, csv_path: Path) -> float | None:
    if column is None:
        return None
    text = (row.get(column) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise GeotagCSVError(f"{csv_path}:{line}: column {column!r} has {text!r}; expected a finite number")
    return value


@dataclass(frozen=True)
class _CsvColumns:
    """Which header names of a geotag CSV hold which values (None: absent), and the complete position sets."""

    image: str
    lat: str | None
    lon: str | None
    alt: str | None
    x: str | None
    y: str | None
    yaw: str | None
    east: str | None
    north: str | None
    zone: str | None
    band: str | None
    sets: tuple[str, ...]


def _csv_columns(csv_path: Path, header: list[str]) -> _CsvColumns:
    """Resolve the accepted column names of a geotag CSV header (see :func:`read_geotag_csv`)."""
    columns = {h.lower(): h for h in header if h}
    image_col = _pick(columns, CSV_IMAGE_COLUMNS)
    if image_col is None:
        raise GeotagCSVError(
            f"{csv_path}: the first row {header} has no image column; a header row is required. Expected {CSV_ACCEPTED}"
        )
    sets = {
        "lat/lon": (_pick(columns, CSV_LAT_COLUMNS), _pick(columns, CSV_LON_COLUMNS)),
        "x/y": (_pick(columns, CSV_X_COLUMNS), _pick(columns, CSV_Y_COLUMNS)),
        "utm": (
            _pick(columns, CSV_EAST_COLUMNS),
            _pick(columns, CSV_NORTH_COLUMNS),
            _pick(columns, CSV_ZONE_COLUMNS),
            _pick(columns, CSV_BAND_COLUMNS),
        ),
    }
    complete = [k for k, cols in sets.items() if all(cols)]
    partial = [k for k, cols in sets.items() if any(cols) and not all(cols)]
    if partial:
        raise GeotagCSVError(
            f"{csv_path}: columns {header} hold an incomplete {' and '.join(partial)} column set; "
            f"expected {CSV_ACCEPTED}"
        )
    if not complete:
        raise GeotagCSVError(f"{csv_path}: columns {header} hold no position column set; expected {CSV_ACCEPTED}")
    lat_col, lon_col = sets["lat/lon"]
    x_col, y_col = sets["x/y"]
    return _CsvColumns(image_col, lat_col, lon_col, _pick(columns, CSV_ALT_COLUMNS) if lat_col else None, x_col, y_col,
                       _pick(columns, CSV_YAW_COLUMNS) if x_col else None, *sets["utm"], tuple(complete))


def _csv_utm(east: float | None, north: float | None, zone_text: str, band_text: str, line: int,
             csv_path: Path) -> UTMCoord | None:
    utm_cells = (east is not None, north is not None, bool(zone_text), bool(band_text))
    if any(utm_cells) and not all(utm_cells):
        raise GeotagCSVError(
            f"{csv_path}:{line}: the UTM cells are partly empty; expected easting, northing, zone and band "
            "all filled or all empty"
        )
    if not all(utm_cells):
        return None
    try:
        zone = int(float(zone_text))
        if float(zone_text) != zone:
            raise ValueError("not an integer")
        return UTMCoord(east, north, zone, band_text)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GeotagCSVError(
            f"{csv_path}:{line}: UTM zone {zone_text!r} / band {band_text!r} are invalid ({exc}); expected "
            f"a zone 1..60 and a band letter of {UTM_BANDS}"
        ) from None


def _csv_geotag(row: dict[str, str], cols: _CsvColumns, path: Path, line: int, csv_path: Path) -> ImageGeotag:
    """One data row of a geotag CSV; UTM from lat/lon when not given, and lat/lon from UTM."""
    lat = _cell_float(row, cols.lat, line, csv_path)
    lon = _cell_float(row, cols.lon, line, csv_path)
    x = _cell_float(row, cols.x, line, csv_path)
    y = _cell_float(row, cols.y, line, csv_path)
    for what, pair in (("lat/lon", (lat, lon)), ("x/y", (x, y))):
        if (pair[0] is None) != (pair[1] is None):
            raise GeotagCSVError(f"{csv_path}:{line}: only one of {what} is filled; expected both or neither")
    zone_text = (row.get(cols.zone) or "").strip() if cols.zone else ""
    band_text = (row.get(cols.band) or "").strip() if cols.band else ""
    utm = _csv_utm(_cell_float(row, cols.east, line, csv_path), _cell_float(row, cols.north, line, csv_path),
                   zone_text, band_text, line, csv_path)
    try:
        if lat is not None and utm is None:
            utm = latlon_to_utm(lat, lon)  # type: ignore[arg-type]
        elif lat is None and utm is not None:
            lat, lon = utm_to_latlon(utm.easting, utm.northing, utm.zone, utm.northern)
    except ValueError as exc:
        raise GeotagCSVError(f"{csv_path}:{line}: {exc}") from None
    return ImageGeotag(path=path, lat=lat, lon=lon,
                       alt=_cell_float(row, cols.alt, line, csv_path) if lat is not None else None, utm=utm, x=x,
                       y=y, yaw=_cell_float(row, cols.yaw, line, csv_path) if x is not None else None)


def read_geotag_csv(csv_path: str | Path) -> dict[str, ImageGeotag]:
    """Per-image geotags of a CSV file (:func:`read_geotag_rows`), keyed by image file name."""
    return {t.path.name: t for t in read_geotag_rows(csv_path)}


def read_geotag_rows(csv_path: str | Path) -> list[ImageGeotag]:
    """Read per-image geotags from a CSV file with a header row, in the file's row order.

    The image column may be named image/name/filename/file/path (a relative path is keyed by its file name). Position
    columns are any of (lat, lon[, alt|alt_m]), (x, y[, yaw]) and (utm_east|easting, utm_north|northing,
    utm_zone|zone, utm_letter|band), case-insensitive; several sets may be present. UTM is computed from lat/lon when
    not given, and lat/lon from UTM. ``yaw`` is in radians. Empty cells mean "unknown" for the whole set. The
    delimiter is sniffed among comma, semicolon and tab.

    Args:
        csv_path: the CSV file.

    Returns:
        One geotag per data row (blank lines skipped), in order; ``path`` is the CSV's value resolved against the
        CSV's folder.

    Raises:
        FileNotFoundError: if the CSV does not exist.
        GeotagCSVError: (a ValueError) for a missing header/image column, no complete position column set, a
            partially filled set, a bad value (with its line number), or an image listed twice.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"geotag CSV {csv_path} does not exist; expected a CSV file with a header row")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    first_line = text.split("\n", 1)[0]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(first_line, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    cols = _csv_columns(csv_path, header)
    tags: dict[str, ImageGeotag] = {}
    first_line_of: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        value = (row.get(cols.image) or "").strip()
        if not value:
            raise GeotagCSVError(f"{csv_path}:{line}: column {cols.image!r} is empty; expected an image file name")
        key = Path(value).name
        if key in tags:
            raise GeotagCSVError(
                f"{csv_path}:{line}: image {key!r} is listed again (first on line {first_line_of[key]}); "
                "expected one row per image"
            )
        tags[key] = _csv_geotag(row, cols, csv_path.parent / value, line, csv_path)
        first_line_of[key] = line
    logger.debug("read %d geotags from %s (columns: %s)", len(tags), csv_path, ", ".join(cols.sets))
    return list(tags.values())


def _single_csv(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".csv" and p.is_file())
    return found[0] if len(found) == 1 else None


def _unify_utm_zone(tags: list[ImageGeotag], utm_zone: int | None) -> list[ImageGeotag]:
    """Re-project so that every UTM position uses one zone (``utm_zone``, else the most common one)."""
    zones = Counter(t.utm.zone for t in tags if t.utm is not None)
    if not zones or (utm_zone is None and len(zones) == 1) or (utm_zone is not None and set(zones) == {utm_zone}):
        return tags
    target = utm_zone if utm_zone is not None else zones.most_common(1)[0][0]
    if utm_zone is None:
        logger.warning(
            "the images span UTM zones %s; all UTM positions use zone %d (the most common) so that distances are "
            "consistent. Pass utm_zone= to choose another",
            sorted(zones),
            target,
        )
    out = []
    for t in tags:
        if t.utm is not None and t.utm.zone != target:
            # From the UTM position itself (exact inverse), not from lat/lon that a file name may round to ~1 m.
            lat, lon = utm_to_latlon(t.utm.easting, t.utm.northing, t.utm.zone, t.utm.northern)
            try:
                t = dataclasses.replace(t, utm=latlon_to_utm(lat, lon, zone=target))
            except ValueError as exc:
                raise ValueError(f"{t.path}: cannot put it into UTM zone {target}: {exc}") from exc
        out.append(t)
    return out


def _exif_geotag(path: Path) -> ImageGeotag:
    fix = read_exif_gps(path)
    if fix is None:
        return ImageGeotag(path=path)
    try:
        utm = latlon_to_utm(fix.lat, fix.lon)
    except ValueError as exc:
        raise ExifGPSError(f"{path}: EXIF GPS position is outside UTM: {exc}") from exc
    return ImageGeotag(path=path, lat=fix.lat, lon=fix.lon, alt=fix.alt, utm=utm)


def _csv_geotags(folder: Path, images: list[Path], csv_path: str | Path | None) -> list[ImageGeotag]:
    """Geotags of ``images`` from a CSV (the only ``*.csv`` of the folder by default); every image needs a row."""
    if csv_path is None:
        csv_path = _single_csv(folder)
        if csv_path is None:
            found = sorted(p.name for p in folder.glob("*.csv"))
            raise GeotagCSVError(
                f"{folder} holds {len(found)} CSV files {found[:MAX_LISTED]}; expected exactly one for "
                "source='csv'. Pass csv_path="
            )
    by_name = read_geotag_csv(csv_path)
    names = Counter(p.name for p in images)
    dupes = sorted(n for n, c in names.items() if c > 1)
    if dupes:
        raise GeotagCSVError(
            f"{len(dupes)} file names occur in several sub-folders of {folder} ({dupes[:MAX_LISTED]}); the CSV "
            "is keyed by file name, so expected unique names. Rename the images or geotag each sub-folder"
        )
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise GeotagCSVError(
            f"{len(missing)} of {len(images)} images in {folder} are not in {csv_path}: "
            f"{missing[:MAX_LISTED]}{' ...' if len(missing) > MAX_LISTED else ''}; expected a row per image "
            "(column image|name|filename|file|path)"
        )
    return [dataclasses.replace(by_name[p.name], path=p) for p in images]


def geotag_images(
    folder: str | Path,
    source: str = "auto",
    csv_path: str | Path | None = None,
    recursive: bool = False,
    utm_zone: int | None = None,
) -> list[ImageGeotag]:
    """List the images of a folder with their geotags.

    ``source="auto"`` uses the file names if every name starts with '@', else a CSV if ``csv_path`` is given or the
    folder holds exactly one ``*.csv``, else EXIF GPS. Images without any geotag get an :class:`ImageGeotag` with
    only the path (logged as one warning with the count), except with ``source="csv"`` where an image missing from
    the CSV is an error. All UTM positions are put into one zone (see ``utm_zone``).

    Args:
        folder: the image folder.
        source: one of "auto", "filename", "csv", "exif", "none".
        csv_path: the geotag CSV (for "csv"/"auto"); default: the only ``*.csv`` in ``folder``.
        recursive: include sub-folders.
        utm_zone: UTM zone for every image; None keeps each image's standard zone unless the images span several
            zones, then the most common zone is used for all (with a warning).

    Returns:
        One geotag per image, in natural file order.

    Raises:
        ValueError: for an unknown ``source``.
        ImageFolderError: (a FileNotFoundError) for a missing folder or one without images.
        GeotagFormatError: for a malformed '@' file name with source "filename".
        GeotagCSVError: for a bad CSV, images missing from it, no single CSV in the folder, or (recursive) two images
            with the same file name.
        ExifGPSError: for malformed EXIF GPS tags.
    """
    if source not in GEOTAG_SOURCES:
        raise ValueError(f"geotag source {source!r} is unknown; expected one of {', '.join(GEOTAG_SOURCES)}")
    if utm_zone is not None and (type(utm_zone) is not int or not 1 <= utm_zone <= 60):
        raise ValueError(f"utm_zone is {utm_zone!r}; expected an integer zone 1..60 or None")
    folder = Path(folder)
    images = list_images(folder, recursive=recursive)
    if source == "auto":
        if all(p.name.startswith("@") for p in images):
            source = "filename"
        elif csv_path is not None or _single_csv(folder) is not None:
            source = "csv"
        else:
            source = "exif"
        logger.info("geotag source for %s: %s", folder, source)

    if source == "none":
        tags = [ImageGeotag(path=p) for p in images]
    elif source == "filename":
        tags = [dataclasses.replace(parse_utm_filename(p), path=p) for p in images]
    elif source == "exif":
        tags = [_exif_geotag(p) for p in images]
    else:
        tags = _csv_geotags(folder, images, csv_path)

    tags = _unify_utm_zone(tags, utm_zone)
    untagged = sum(not t.has_position for t in tags)
    if untagged and source != "none":
        logger.warning("%d of %d images in %s have no geotag (source=%s)", untagged, len(tags), folder, source)
    return tags
