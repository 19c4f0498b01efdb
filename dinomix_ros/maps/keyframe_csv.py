"""The keyframe table file of a map directory (``keyframes.gNNNNNN.csv``): writing it and parsing it back exactly.

UTF-8, comma-separated, ``\\n`` line ends, a header row (:data:`CSV_COLUMNS`), then one row per keyframe in map order
(row i = descriptor row i). An empty cell means unknown. Floats are written with Python ``repr``, so they read back
bit for bit; stamps are integer nanoseconds. Parsing checks every row with the same rules as
:meth:`KeyframeMap.add <dinomix_ros.maps.keyframes.KeyframeMap.add>`. See ``maps/README.md`` for the columns.
"""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.maps.errors import MapFormatError
from dinomix_ros.maps.manifest import corrupted
from dinomix_ros.maps.validation import check_columns, short_repr

if TYPE_CHECKING:
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["CSV_COLUMNS", "check_csv_matches", "parse_csv", "write_csv"]

#: Header of the keyframe CSV, in order. Empty cell = unknown.
CSV_COLUMNS = (
    "id", "stamp_ns", "camera", "frame_id", "x", "y", "z", "qx", "qy", "qz", "qw",
    "lat", "lon", "alt", "utm_zone", "utm_band", "utm_easting", "utm_northing", "source",
)

_FLUSH_BYTES = 1 << 20  # text buffered before it is encoded and written


def write_csv(w: Any, kmap: KeyframeMap) -> None:
    """Write ``kmap``'s keyframe table to the binary writer ``w`` (anything with ``write(bytes)``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    ids, stamps, zones = kmap.ids.tolist(), kmap.stamps_ns.tolist(), kmap.utm_zones.tolist()
    pos, quat, gps, utm = (a.tolist() for a in (kmap.positions, kmap.orientations, kmap.gps, kmap.utm))
    cams, frames, bands, sources = kmap.cameras, kmap.frame_ids, kmap.utm_bands, kmap.sources
    for i in range(len(kmap)):
        writer.writerow([
            ids[i], stamps[i], cams[i], frames[i], *map(_fmt_float, pos[i]), *map(_fmt_float, quat[i]),
            *map(_fmt_float, gps[i]), zones[i] or "", bands[i], *map(_fmt_float, utm[i]), sources[i],
        ])
        if buf.tell() > _FLUSH_BYTES:
            w.write(buf.getvalue().encode("utf-8"))
            buf.seek(0)
            buf.truncate()
    w.write(buf.getvalue().encode("utf-8"))


def parse_csv(data: bytes, name: str, count: int) -> dict[str, np.ndarray]:
    """Parse the keyframe CSV into typed columns and check them like add() does.

    Args:
        data: The file's bytes (already checked against the manifest's size and sha256).
        name: The file's name, for messages.
        count: The row count the manifest gives.

    Returns:
        The columns, keyed like :attr:`KeyframeMap.ids <dinomix_ros.maps.keyframes.KeyframeMap.ids>` and the other
        column properties.

    Raises:
        MapFormatError: Not UTF-8, a wrong header or cell count, a row count other than ``count``, or a value that
            ``add()`` would refuse; the message names the line and column.
    """
    rows = _read_rows(data, name, count)
    cells = dict(zip(CSV_COLUMNS, zip(*rows))) if rows else {c: () for c in CSV_COLUMNS}
    cols = {
        "ids": _ints(cells, "id", name),
        "stamps_ns": _ints(cells, "stamp_ns", name),
        "cameras": _strs(cells, "camera"),
        "frame_ids": _strs(cells, "frame_id"),
        "positions": _floats(cells, ("x", "y", "z"), name),
        "orientations": _floats(cells, ("qx", "qy", "qz", "qw"), name),
        "gps": _floats(cells, ("lat", "lon", "alt"), name),
        "utm_zones": _ints(cells, "utm_zone", name, empty=0),
        "utm_bands": _strs(cells, "utm_band"),
        "utm": _floats(cells, ("utm_easting", "utm_northing"), name),
        "sources": _strs(cells, "source"),
    }
    zones = cols["utm_zones"]
    if ((zones < 0) | (zones > 60)).any():
        bad = int(np.flatnonzero((zones < 0) | (zones > 60))[0])
        raise MapFormatError(f"{name} line {bad + 2}: utm_zone {zones[bad]} outside 1..60 (empty = unknown)")
    cols["utm_zones"] = zones.astype(np.int16)
    ids = cols["ids"]
    if ids.shape[0] > 1 and not (np.diff(ids) > 0).all():
        bad = int(np.flatnonzero(np.diff(ids) <= 0)[0]) + 1
        raise MapFormatError(f"{name} line {bad + 2}: id {ids[bad]} after {ids[bad - 1]}; ids must be strictly "
                             "increasing (the table was edited or reordered)")
    if ids.shape[0] and ids[0] < 0:
        raise MapFormatError(f"{name} line 2: negative id {ids[0]}")
    check_columns(cols, lambda i: f"{name} line {i + 2}", MapFormatError)
    return cols


def check_csv_matches(f: Any, name: str, count: int, cols: dict[str, np.ndarray], other: str,
                      block_rows: int = 65536) -> None:
    """Parse the CSV from the binary file ``f`` in blocks (bounded memory) and compare every cell with ``cols``, the
    columns loaded from ``other`` (the binary table): the content check of a map loaded from its binary table.

    Raises:
        MapFormatError: the CSV is malformed (the messages of :func:`parse_csv`), has another row count, or a cell
            differs (floats bit for bit) from ``cols``.
    """
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise MapFormatError(f"{name}: header is {short_repr(header, 300)}, expected {list(CSV_COLUMNS)}")
        rows: list[list[str]] = []
        start = 0
        for row in reader:
            if len(row) != len(CSV_COLUMNS):
                raise MapFormatError(f"{name} line {reader.line_num}: {len(row)} cells, expected {len(CSV_COLUMNS)}")
            rows.append(row)
            if start + len(rows) > count:
                raise MapFormatError(f"{name} has more than the {count} keyframe rows manifest.json says")
            if len(rows) == block_rows:
                _compare_rows(rows, start, name, cols, other)
                start, rows = start + len(rows), []
    except (csv.Error, UnicodeDecodeError) as exc:
        raise MapFormatError(f"{name} line {reader.line_num}: not a keyframe table row ({exc}); the table is "
                             "damaged or was edited: restore the map directory from a backup or rebuild the map") \
            from None
    _compare_rows(rows, start, name, cols, other)
    if start + len(rows) != count:
        raise MapFormatError(f"{name} has {start + len(rows)} keyframe rows but manifest.json says {count}")


def _compare_rows(rows: list[list[str]], start: int, name: str, cols: dict[str, np.ndarray], other: str) -> None:
    if not rows:
        return
    cells = dict(zip(CSV_COLUMNS, zip(*rows)))
    stop = start + len(rows)
    parsed = {
        "ids": _ints(cells, "id", name), "stamps_ns": _ints(cells, "stamp_ns", name),
        "cameras": _strs(cells, "camera"), "frame_ids": _strs(cells, "frame_id"),
        "positions": _floats(cells, ("x", "y", "z"), name),
        "orientations": _floats(cells, ("qx", "qy", "qz", "qw"), name),
        "gps": _floats(cells, ("lat", "lon", "alt"), name), "utm_zones": _ints(cells, "utm_zone", name, empty=0),
        "utm_bands": _strs(cells, "utm_band"), "utm": _floats(cells, ("utm_easting", "utm_northing"), name),
        "sources": _strs(cells, "source"),
    }
    for key, mine in parsed.items():
        theirs = cols[key][start:stop]
        if mine.dtype.kind == "f":
            same = (mine.view(np.int64) == theirs.view(np.int64)).reshape(len(rows), -1).all(axis=1)
        elif mine.dtype.kind == "O":
            same = mine == theirs
        else:
            same = mine == theirs.astype(np.int64)
        if not np.all(same):
            i = int(np.flatnonzero(~np.asarray(same, dtype=bool))[0])
            ours, loaded = np.asarray(mine[i]).tolist(), np.asarray(theirs[i]).tolist()
            raise MapFormatError(f"{name} line {start + i + 2} and {other} row {start + i} disagree on {key} "
                                 f"({short_repr(ours, 60)} vs {short_repr(loaded, 60)}): edited by hand? Restore the "
                                 "map directory from a backup or rebuild the map")


def _read_rows(data: bytes, name: str, count: int) -> list[list[str]]:
    """The data rows of the CSV as strings, after checking the encoding, header, cell counts and row count."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise corrupted(name, f"not UTF-8: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:  # the csv module's own errors (a field over its size limit, a NUL byte) become this file's
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise MapFormatError(f"{name}: header is {short_repr(header, 300)}, expected {list(CSV_COLUMNS)}")
        for row in reader:
            if len(row) != len(CSV_COLUMNS):
                raise MapFormatError(f"{name} line {reader.line_num}: {len(row)} cells, expected {len(CSV_COLUMNS)}")
            rows.append(row)
            if len(rows) > count:  # stop reading: the row count is bounded by the manifest's
                break
    except csv.Error as exc:
        raise MapFormatError(f"{name} line {reader.line_num}: not a keyframe table row ({exc}); the table is "
                             "damaged or was edited: restore the map directory from a backup or rebuild the map") \
            from None
    if len(rows) > count:
        raise MapFormatError(f"{name} has more than the {count} keyframe rows manifest.json says: the table was "
                             "edited; restore the map directory from a backup or rebuild the map")
    if len(rows) != count:
        raise MapFormatError(f"{name} has {len(rows)} keyframe rows but manifest.json says {count}: the table is "
                             "truncated or was edited; restore the map directory from a backup or rebuild the map")
    return rows


def _ints(cells: dict[str, tuple[str, ...]], col: str, name: str, empty: int | None = None) -> np.ndarray:
    """Column ``col`` as int64; an empty cell is ``empty`` when given, else an error."""
    out = []
    for i, v in enumerate(cells[col]):
        try:
            out.append(empty if (v == "" and empty is not None) else int(v))
        except ValueError:
            raise MapFormatError(f"{name} line {i + 2}, column {col}: {short_repr(v)} is not an integer") from None
    try:
        return np.array(out, dtype=np.int64)
    except OverflowError:
        raise MapFormatError(f"{name}, column {col}: a value does not fit in int64") from None


def _floats(cells: dict[str, tuple[str, ...]], col_names: tuple[str, ...], name: str) -> np.ndarray:
    """Columns ``col_names`` as (rows, len(col_names)) float64; an empty cell is NaN, "nan"/"inf" text an error."""
    n = len(cells[col_names[0]])
    out = np.full((n, len(col_names)), np.nan)
    for j, col in enumerate(col_names):
        text = cells[col]
        try:
            out[:, j] = [float(v) if v else math.nan for v in text]
            suspects = np.flatnonzero(~np.isfinite(out[:, j]))  # unknowns, plus any "nan"/"inf" text
        except ValueError:
            suspects = range(len(text))
        bad = [i for i in suspects if text[i] != "" and not _is_finite_text(text[i])]
        if bad:
            raise MapFormatError(f"{name} line {bad[0] + 2}, column {col}: {short_repr(text[bad[0]])} is not a finite "
                                 "number (unknown values are empty cells)")
    return out


def _strs(cells: dict[str, tuple[str, ...]], col: str) -> np.ndarray:
    """Column ``col`` as an object array of str."""
    out = np.empty(len(cells[col]), dtype=object)
    out[:] = list(cells[col])
    return out


def _is_finite_text(v: str) -> bool:
    """Whether ``v`` parses as a finite float."""
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _fmt_float(x: float) -> str:
    """A CSV cell for ``x``: empty for NaN (unknown), else ``repr``, which round-trips a Python float exactly."""
    return "" if x != x else repr(x)
