"""``dinomix map``: build, inspect, query and evaluate keyframe maps.

Subcommands (each has ``--help`` with defaults):

* ``map build OUT``: a map from a ROS 2 bag (``--bag`` + topics) or a geotagged image folder (``--images``); saved
  atomically, printed as the JSON build report. ``--append`` adds to an existing map built by the same model.
* ``map info MAP``: what a map holds, from its manifest only (no descriptors are read).
* ``map topics BAG``: a bag's topics, types and counts, and which can be used as images, poses or GPS.
* ``map query MAP IMAGE...``: the top-k keyframes for each image, as JSON.
* ``map eval``: Recall@N, precision/recall of the best match and the similarity threshold reaching a target
  precision, for (a) two geotagged folders, (b) a map against a bag, or (c) loop closure against RTAB-Map ground
  truth. Writes ``report.json`` and PNG plots into one run folder; ``--calibrate MAP`` stores the threshold in the
  map's ``metadata["calibration"]`` for the live node.

Library errors (bad map, bag, image, model mismatch) end the command with a one-line message and exit code 2
(see :func:`dinomix_ros.cli.main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.maps.sources.imagefolder import GEOTAG_SOURCES
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig

__all__ = ["add_map_parser", "RANDOM_WEIGHTS_NOTE", "RECALL_NS"]

_logger = logging.getLogger("dinomix.map")

RANDOM_WEIGHTS_NOTE = "random weights: scores are meaningless"
RECALL_NS = (1, 5, 10, 20)  # VPR protocol; the folder and bag evaluations retrieve max(RECALL_NS) candidates
LOOP_NS = (1, 5, 10)
_INDEX_KINDS = ("exact", "hnsw", "ivfpq")  # dinomix_ros.maps.index.KINDS (not imported here: torch is slow to import)
_DETAIL_TOP = 5  # candidates listed per query in report.json


# --------------------------------------------------------------------------------------------------------------------
# parser


def add_map_parser(sub: argparse._SubParsersAction, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add ``map {build,info,topics,query,eval}`` to the ``dinomix`` subcommands.

    Args:
        sub: the subparsers action of the ``dinomix`` parser.
        formatter_class: the CLI's help formatter (shows defaults).
    """
    from dinomix_ros.cli.main import add_model_args

    fmt = formatter_class
    top = sub.add_parser("map", help="build, inspect, query and evaluate keyframe maps", formatter_class=fmt,
                         description="Build, inspect, query and evaluate keyframe maps; see each action's --help.")
    msub = top.add_subparsers(dest="map_command", required=True, metavar="ACTION")

    # -------------------------------------------------------------------------------------------- build
    p = msub.add_parser(
        "build", help="build a map from a bag or a geotagged image folder", formatter_class=fmt,
        description="Bag: images are paired with the pose interpolated at their header stamp, a keyframe gate per "
                    "camera picks keyframes, which are described and stored with pose, GPS/UTM and source. Folder: "
                    "one keyframe per image (natural order), posed from its geotag (file name, CSV or EXIF); "
                    "stamps are 0. Prints the build report as JSON.")
    p.add_argument("out", type=Path, metavar="OUT", help="map directory to write, e.g. maps/office.dinomap")
    source = p.add_argument_group("source (exactly one)")
    one = source.add_mutually_exclusive_group(required=True)
    one.add_argument("--bag", type=Path, help="ROS 2 bag directory (mcap or sqlite3)")
    one.add_argument("--images", type=Path, metavar="DIR", help="folder of geotagged images")
    bag = p.add_argument_group("bag options")
    _add_bag_args(bag)
    bag.add_argument("--gps-topic",
                     help="sensor_msgs/NavSatFix topic that geotags keyframes with lat/lon/alt and UTM (a NavSatFix "
                          "--pose-topic is used for this when left out)")
    bag.add_argument("--max-gps-gap-s", type=float, default=1.0,
                     help="a keyframe gets a GPS geotag only with fixes within this many seconds of its stamp")
    _add_gate_args(bag)
    folder = p.add_argument_group("folder options")
    folder.add_argument("--geotags", default="auto", choices=GEOTAG_SOURCES,
                        help="where positions come from: auto = '@UTM@' file names if all have them, else a CSV "
                             "(--csv or the only *.csv in the folder), else EXIF GPS; none = no positions")
    folder.add_argument("--csv", type=Path, metavar="FILE",
                        help="geotag CSV: image column plus lat/lon[/alt], x/y[/yaw] and/or UTM columns")
    out = p.add_argument_group("map options")
    out.add_argument("--camera", action="append", dest="cameras", metavar="NAME",
                     help="camera name; bag: once per --image-topic, in the same order (the topic names when left "
                          "out); folder: once ('images' when left out)")
    out.add_argument("--append", action="store_true",
                     help="add to the existing map OUT (it must have been built by the same model)")
    out.add_argument("--storage", default="float16", choices=["float16", "float32"],
                     help="descriptor storage dtype of a new map (float16 halves the size; ignored with --append)")
    out.add_argument("--index", default="exact", choices=_INDEX_KINDS,
                     help="search index to store with the map: exact is rebuilt on load (nothing stored); hnsw and "
                          "ivfpq are built now and saved (approximate, for large maps)")
    out.add_argument("--name", help="map name stored in its metadata (OUT's name without .dinomap when left out)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_build)

    # -------------------------------------------------------------------------------------------- info
    p = msub.add_parser("info", help="what a map holds (manifest only, no descriptors read)", formatter_class=fmt)
    p.add_argument("map", type=Path, metavar="MAP", help="map directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    # -------------------------------------------------------------------------------------------- topics
    p = msub.add_parser("topics", help="a bag's topics, types, counts and which can feed `map build`",
                        formatter_class=fmt)
    p.add_argument("bag", type=Path, metavar="BAG", help="ROS 2 bag directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_topics)

    # -------------------------------------------------------------------------------------------- query
    p = msub.add_parser("query", help="top-k keyframes of a map for each image (JSON)", formatter_class=fmt,
                        description="Loads the map with the model's fingerprint (a map built by another model is "
                                    "refused), describes the images and prints the best keyframes per image.")
    p.add_argument("map", type=Path, metavar="MAP", help="map directory")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="query images and/or folders of images")
    p.add_argument("--top-k", type=int, default=5, help="candidates per image")
    p.add_argument("--index", default="auto", choices=("auto",) + _INDEX_KINDS,
                   help="search index: auto = the kind stored with the map, else exact")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_query)

    # -------------------------------------------------------------------------------------------- eval
    p = msub.add_parser(
        "eval", help="Recall@N, precision/recall and threshold calibration", formatter_class=fmt,
        description="(a) --database DIR --queries DIR: geotagged folders; positives are database images within "
                    "--radius-m of the query (UTM or x/y metres). (b) --map MAP --bag BAG --image-topic T "
                    "--pose-topic P: bag images as queries, positives are keyframes within --radius-m in the same "
                    "frame. (c) --images DIR --loop-gt GT.bmp: causal loop closure against RTAB-Map ground truth. "
                    "Writes report.json and PNG plots into --out and prints a JSON summary; the precision/recall "
                    "curve is over each query's best match, and --target-precision picks the lowest threshold "
                    "reaching it (stored into a map's metadata with --calibrate).")
    setup = p.add_argument_group("setup (exactly one of --database, --map, --images)")
    one = setup.add_mutually_exclusive_group(required=True)
    one.add_argument("--database", type=Path, metavar="DIR", help="(a) geotagged database folder; needs --queries")
    one.add_argument("--map", type=Path, help="(b) map to evaluate; needs --bag, --image-topic and --pose-topic")
    one.add_argument("--images", type=Path, metavar="DIR",
                     help="(c) image sequence (natural order) for loop closure; needs --loop-gt")
    a = p.add_argument_group("(a) folders")
    a.add_argument("--queries", type=Path, metavar="DIR", help="geotagged query folder")
    a.add_argument("--geotags", default="auto", choices=GEOTAG_SOURCES, help="geotag source of both folders")
    a.add_argument("--database-csv", type=Path, metavar="FILE", help="geotag CSV of the database folder")
    a.add_argument("--queries-csv", type=Path, metavar="FILE", help="geotag CSV of the query folder")
    b = p.add_argument_group("(b) map and bag")
    b.add_argument("--bag", type=Path, help="ROS 2 bag with the query images and their poses")
    _add_bag_args(b)
    b.add_argument("--gate-queries", action="store_true",
                   help="query only the frames the keyframe gate (the flags below) would keep, not every frame")
    _add_gate_args(b)
    c = p.add_argument_group("(c) loop closure")
    c.add_argument("--loop-gt", type=Path, metavar="GT.bmp",
                   help="N x N ground-truth image (rtabmap-console -gt format), N = number of images")
    c.add_argument("--exclude-recent", type=int, default=10,
                   help="frames just before the query that are never loop candidates")
    common = p.add_argument_group("output and calibration")
    common.add_argument("--out", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                        help="run folder for report.json and the plots (default: runs/eval-<UTC time>)")
    common.add_argument("--radius-m", type=float, default=25.0,
                        help="(a, b) a database entry within this distance of the query is a correct match")
    common.add_argument("--target-precision", type=float, default=0.95,
                        help="precision the calibrated min_similarity must reach")
    common.add_argument("--calibrate", type=Path, metavar="MAP",
                        help="store min_similarity, the target precision and the summary in this map's "
                             "metadata['calibration'] (it must have been built by the same model)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def _add_bag_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--image-topic", action="append", dest="image_topics", metavar="TOPIC",
                       help="sensor_msgs/Image or CompressedImage topic; repeat for several cameras")
    group.add_argument("--pose-topic", metavar="TOPIC",
                       help="nav_msgs/Odometry, geometry_msgs/PoseStamped, PoseWithCovarianceStamped or "
                            "sensor_msgs/NavSatFix topic giving the position at each image stamp")
    group.add_argument("--max-pose-gap-s", type=float, default=0.2,
                       help="images without a pose within this many seconds of their stamp are skipped")


def _add_gate_args(group: argparse._ArgumentGroup) -> None:
    d = KeyframeGateConfig()
    group.add_argument("--min-distance-m", type=float, default=d.min_distance_m,
                       help="keyframe when moved at least this far since the camera's last keyframe (<= 0: off)")
    group.add_argument("--min-rotation-deg", type=float, default=d.min_rotation_deg,
                       help="keyframe when turned at least this much since the last keyframe (<= 0: off)")
    group.add_argument("--min-interval-s", type=float, default=d.min_interval_s,
                       help="never a keyframe sooner than this after the last one (<= 0: off)")
    group.add_argument("--max-interval-s", type=float, default=d.max_interval_s,
                       help="keyframe when this much time passed since the last one, even without motion (<= 0: off)")


def _gate_config(args: argparse.Namespace) -> KeyframeGateConfig:
    return KeyframeGateConfig(args.min_distance_m, args.min_rotation_deg, args.min_interval_s, args.max_interval_s)


def _refuse(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


# --------------------------------------------------------------------------------------------------------------------
# map build


def cmd_build(args: argparse.Namespace) -> int:
    """``dinomix map build``."""
    from dinomix_ros.cli.main import make_encoder
    from dinomix_ros.maps.sources.imagefolder import list_images
    from dinomix_ros.maps.build import (
        BagMapConfig,
        build_map_from_bag,
        build_map_from_folder,
        check_bag_config,
    )
    from dinomix_ros.maps.index import index_for_map, save_map
    from dinomix_ros.maps.keyframes import MANIFEST, KeyframeMap, MapNotFoundError

    config = None
    if args.bag is not None:
        _refuse(args, {"csv": "--csv"}, "to --bag (it is a folder option)")
        if args.geotags != "auto":
            raise ValueError("--geotags does not apply to --bag (it is a folder option)")
        if not args.image_topics or not args.pose_topic:
            raise ValueError(f"--bag needs --image-topic (once per camera) and --pose-topic; list the topics with "
                             f"`dinomix map topics {args.bag}`")
        config = BagMapConfig(image_topics=tuple(args.image_topics), pose_topic=args.pose_topic,
                              gps_topic=args.gps_topic, pairing=PosePairingConfig(max_gap_s=args.max_pose_gap_s),
                              max_gps_gap_s=args.max_gps_gap_s, gate=_gate_config(args),
                              camera_names=tuple(args.cameras or ()))
        check_bag_config(args.bag, config)  # before the model loads: a wrong topic fails in a second
        resolved: dict[str, Any] = {"bag": str(args.bag), **config.to_dict()}
    else:
        _refuse(args, {"image_topics": "--image-topic", "pose_topic": "--pose-topic", "gps_topic": "--gps-topic"},
                "to --images (they are bag options)")
        if args.cameras and len(args.cameras) > 1:
            raise ValueError(f"--camera was given {len(args.cameras)} times; a folder build names one camera")
        list_images(args.images)  # a missing or empty folder fails before the model loads
        resolved = {"images": str(args.images), "geotags": args.geotags, "csv": None if args.csv is None else
                    str(args.csv), "camera": (args.cameras or ["images"])[0]}
    out: Path = args.out
    has_map = (out / MANIFEST).is_file()
    if args.append and not has_map:
        raise MapNotFoundError(f"--append: there is no map at {out}; leave out --append to create one")
    if not args.append and has_map:
        raise ValueError(f"{out} already holds a map; pass --append to add to it, or choose another OUT")
    resolved.update(out=str(out), append=args.append, storage=args.storage, index=args.index)
    _logger.info("map build: %s", json.dumps(resolved))

    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    if args.append:
        kmap = KeyframeMap.load(out, expected_fingerprint=fingerprint)
        if kmap.storage_dtype != args.storage:
            _logger.info("--storage %s ignored: the map stores %s", args.storage, kmap.storage_dtype)
    else:
        kmap = KeyframeMap.empty(fingerprint, storage_dtype=args.storage,
                                 metadata={"name": args.name or _default_name(out)})
    if args.name:
        kmap.metadata["name"] = args.name
    if config is not None:
        kmap, report = build_map_from_bag(args.bag, encoder, config, kmap=kmap, progress=not args.quiet)
    else:
        kmap, report = build_map_from_folder(args.images, encoder, args.geotags, args.csv, kmap=kmap,
                                             camera=resolved["camera"], progress=not args.quiet,
                                             batch_size=args.batch_size)
    if report.added == 0 and not args.append:
        raise ValueError(f"no keyframe was added, nothing saved ({report.summary()}); check the topics, the pose "
                         "gap and that the poses cover the images' time span")
    kmap.metadata.setdefault("builds", []).append(
        {"time": _now_iso(), "model": fingerprint["id"], "report": report.to_dict(), "config": resolved})
    if args.random_weights:
        kmap.metadata["note"] = RANDOM_WEIGHTS_NOTE
    save_map(kmap, out, index_for_map(kmap, args.index, "cpu") if args.index != "exact" else None)
    _logger.info("%s -> %s (%d keyframes)", report.summary(), out, len(kmap))
    result = {"map": str(out), **({"note": RANDOM_WEIGHTS_NOTE} if args.random_weights else {}),
              "keyframes": len(kmap), "frames": kmap.frames, "index": args.index, "report": report.to_dict()}
    print(json.dumps(result, indent=2))
    return 0


def _default_name(out: Path) -> str:
    name = out.name
    return name[: -len(".dinomap")] if name.endswith(".dinomap") and len(name) > len(".dinomap") else name


# --------------------------------------------------------------------------------------------------------------------
# map info / topics


def cmd_info(args: argparse.Namespace) -> int:
    """``dinomix map info``: the manifest, summarised."""
    from dinomix_ros.maps.keyframes import read_manifest

    m = read_manifest(args.map)
    files = m["files"]
    records = [files["keyframes"], *files["descriptors"]] + ([files["index"]] if files["index"] else [])
    index = files["index"]
    metadata = dict(m["metadata"])
    info = {
        "map": str(args.map),
        "name": metadata.pop("name", None),
        "keyframes": m["count"],
        "next_id": m["next_id"],
        "generation": m["generation"],
        "descriptor_dim": m["descriptor_dim"],
        "descriptor_dtype": m["descriptor_dtype"],
        "frames": m["frames"],
        "cameras": m["cameras"],
        "model": m["fingerprint"],
        "created": m["created"],
        "updated": m["updated"],
        "writer": m["writer"],
        "index": None if index is None else {"kind": index["kind"], "rows": index["rows"],
                                             "fresh": index["rows"] == m["count"]},
        "calibration": metadata.pop("calibration", None),
        "bytes": sum(int(r["bytes"]) for r in records),
        "metadata": metadata,
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    model = info["model"]
    cal = info["calibration"]
    lines = [
        ("map", info["map"]),
        ("name", info["name"] or "-"),
        ("keyframes", f"{info['keyframes']} (next id {info['next_id']}, generation {info['generation']})"),
        ("descriptors", f"{info['descriptor_dim']}-d {info['descriptor_dtype']}, {info['bytes'] / 2**20:.2f} MiB "
                        "on disk in all"),
        ("frames", ", ".join(info["frames"]) or "-"),
        ("cameras", ", ".join(info["cameras"]) or "-"),
        ("model", f"{model['id']} ({model['architecture']}, weights sha256 {model['weights_sha256'][:12]}...)"),
        ("created", info["created"]),
        ("updated", f"{info['updated']} by {info['writer']}"),
        ("index", "none (exact search, built on load)" if index is None else
         f"{index['kind']} over {index['rows']} rows ({'fresh' if info['index']['fresh'] else 'stale, rebuilt'})"),
        ("calibration", "none" if not cal else
         f"min_similarity {cal.get('min_similarity')} at precision {cal.get('target_precision')} "
         f"({cal.get('setup')}, {cal.get('evaluated')})"),
    ]
    if "note" in metadata:
        lines.append(("note", str(metadata["note"])))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    """``dinomix map topics``: what each topic can be used for."""
    from dinomix_ros.maps.sources.bags import IMAGE_TYPES, POSE_TYPES
    from dinomix_ros.maps.sources.bags import bag_topics
    from dinomix_ros.maps.build import NAVSATFIX_TYPE

    rows = []
    for topic, (msgtype, count) in sorted(bag_topics(args.bag).items()):
        use = []
        if msgtype in IMAGE_TYPES:
            use.append("image")
        if msgtype in POSE_TYPES:
            use.append("pose")
        if msgtype == NAVSATFIX_TYPE:
            use.append("gps")
        rows.append({"topic": topic, "type": msgtype, "count": count, "usable_as": use})
    if args.json:
        print(json.dumps({"bag": str(args.bag), "topics": rows}, indent=2))
        return 0
    header = ("topic", "type", "count", "usable as")
    table = [header] + [(r["topic"], r["type"], str(r["count"]), ", ".join(r["usable_as"]) or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print("\n".join("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip() for row in table))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# map query


def cmd_query(args: argparse.Namespace) -> int:
    """``dinomix map query``: top-k keyframes per image."""
    from dinomix_ros.cli.main import expand_images, make_encoder
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.keyframes import KeyframeMap

    if args.top_k < 1:
        raise ValueError(f"--top-k is {args.top_k}; expected at least 1")
    paths = expand_images(args.images)
    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    kmap = KeyframeMap.load(args.map, expected_fingerprint=fingerprint)
    if len(kmap) == 0:
        raise ValueError(f"the map at {args.map} has no keyframes; build it first (`dinomix map build`)")
    kind = _index_kind(kmap) if args.index == "auto" else args.index
    index = index_for_map(kmap, kind, _index_device(args.device, kind))
    desc = encoder.describe(paths, progress=not args.quiet, skip_errors=True, desc="query")
    ok = np.isfinite(desc).all(axis=1)
    D = np.full((len(paths), args.top_k), -np.inf, np.float32)
    I = np.full((len(paths), args.top_k), -1, np.int64)  # noqa: E741 - faiss naming
    if ok.any():
        D[ok], I[ok] = index.search(desc[ok], args.top_k)
    threshold = (kmap.metadata.get("calibration") or {}).get("min_similarity")
    queries = []
    for q, path in enumerate(paths):
        entry: dict[str, Any] = {"image": str(path)}
        if not ok[q]:
            entry["error"] = "the image could not be read"
        else:
            entry["candidates"] = [_candidate(kmap, rank, float(D[q, rank]), int(I[q, rank]), threshold)
                                   for rank in range(args.top_k) if I[q, rank] >= 0]
        queries.append(entry)
    result: dict[str, Any] = {"map": str(args.map), "model": fingerprint["id"],
                              **({"note": RANDOM_WEIGHTS_NOTE} if args.random_weights else {}),
                              "keyframes": len(kmap), "index": kind, "min_similarity": threshold, "queries": queries}
    print(json.dumps(_clean(result), indent=2, ensure_ascii=False))
    return 0


def _index_kind(kmap: Any) -> str:
    from dinomix_ros.maps.index import INDEX_KIND_NAMES

    stored = {v: k for k, v in INDEX_KIND_NAMES.items()}.get(kmap.index_kind or "")
    return stored or "exact"


def _index_device(device: str, kind: str) -> str:
    if kind != "exact" or device == "cpu":
        return "cpu"
    return "cuda" if device.startswith("cuda") else "auto"


def _candidate(kmap: Any, rank: int, similarity: float, row: int, threshold: float | None) -> dict[str, Any]:
    kf = kmap.keyframe(row)
    out: dict[str, Any] = {
        "rank": rank,
        "similarity": round(similarity, 6),
        "keyframe_id": kf.id,
        "stamp_ns": kf.stamp_ns,
        "camera": kf.camera,
        "frame_id": kf.frame_id,
        "position": None if kf.position is None else list(kf.position),
        "orientation": None if kf.orientation is None else list(kf.orientation),
        "gps": None if kf.gps is None else {"lat": kf.gps[0], "lon": kf.gps[1], "alt": kf.gps[2]},
        "utm": None if kf.utm is None else {"zone": kf.utm_zone, "band": kf.utm_band, "easting": kf.utm[0],
                                            "northing": kf.utm[1]},
        "source": kf.source,
    }
    if threshold is not None:
        out["above_min_similarity"] = similarity >= float(threshold)
    return out


# --------------------------------------------------------------------------------------------------------------------
# map eval


def cmd_eval(args: argparse.Namespace) -> int:
    """``dinomix map eval``: one of three setups, a report folder, optional calibration of a map."""
    from dinomix_ros.cli.main import make_encoder
    from dinomix_ros.util.files import atomic_path
    from dinomix_ros.maps.keyframes import MapMismatchError, read_manifest

    setup = "folders" if args.database is not None else "bag" if args.map is not None else "loop_closure"
    _check_eval_args(args, setup)
    out: Path = getattr(args, "out", None) or Path("runs") / f"eval-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    _check_eval_inputs(args, setup)  # missing files, topics or a ground-truth size mismatch fail before the model loads
    if args.calibrate is not None:
        read_manifest(args.calibrate)
    _logger.info("map eval (%s): out=%s radius_m=%s target_precision=%s calibrate=%s", setup, out, args.radius_m,
                 args.target_precision, args.calibrate)
    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    if args.calibrate is not None:
        map_model = read_manifest(args.calibrate)["fingerprint"]
        if map_model["id"] != fingerprint["id"]:
            raise MapMismatchError(f"--calibrate {args.calibrate} was built with model {map_model['id']} "
                                   f"({map_model.get('architecture')}), but the model in use is {fingerprint['id']} "
                                   f"({fingerprint.get('architecture')}): a threshold of one model means nothing "
                                   "for another. Evaluate with the model that built the map")

    t0 = time.perf_counter()
    if setup == "folders":
        report, curve, recall = _eval_folders(args, encoder)
    elif setup == "bag":
        report, curve, recall = _eval_bag(args, encoder)
    else:
        report, curve, recall = _eval_loop(args, encoder, out)
    threshold = curve.threshold_for_precision(args.target_precision)
    calibration = {
        "target_precision": args.target_precision,
        "min_similarity": threshold,
        "recall_at_target": curve.recall_at_precision(args.target_precision),
        "operating_point": None if threshold is None else curve.operating_point(threshold).to_dict(),
        "max_f1": curve.max_f1().to_dict(),
    }
    report = {
        "setup": setup,
        "model": fingerprint,
        **({"note": RANDOM_WEIGHTS_NOTE} if args.random_weights else {}),
        **report,
        "recall": recall.to_dict(),
        "average_precision": curve.average_precision,
        "calibration": calibration,
        "pr_curve": curve.to_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
        "plots": {},
    }
    report["plots"].update(_plots(out, setup, recall, curve, threshold, args.random_weights))
    if setup == "loop_closure":
        report["plots"]["similarity"] = str(out / "similarity.png")
    if args.calibrate is not None and threshold is not None:
        _calibrate(args.calibrate, fingerprint, report, out)
        report["calibration"]["written_to"] = str(args.calibrate)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(_clean(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    summary = {k: report[k] for k in ("setup", "note", "num_queries", "num_database", "radius_m", "recall",
                                      "average_precision", "calibration", "seconds") if k in report}
    summary["report"] = str(out / "report.json")
    _logger.info("%s: %s; min_similarity %s at precision %s -> %s", setup, recall.summary(), threshold,
                 args.target_precision, out)
    print(json.dumps(_clean(summary), indent=2))
    if args.calibrate is not None and threshold is None:
        raise ValueError(f"no similarity threshold reaches precision {args.target_precision} (best: "
                         f"{float(np.max(curve.precision)):.3f}); {args.calibrate} was not changed. Lower "
                         "--target-precision, or evaluate on more data")
    return 0


def _check_eval_args(args: argparse.Namespace, setup: str) -> None:
    folder_flags = {"queries": "--queries", "database_csv": "--database-csv", "queries_csv": "--queries-csv"}
    bag_flags = {"bag": "--bag", "image_topics": "--image-topic", "pose_topic": "--pose-topic",
                 "gate_queries": "--gate-queries"}
    loop_flags = {"loop_gt": "--loop-gt"}
    if setup == "folders":
        if args.queries is None:
            raise ValueError("--database needs --queries (a geotagged folder of query images)")
        _refuse(args, {**bag_flags, **loop_flags}, "to --database/--queries (setup a)")
    elif setup == "bag":
        if args.bag is None or not args.image_topics or not args.pose_topic:
            raise ValueError("--map needs --bag, --image-topic and --pose-topic (the query images and their poses)")
        _refuse(args, {**folder_flags, **loop_flags}, "to --map/--bag (setup b)")
    else:
        if args.loop_gt is None:
            raise ValueError("--images needs --loop-gt (the N x N ground-truth image, rtabmap-console -gt format)")
        _refuse(args, {**folder_flags, **bag_flags}, "to --images/--loop-gt (setup c)")
    if not (isinstance(args.radius_m, float) and math.isfinite(args.radius_m) and args.radius_m > 0):
        raise ValueError(f"--radius-m is {args.radius_m}; expected a positive distance in metres")
    if not 0.0 < args.target_precision <= 1.0:
        raise ValueError(f"--target-precision is {args.target_precision}; expected a value in (0, 1], e.g. 0.95")
    if args.exclude_recent < 0:
        raise ValueError(f"--exclude-recent is {args.exclude_recent}; expected frames >= 0")


def _check_eval_inputs(args: argparse.Namespace, setup: str) -> None:
    from dinomix_ros.maps.sources.imagefolder import list_images

    if setup == "folders":
        list_images(args.database)
        list_images(args.queries)
    elif setup == "bag":
        from dinomix_ros.maps.build import BagMapConfig, check_bag_config
        from dinomix_ros.maps.keyframes import read_manifest

        read_manifest(args.map)
        check_bag_config(args.bag, BagMapConfig(image_topics=tuple(args.image_topics), pose_topic=args.pose_topic))
    else:
        from dinomix_ros.evaluation.metrics import load_loop_closure_ground_truth

        n = len(list_images(args.images))
        gt = load_loop_closure_ground_truth(args.loop_gt)
        if gt.shape[0] != n:
            raise ValueError(f"{args.loop_gt} is {gt.shape[0]} x {gt.shape[0]} but {args.images} holds {n} images; "
                             "expected one ground-truth row and column per image, in natural file order")


def _retrieval(D: np.ndarray, I: np.ndarray, positives: list[np.ndarray]) -> tuple[Any, Any, np.ndarray]:
    """Recall@N and the best-match PR curve of (Q, K) search results (I indexes the database, -1 padding)."""
    from dinomix_ros.evaluation.metrics import precision_recall_curve, recall_at_n

    if I.shape[0] == 0:
        raise ValueError("no query could be evaluated (no query image with a position was readable)")
    recall = recall_at_n(I, positives, RECALL_NS)
    has_positive = np.array([p.size > 0 for p in positives], dtype=bool)
    correct = np.array([I[q, 0] >= 0 and bool(np.isin(I[q, 0], positives[q])) for q in range(I.shape[0])], bool)
    curve = precision_recall_curve(D[:, 0].astype(np.float64), correct, has_positive)
    return recall, curve, correct


def _eval_folders(args: argparse.Namespace, encoder: Any) -> tuple[dict[str, Any], Any, Any]:
    from dinomix_ros.evaluation.metrics import positives_within
    from dinomix_ros.maps.sources.imagefolder import geotag_images
    from dinomix_ros.maps.index import PlaceIndex

    db_tags = geotag_images(args.database, args.geotags, args.database_csv)
    zones = Counter(t.utm.zone for t in db_tags if t.utm is not None)
    zone = zones.most_common(1)[0][0] if zones else None
    q_tags = geotag_images(args.queries, args.geotags, args.queries_csv, utm_zone=zone)
    db_xy, db_kind = _metric_positions(db_tags, "database", args.database)
    q_xy, q_kind = _metric_positions(q_tags, "query", args.queries)
    if db_kind != q_kind:
        raise ValueError(f"the database positions are {db_kind} but the query positions are {q_kind}; both "
                         "folders need the same kind of geotag (UTM/GPS, or x/y in one map frame)")
    frame = "map" if db_kind == "x/y" else _utm_frame(db_tags)
    progress = not args.quiet
    db_desc = encoder.describe([t.path for t in db_tags], progress=progress, skip_errors=True, desc="database")
    q_desc = encoder.describe([t.path for t in q_tags], progress=progress, skip_errors=True, desc="queries")
    db_ok = np.isfinite(db_desc).all(axis=1)
    if not db_ok.any():
        raise ValueError(f"no database image in {args.database} could be read")
    db_rows = np.flatnonzero(db_ok)
    index = PlaceIndex(encoder.descriptor_dim, "exact", _index_device(args.device, "exact"))
    index.add(db_desc[db_ok])
    q_ok = np.isfinite(q_desc).all(axis=1)
    q_has_xy = np.isfinite(q_xy).all(axis=1)
    q_rows = np.flatnonzero(q_ok & q_has_xy)
    D, I = index.search(q_desc[q_rows], max(RECALL_NS)) if q_rows.size else \
        (np.zeros((0, max(RECALL_NS)), np.float32), np.zeros((0, max(RECALL_NS)), np.int64))
    I = np.where(I >= 0, db_rows[np.clip(I, 0, None)], -1)  # noqa: E741 - index rows -> database rows
    db_xy = np.where(db_ok[:, None], db_xy, np.nan)  # an unreadable database image is never a positive
    positives = positives_within(db_xy, q_xy[q_rows], args.radius_m)
    recall, curve, correct = _retrieval(D, I, positives)
    detail = []
    for j, q in enumerate(q_rows):
        top = [int(i) for i in I[j, :_DETAIL_TOP] if i >= 0]
        best = top[0] if top else None
        detail.append({
            "image": str(q_tags[q].path),
            "best": None if best is None else str(db_tags[best].path),
            "similarity": float(D[j, 0]),
            "correct": bool(correct[j]),
            "distance_m": None if best is None else float(np.linalg.norm(db_xy[best] - q_xy[q])),
            "num_positives": int(positives[j].size),
            "top": [str(db_tags[i].path.name) for i in top],
        })
    report = {
        "database": str(args.database),
        "queries": str(args.queries),
        "frame": frame,
        "radius_m": args.radius_m,
        "num_database": len(db_tags),
        "num_queries": int(q_rows.size),
        "skipped": {"database_unreadable": int((~db_ok).sum()), "database_without_position":
                    int((~np.isfinite(db_xy).all(axis=1) & db_ok).sum()),
                    "queries_unreadable": int((~q_ok).sum()), "queries_without_position": int((~q_has_xy).sum())},
        "queries_detail": detail,
    }
    return report, curve, recall


def _metric_positions(tags: list[Any], what: str, folder: Path) -> tuple[np.ndarray, str]:
    """(N, 2) metric positions (x/y if any image has them, else UTM), NaN where unknown, and their kind."""
    use_xy = any(t.x is not None and t.y is not None for t in tags)
    xy = np.full((len(tags), 2), np.nan)
    for i, t in enumerate(tags):
        if use_xy and t.x is not None and t.y is not None:
            xy[i] = (t.x, t.y)
        elif not use_xy and t.utm is not None:
            xy[i] = (t.utm.easting, t.utm.northing)
    if not np.isfinite(xy).all(axis=1).any():
        raise ValueError(f"no {what} image in {folder} has a metric position (UTM or x/y); geotag the images "
                         "('@UTM@' file names, a CSV, or EXIF GPS) or choose --geotags")
    return xy, "x/y" if use_xy else "UTM"


def _utm_frame(tags: list[Any]) -> str:
    from dinomix_ros.maps.sources.geo import utm_frame_id

    first = next(t.utm for t in tags if t.utm is not None)
    return utm_frame_id(first.zone, first.band)


def _eval_bag(args: argparse.Namespace, encoder: Any) -> tuple[dict[str, Any], Any, Any]:
    from dinomix_ros.maps.sources.bags import read_pose_track
    from dinomix_ros.evaluation.metrics import positives_within
    from dinomix_ros.imaging.decode import ImageDecodeError
    from dinomix_ros.maps.build import BagMapConfig, BuildReport, PosedImageStream, check_bag_config
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.keyframes import KeyframeMap

    config = BagMapConfig(image_topics=tuple(args.image_topics), pose_topic=args.pose_topic, gps_topic="",
                          pairing=PosePairingConfig(max_gap_s=args.max_pose_gap_s), gate=_gate_config(args))
    check_bag_config(args.bag, config)
    kmap = KeyframeMap.load(args.map, expected_fingerprint=encoder.fingerprint.to_dict())
    if len(kmap) == 0:
        raise ValueError(f"the map at {args.map} has no keyframes")
    track = read_pose_track(args.bag, args.pose_topic)
    frame = track.frame_id
    if frame not in kmap.frames:
        raise ValueError(f"the poses of {args.pose_topic} are in frame {frame!r} but the map's keyframes are in "
                         f"{kmap.frames}: positions in different frames cannot be compared. Use a pose topic in the "
                         "map's frame (e.g. the one the map was built with)")
    in_frame = kmap.frame_ids == frame
    map_xy = np.where(in_frame[:, None], kmap.positions[:, :2], np.nan)
    kind = _index_kind(kmap)
    index = index_for_map(kmap, kind, _index_device(args.device, kind))
    counts = BuildReport(source=f"bag:{args.bag}", frame_id=frame)
    stream = PosedImageStream(args.bag, config.image_topics, track, config.pairing.max_gap_s,
                              gate=config.gate if args.gate_queries else None, report=counts,
                              progress=not args.quiet)
    k = max(RECALL_NS)
    Ds, Is, xy, meta, batch = [], [], [], [], []

    def flush() -> None:
        if batch:
            desc = encoder.describe_prepared(np.stack(batch))
            D, I = index.search(desc, k)  # noqa: E741
            Ds.append(D)
            Is.append(I)
            batch.clear()

    for posed in stream:
        try:
            prepared = encoder.prepare(*posed.image.decode())
        except ImageDecodeError as exc:
            counts.bad += 1
            _logger.warning("skipping undecodable query %s@%d: %s", posed.image.topic, posed.image.stamp_ns, exc)
            continue
        batch.append(prepared)
        xy.append(posed.position[:2])
        meta.append((posed.image.topic, posed.image.stamp_ns))
        if len(batch) >= encoder.config.batch_size:
            flush()
    flush()
    D = np.concatenate(Ds) if Ds else np.zeros((0, k), np.float32)
    I = np.concatenate(Is) if Is else np.zeros((0, k), np.int64)  # noqa: E741
    q_xy = np.array(xy, dtype=np.float64).reshape(-1, 2)
    positives = positives_within(map_xy, q_xy, args.radius_m)
    recall, curve, correct = _retrieval(D, I, positives)
    detail = []
    for j, (topic, stamp) in enumerate(meta):
        best = int(I[j, 0])
        detail.append({
            "topic": topic,
            "stamp_ns": stamp,
            "best_keyframe_id": None if best < 0 else int(kmap.ids[best]),
            "similarity": float(D[j, 0]),
            "correct": bool(correct[j]),
            "distance_m": None if best < 0 else float(np.linalg.norm(map_xy[best] - q_xy[j])),
            "num_positives": int(positives[j].size),
        })
    report = {
        "map": str(args.map),
        "bag": str(args.bag),
        "image_topics": list(config.image_topics),
        "pose_topic": args.pose_topic,
        "frame": frame,
        "radius_m": args.radius_m,
        "gated": bool(args.gate_queries),
        "num_database": int(in_frame.sum()),
        "num_queries": len(meta),
        "skipped": {"images_seen": counts.images_seen, "no_pose": counts.no_pose,
                    "not_keyframes": counts.not_keyframes, "unreadable": counts.bad,
                    "map_keyframes_in_other_frames": int((~in_frame).sum())},
        "queries_detail": detail,
    }
    return report, curve, recall


def _eval_loop(args: argparse.Namespace, encoder: Any, out: Path) -> tuple[dict[str, Any], Any, Any]:
    from dinomix_ros.evaluation.metrics import (
        evaluate_loop_closures,
        load_loop_closure_ground_truth,
        plot_similarity_matrix,
    )
    from dinomix_ros.maps.sources.imagefolder import list_images

    paths = list_images(args.images)
    gt = load_loop_closure_ground_truth(args.loop_gt)  # its size was checked by _check_eval_inputs
    desc = encoder.describe(paths, progress=not args.quiet, desc="sequence")  # a bad image is an error here
    sim = desc @ desc.T  # (N, N) cosine similarity of unit descriptors
    result = evaluate_loop_closures(sim, gt, exclude_recent=args.exclude_recent, ns=LOOP_NS)
    threshold = result.pr_curve.threshold_for_precision(args.target_precision)
    if threshold is not None:  # again, for the loops this threshold accepts on the first pass
        result = evaluate_loop_closures(sim, gt, exclude_recent=args.exclude_recent, ns=LOOP_NS, threshold=threshold)
    plot_similarity_matrix(sim, gt | gt.T, out / "similarity.png")
    full = result.to_dict()
    report = {
        "images": str(args.images),
        "loop_gt": str(args.loop_gt),
        "exclude_recent": args.exclude_recent,
        "num_frames": result.num_frames,
        "num_queries": int(result.pr_curve.num_queries),
        "first_pass_end": result.first_pass_end,
        "false_loops_first_pass": result.false_loops_first_pass,
        "frames_detail": [
            {"image": p.name, "best": None if b is None else paths[b].name, "similarity": s, "correct": c}
            for p, b, s, c in zip(paths, full["best_match"], full["best_score"], full["correct"])
        ],
    }
    return report, result.pr_curve, result.recall


def _plots(out: Path, setup: str, recall: Any, curve: Any, threshold: float | None, random: bool) -> dict[str, str]:
    from dinomix_ros.evaluation.metrics import plot_pr_curve, plot_recall_at_n

    label = f"DINO-Mix ({setup})" + (" [random weights]" if random else "")
    plot_recall_at_n({label: recall}, out / "recall.png")
    plot_pr_curve({label: curve}, out / "pr.png", mark_threshold=threshold)
    return {"recall": str(out / "recall.png"), "pr": str(out / "pr.png")}


def _calibrate(path: Path, fingerprint: dict[str, Any], report: dict[str, Any], out: Path) -> None:
    """Store the calibrated threshold and the evaluation summary in the map's metadata (atomic save)."""
    from dinomix_ros.maps.keyframes import KeyframeMap

    kmap = KeyframeMap.load(path, expected_fingerprint=fingerprint, load_index=False)
    cal = report["calibration"]
    kmap.metadata["calibration"] = _clean({
        "min_similarity": cal["min_similarity"],
        "target_precision": cal["target_precision"],
        "recall_at_target": cal["recall_at_target"],
        "setup": report["setup"],
        "radius_m": report.get("radius_m"),
        "evaluated": _now_iso(),
        "model": fingerprint["id"],
        "report": str(out / "report.json"),
        "summary": {"recall": report["recall"], "average_precision": report["average_precision"],
                    "num_queries": report.get("num_queries"), "operating_point": cal["operating_point"]},
        **({"note": report["note"]} if "note" in report else {}),
    })
    kmap.save(path)
    _logger.info("calibrated %s: min_similarity %.6f for precision %s", path, cal["min_similarity"],
                 cal["target_precision"])


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _now_iso() -> str:
    from dinomix_ros.maps.keyframes import utc_now_iso

    return utc_now_iso()


def _clean(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, non-finite floats to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
