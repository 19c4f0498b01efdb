"""The keyframe table in binary (``table.gNNNNNN.npy`` + ``sources.gNNNNNN.txt``): what loading reads at scale.

The keyframe CSV (:mod:`.keyframe_csv`) is the table a person reads; parsing it costs Python work per cell (35 s for
a million keyframes on the 2-core build machine, 19 million cells). Saves therefore also write the same table as

* ``table.gNNNNNN.npy``: a structured ``.npy`` (no pickle; :data:`TABLE_DTYPE`), one record per keyframe in map
  order: id, stamp, camera and frame as indices into the manifest's sorted ``cameras`` and ``frames`` lists,
  position, orientation, GPS, UTM zone, band (ASCII code, 0 = unknown) and easting/northing (NaN = unknown);
* ``sources.gNNNNNN.txt``: the ``source`` of every keyframe, UTF-8, one per line (sources hold no control characters,
  so no line break).

Loading uses them when the manifest lists them (``files.table``, ``files.sources``) and checks them with the same
rules as the CSV (:func:`~dinomix_ros.maps.validation.check_columns`, ids strictly increasing), vectorised: a
million keyframes in about a second. Maps without them (written before) are read from the CSV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.maps.errors import MapFormatError
from dinomix_ros.maps.validation import UTM_BANDS, check_columns

if TYPE_CHECKING:
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["TABLE_DTYPE", "parse_table", "sources_bytes", "table_records"]

TABLE_DTYPE = np.dtype([
    ("id", "<i8"), ("stamp_ns", "<i8"), ("camera", "<u4"), ("frame", "<u4"), ("position", "<f8", (3,)),
    ("orientation", "<f8", (4,)), ("gps", "<f8", (3,)), ("utm_zone", "<i2"), ("utm_band", "u1"), ("utm", "<f8", (2,)),
])
_BANDS = np.zeros(256, dtype=bool)
_BANDS[[ord(b) for b in UTM_BANDS]] = True


def table_records(kmap: KeyframeMap) -> np.ndarray:
    """The (N,) :data:`TABLE_DTYPE` records of ``kmap`` (cameras and frames index ``kmap.camera_names`` /
    ``kmap.frames``, the lists the manifest stores)."""
    n = len(kmap)
    out = np.zeros(n, dtype=TABLE_DTYPE)
    out["id"], out["stamp_ns"] = kmap.ids, kmap.stamps_ns
    for field, names, column in (("camera", kmap.camera_names, kmap.cameras), ("frame", kmap.frames, kmap.frame_ids)):
        lookup = {name: i for i, name in enumerate(names)}
        out[field] = np.fromiter((lookup[v] for v in column), dtype=np.uint32, count=n)
    out["position"], out["orientation"], out["gps"] = kmap.positions, kmap.orientations, kmap.gps
    out["utm_zone"], out["utm"] = kmap.utm_zones, kmap.utm
    out["utm_band"] = np.fromiter((ord(b) if b else 0 for b in kmap.utm_bands), dtype=np.uint8, count=n)
    return out


def sources_bytes(kmap: KeyframeMap) -> bytes:
    """``sources.gNNNNNN.txt``: every keyframe's source, one per line, UTF-8 (empty for no keyframe)."""
    return "".join(s + "\n" for s in kmap.sources.tolist()).encode("utf-8")


def parse_table(records: np.ndarray, sources: bytes, manifest: dict[str, Any], names: tuple[str, str]
                ) -> dict[str, np.ndarray]:
    """The keyframe columns from the binary table, checked like the CSV (the messages name ``names``' files).

    Args:
        records: the (count,) :data:`TABLE_DTYPE` records (e.g. memory-mapped; copied here).
        sources: the content of the sources file.
        manifest: the map's (validated) manifest: ``count``, ``cameras``, ``frames``.
        names: (table file, sources file) names for messages.

    Raises:
        MapFormatError: the records or sources are not a table of ``count`` keyframes, or hold a value the CSV
            would be refused for.
    """
    table_name, sources_name = names
    count = manifest["count"]
    if records.dtype != TABLE_DTYPE or records.shape != (count,):
        raise MapFormatError(f"{table_name} holds {records.dtype} {records.shape}, expected the keyframe table "
                             f"({count},): the files are inconsistent")
    cameras, frames = np.array(manifest["cameras"], dtype=object), np.array(manifest["frames"], dtype=object)
    for field, names_list in (("camera", manifest["cameras"]), ("frame", manifest["frames"])):
        if count and int(records[field].max()) >= len(names_list):
            raise MapFormatError(f"{table_name}: a {field} index is {int(records[field].max())}, the manifest lists "
                                 f"{len(names_list)} {field}s: the files are inconsistent")
    text = _decode(sources, sources_name)
    lines = text.split("\n")
    if lines[-1] != "" or len(lines) - 1 != count:
        raise MapFormatError(f"{sources_name} holds {len(lines) - 1} lines, expected {count} (one source per "
                             "keyframe, each ending in a line break): the files are inconsistent")
    band = records["utm_band"]
    if not (_BANDS[band] | (band == 0)).all():
        raise MapFormatError(f"{table_name}: a UTM band byte is {int(band[~(_BANDS[band] | (band == 0))][0])}, "
                             f"expected one of {UTM_BANDS} or 0 (unknown)")
    band_names = np.array([chr(c) if _BANDS[c] else "" for c in range(256)], dtype=object)
    sources_col = np.empty(count, dtype=object)
    sources_col[:] = lines[:-1]
    cols = {
        "ids": np.array(records["id"]), "stamps_ns": np.array(records["stamp_ns"]),
        "cameras": cameras[records["camera"]], "frame_ids": frames[records["frame"]],
        "positions": np.array(records["position"]), "orientations": np.array(records["orientation"]),
        "gps": np.array(records["gps"]), "utm_zones": np.array(records["utm_zone"]),
        "utm_bands": band_names[band], "utm": np.array(records["utm"]), "sources": sources_col,
    }
    ids, zones = cols["ids"], cols["utm_zones"]
    if count and (ids[0] < 0 or (np.diff(ids) <= 0).any()):
        raise MapFormatError(f"{table_name}: ids must be >= 0 and strictly increasing (the table was edited)")
    if ((zones < 0) | (zones > 60)).any():
        raise MapFormatError(f"{table_name}: a utm_zone is outside 1..60 (0 = unknown)")
    categories = {"cameras": (cameras, records["camera"]), "frame_ids": (frames, records["frame"]),
                  "utm_bands": (band_names, band)}
    check_columns(cols, lambda i: f"{table_name} row {i}", MapFormatError, categories=categories)
    return cols


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MapFormatError(f"{name} is not UTF-8 ({exc}): corrupted; restore the map directory from a backup or "
                             "rebuild the map") from None
