"""Build keyframe maps offline from geotagged image folders: one keyframe per image, in natural file order.

Image folders (:func:`build_map_from_folder`):

* Stamps are all 0 ("unknown capture time"): folder images carry no trustworthy clock, and made-up stamps such as
  ``index * 1 s`` would look like real time to the live node's recency filters. The row order is the file order.
* x/y[/yaw] geotags (CSV): position ``(x, y, 0)``, orientation the yaw about +z when given, frame ``"map"``.
* UTM/GPS geotags (file names, CSV, EXIF): position ``(easting, northing, altitude or 0)``, no orientation, frame
  ``utm`` (one zone for the whole build, see :func:`build_map_from_folder`), plus the gps and utm columns.
* No geotag: no position, frame :data:`NO_POSE_FRAME` (``"none"``; the map format needs a non-empty frame id). Such a
  map still works for retrieval; it just cannot give a pose prior.

What every builder shares (:class:`~dinomix_ros.maps.build.BuildReport`, :class:`~dinomix_ros.maps.build.MapBuildError`)
lives in :mod:`dinomix_ros.maps.build`.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.decode import read_image_file
from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.maps.build import BuildReport, MapBuildError
from dinomix_ros.maps.build import _target_map  # one check of the map a build appends to, shared by the builders
from dinomix_ros.maps.geotags import NO_POSE_FRAME, geotag_columns
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import FeatureRecorder
from dinomix_ros.maps.sources.geo import UTM_FRAME
from dinomix_ros.maps.sources.imagefolder import geotag_images
from dinomix_ros.maps.sources.poses import yaw_to_quat
from dinomix_ros.util.progress import progress_bar

if TYPE_CHECKING:  # localization imports maps: only for annotations
    from dinomix_ros.localization.extrinsics import CameraExtrinsics

__all__ = ["build_map_from_folder"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- folder builder


def _map_utm_zone(kmap: KeyframeMap | None) -> int | None:
    """The UTM zone of the map's geotagged keyframes (one per map), if it has any."""
    if kmap is None:
        return None
    zones = {int(z) for z in kmap.utm_zones.tolist() if z}
    return zones.pop() if len(zones) == 1 else None


def _folder_rows(tags: list[Any]) -> dict[str, Any]:
    """Keyframe columns of geotagged images (see the module docstring): poses, frames, sources and geotags."""
    n = len(tags)
    pos, ori = np.full((n, 3), np.nan), np.full((n, 4), np.nan)
    gps, utm = np.full((n, 3), np.nan), np.full((n, 2), np.nan)
    bands, frames = [""] * n, [NO_POSE_FRAME] * n
    zone = next((t.utm.zone for t in tags if t.utm is not None), None)  # geotag_images unified the zones
    for i, t in enumerate(tags):
        if t.lat is not None and t.lon is not None:
            gps[i] = (t.lat, t.lon, np.nan if t.alt is None else t.alt)
        if t.utm is not None:
            utm[i], bands[i] = (t.utm.easting, t.utm.northing), t.utm.band
        if t.x is not None and t.y is not None:
            pos[i], frames[i] = (t.x, t.y, 0.0), "map"
            if t.yaw is not None:
                ori[i] = yaw_to_quat(t.yaw)
        elif t.utm is not None:
            pos[i] = (t.utm.easting, t.utm.northing, 0.0 if t.alt is None else t.alt)
            frames[i] = UTM_FRAME
    columns = geotag_columns(gps, zone, utm=utm if zone is not None else None, bands=bands)
    return {"frame_ids": frames, "positions": pos, "orientations": ori, **columns,
            "sources": [str(t.path) for t in tags]}


def build_map_from_folder(
    folder: str | Path,
    encoder: Any,
    geotag_source: str = "auto",
    csv_path: str | Path | None = None,
    kmap: KeyframeMap | None = None,
    camera: str = "images",
    progress: bool = True,
    *,
    recursive: bool = False,
    batch_size: int | None = None,
    features: FeatureConfig | None = None,
    intrinsics: CameraModel | None = None,
    extrinsics: CameraExtrinsics | None = None,
) -> tuple[KeyframeMap, BuildReport]:
    """One keyframe per image of a folder (natural file order), geotagged from file names, a CSV or EXIF.

    See the module docstring for the poses, frames and stamps each kind of geotag gives. UTM positions use one zone
    for the whole build (the existing map's zone when appending, else the most common zone of the images), in the
    frame ``utm``.

    Args:
        folder: the image folder.
        encoder: a :class:`~dinomix_ros.model.encoder.Encoder`.
        geotag_source: "auto", "filename", "csv", "exif" or "none" (see
            :func:`~dinomix_ros.maps.sources.imagefolder.geotag_images`).
        csv_path: geotag CSV for "csv"/"auto" (default: the only ``*.csv`` in the folder).
        kmap: a map to append to (same model); None creates a float16 map.
        camera: camera name of the keyframes.
        progress: show a progress bar.
        recursive: include sub-folders.
        batch_size: images per forward pass (default: the encoder's).
        features: local features stored per keyframe (None: none, the map has no verification); the images are
            read once more for them.
        intrinsics: the camera's intrinsics (e.g. from a calibration YAML), stored in the map (fitted to the images'
            size: scaled when only the resolution differs).
        extrinsics: the camera's extrinsic, looked up by frame_id = ``camera`` (a folder's images have no header),
            stored in its camera record (None: ``camera_mount.*``'s default).

    Returns:
        The map (``kmap`` itself when given) and the build report.

    Raises:
        ImageFolderError: (a FileNotFoundError) no folder or no images.
        GeotagFormatError / GeotagCSVError / ExifGPSError: malformed geotags.
        MapMismatchError: ``kmap`` was built by another model.
    """
    # Over 80 lines with its docstring (the code is under 50): one pass from folder to map, kept readable in one place.
    t0 = time.perf_counter()
    kmap = _target_map(encoder, kmap)
    if not isinstance(camera, str) or not camera:
        raise MapBuildError(f"camera is {camera!r}; expected a non-empty name such as 'images'")
    known_utm = _map_utm_zone(kmap)
    tags = geotag_images(folder, geotag_source, csv_path, recursive=recursive, utm_zone=known_utm)
    rows = _folder_rows(tags)
    frames = rows["frame_ids"]
    report = BuildReport(source=f"images:{folder}", images_seen=len(tags))
    report.no_geotag = sum(f == NO_POSE_FRAME for f in frames)
    distinct = sorted(set(frames))
    report.frame_id = distinct[0] if len(distinct) == 1 else ",".join(distinct)
    logger.info("building from %s: %d images, frames %s, %d without a position", folder, len(tags), distinct,
                report.no_geotag)
    recorder = FeatureRecorder(kmap, features, {camera: intrinsics} if intrinsics is not None else None, extrinsics)
    bar = progress_bar(len(tags), "map build", progress)
    try:
        with closing(encoder.describe_stream(((t.path, None, i) for i, t in enumerate(tags)),
                                             batch_size=batch_size)) as batches:
            for batch in batches:
                for i, exc in batch.failed:
                    report.bad += 1
                    report.no_geotag -= frames[i] == NO_POSE_FRAME
                    logger.warning("skipping image %d (%s): %s", i, tags[i].path, exc)
                if batch.tags:
                    sel = np.asarray(batch.tags)
                    # a folder's images have no header: their frame_id is the camera name
                    kept = [recorder.keyframe(*read_image_file(tags[i].path, encoder.image.max_pixels), camera,
                                              camera) for i in sel] if recorder.active else None
                    kmap.add(batch.descriptors, stamps_ns=np.zeros(sel.size, dtype=np.int64),
                             cameras=camera if kept is None else [name for _, name in kept],
                             features=None if kept is None else [f for f, _ in kept],
                             **{k: [v[i] for i in sel] if isinstance(v, list) else v[sel] for k, v in rows.items()})
                    report.added += int(sel.size)
                bar.update(len(batch))
    finally:
        bar.close()
    if report.added:
        report.per_camera[camera] = report.added
    report.seconds = time.perf_counter() - t0
    logger.info("%s", report.summary())
    return kmap, report
