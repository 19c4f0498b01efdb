"""Maps from descriptors computed elsewhere (a GPU cluster, the official evaluation code): a ``.npy`` of descriptors
plus a geotag CSV whose rows are in the same order (``dinomix map import``).

The descriptors are streamed: the ``.npy`` is memory-mapped (``np.load(mmap_mode="r")``, never pickle) and read in
blocks, twice: once to check every row with the map's own rules (finite, unit L2 norm, the error names the row), once
while the storage engine writes the map's chunk (converted block by block to the storage dtype). A 1M x 4096 file is
never in RAM whole. The CSV is the folder builder's geotag CSV (:func:`~dinomix_ros.maps.sources.imagefolder.
read_geotag_csv`: an image column plus lat/lon, x/y[/yaw] and/or UTM columns), one row per descriptor row, in order;
its image column becomes each keyframe's ``source`` and its geotags the keyframe's pose and GPS/UTM columns exactly as
a folder build makes them (:mod:`.build_folder`). Stamps are 0 (unknown), as for folder images. The map has no local
features (there are no images), so geometric verification is off for it.

The search index is built after the map is written, from the written map (memory-mapped), and saved with it
(:func:`~dinomix_ros.maps.index.index_for_map`: ``auto`` makes an ivfpq_mmap index from 10000 keyframes on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinomix_ros.maps.build_folder import _folder_rows  # the folder builder's geotag -> columns, shared
from dinomix_ros.maps.errors import MapError
from dinomix_ros.maps.keyframes import KeyframeMap, utc_now_iso
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.sources.imagefolder import _unify_utm_zone, read_geotag_rows
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.validation import (
    STORAGE_DTYPES, as_float_rows, as_str_column, as_zone_column, check_columns, check_fingerprint, check_unit_rows,
    dtype_name,
)

__all__ = ["ImportReport", "check_descriptor_file", "import_descriptors", "open_descriptors"]

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 16384  # rows checked at a time (128 MB of float32 at 4096-d)


@dataclass
class ImportReport:
    """What an import did."""

    descriptors: str
    csv: str
    keyframes: int = 0
    descriptor_dtype: str = ""
    no_position: int = 0
    check_s: float = 0.0
    write_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"descriptors": self.descriptors, "csv": self.csv, "keyframes": self.keyframes,
                "descriptor_dtype": self.descriptor_dtype, "no_position": self.no_position,
                "check_s": round(self.check_s, 3), "write_s": round(self.write_s, 3)}


def open_descriptors(path: str | Path, dim: int, what: str = "--descriptors") -> np.ndarray:
    """The (N, dim) float16/float32 descriptor array of a ``.npy`` file, memory-mapped (no pickle, not read yet).

    Raises:
        FileNotFoundError: no such file.
        MapError: not a 2-D float16/float32 ``.npy`` of width ``dim`` (a one-line error saying what it is instead).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; expected an (N, {dim}) float32 or float16 .npy file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MapError(f"{what} {path} is not a readable .npy file ({str(exc)[:200]}); expected an (N, {dim}) "
                       "float32 or float16 array saved with np.save") from None
    check_descriptor_file(arr, dim, f"{what} {path}")
    return arr


def check_descriptor_file(arr: Any, dim: int, what: str) -> None:
    """Refuse an array that is not (N >= 1, dim) float16/float32 (the message says what it is instead)."""
    if not isinstance(arr, np.ndarray) or arr.dtype.names is not None:
        raise MapError(f"{what} holds a {type(arr).__name__}, expected an (N, {dim}) float32 or float16 array")
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4):
        hint = " (convert it with .astype(np.float32))" if arr.dtype.kind == "f" else ""
        raise MapError(f"{what} holds {arr.dtype} values, expected float32 or float16 descriptors{hint}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise MapError(f"{what} has shape {arr.shape}, expected (N, {dim}): {dim}-d descriptors of the map's model, "
                       "one row per image")
    if arr.shape[0] == 0:
        raise MapError(f"{what} holds no descriptors")


def _check_rows(arr: np.ndarray, what: str, progress: Callable[[int], None] | None) -> None:
    """Every row finite and of unit L2 norm (the map's rule), in blocks."""
    for start in range(0, arr.shape[0], _BLOCK_ROWS):
        block = np.asarray(arr[start:start + _BLOCK_ROWS])
        check_unit_rows(block, lambda i: f"{what} row {start + i}", MapError,
                        hint="; import L2-normalised descriptors (x / np.linalg.norm(x, axis=1, keepdims=True)) and "
                             "drop rows that failed (NaN)")
        if progress is not None:
            progress(min(start + _BLOCK_ROWS, arr.shape[0]))


def import_descriptors(out: str | Path, descriptors: str | Path, csv_path: str | Path, fingerprint: dict[str, Any], *,
                       storage_dtype: str = "float16", camera: str = "images", metadata: dict[str, Any] | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> tuple[KeyframeMap, ImportReport]:
    """Write a new map at ``out`` from a descriptor ``.npy`` and a geotag CSV in the same row order.

    Args:
        out: the new map directory (must not hold a map).
        descriptors: (N, D) float16/float32 ``.npy``; D is the fingerprint's ``descriptor_dim``.
        csv_path: geotag CSV with N rows (:func:`~dinomix_ros.maps.sources.imagefolder.read_geotag_csv`).
        fingerprint: the model that computed the descriptors.
        storage_dtype: descriptor storage of the map.
        camera: camera name of the keyframes.
        metadata: the map's metadata.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        The saved map, loaded back memory-mapped (saving it again appends, e.g. its index), and the report.

    Raises:
        MapError: a fingerprint, .npy or CSV problem (wrong width or dtype, a row that is not a unit vector, a CSV
            with another row count); nothing is written then.
    """
    fingerprint = dict(fingerprint)
    check_fingerprint(fingerprint, "the fingerprint", MapError)
    dim = fingerprint["descriptor_dim"]
    arr = open_descriptors(descriptors, dim)
    n = arr.shape[0]
    report = ImportReport(str(descriptors), str(csv_path), descriptor_dtype=arr.dtype.name)
    tags = read_geotag_rows(csv_path)
    if len(tags) != n:
        raise MapError(f"{csv_path} has {len(tags)} data rows but {descriptors} holds {n} descriptors: the CSV needs "
                       "one row per descriptor row, in the same order")
    t0 = time.perf_counter()
    _check_rows(arr, str(descriptors), None if progress is None else lambda d: progress("check", d, n))
    report.check_s = time.perf_counter() - t0
    rows = _folder_rows(_unify_utm_zone(tags, None))
    columns = {
        "ids": np.arange(n, dtype=np.int64), "stamps_ns": np.zeros(n, dtype=np.int64),
        "cameras": as_str_column(camera, n, "cameras"), "frame_ids": as_str_column(rows["frame_ids"], n, "frame_ids"),
        "positions": as_float_rows(rows["positions"], n, 3, "positions"),
        "orientations": as_float_rows(rows["orientations"], n, 4, "orientations"),
        "gps": as_float_rows(rows["gps"], n, 3, "gps"), "utm_zones": as_zone_column(rows["utm_zones"], n),
        "utm_bands": as_str_column(rows["utm_bands"], n, "utm_bands"),
        "utm": as_float_rows(rows["utm"], n, 2, "utm"), "sources": as_str_column(rows["sources"], n, "sources"),
    }
    check_columns(columns, lambda i: f"{csv_path} data row {i + 1}", MapError)
    report.no_position = int((columns["frame_ids"] == "none").sum())
    # The .npy itself is the map's only segment until saved: the storage engine streams it into the chunk, converted
    # to the storage dtype block by block (never whole in RAM).
    name = dtype_name(storage_dtype)
    kmap = KeyframeMap(fingerprint, descriptor_dim=dim, storage_dtype=name, metadata=dict(metadata or {}),
                       created=utc_now_iso(), next_id=n, columns=columns, segments=[arr])
    if arr.dtype != STORAGE_DTYPES[name]:
        logger.info("import: %s descriptors are stored as %s", arr.dtype, name)
    t1 = time.perf_counter()
    save_map(kmap, out)
    report.write_s = time.perf_counter() - t1
    report.keyframes = n
    # the written map, memory-mapped: its rows were checked above and its files were just written and hashed
    return load_map(out, expected_fingerprint=fingerprint, verify=False), report
