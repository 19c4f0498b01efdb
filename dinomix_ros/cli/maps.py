"""``dinomix map``: build, inspect, query (and evaluate, :mod:`dinomix_ros.cli.evaluate`) keyframe maps.

Actions (each has ``--help`` with defaults):

* ``map build OUT``: a map from a ROS 2 bag (``--bag`` + topics; ``--pose-bag`` when the poses and GPS were
  recorded into another bag) or a geotagged image folder (``--images``); saved atomically, printed as the JSON build
  report. ``--append`` adds to an existing map built by the same model.
* ``map info MAP``: what a map holds, from its manifest only (no descriptors are read).
* ``map topics BAG``: a bag's topics, types and counts, and which can be used as images, poses or GPS.
* ``map query MAP IMAGE...``: the top-k keyframes for each image, verified geometrically as the node does it
  (:mod:`dinomix_ros.cli.verify`), as JSON (``--descriptors Q.npy``: for stored query descriptors, no model, not
  verified: :mod:`dinomix_ros.cli.map_import`).
* ``map import OUT --descriptors D.npy --csv GEOTAGS.csv``: a map from descriptors computed elsewhere
  (:mod:`dinomix_ros.cli.map_import`).
* ``map eval``: see :mod:`dinomix_ros.cli.evaluate`.
* ``map push``, ``map pull``: the fleet's shared map, see :mod:`dinomix_ros.cli.fleet`.

Library errors (bad map, bag, image, model mismatch) end the command with a one-line message and exit code 2
(see :func:`dinomix_ros.cli.main.main`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.cli import evaluate, fleet, map_import
from dinomix_ros.cli.verify import QueryVerifier, add_verification_flags
from dinomix_ros.cli.common import (
    add_bag_flags,
    add_command,
    add_model_flags,
    check_map_out,
    exact_search_device,
    expand_images,
    make_encoder,
    refuse,
    show_progress,
)
from dinomix_ros.settings import add_flags, from_flags

if TYPE_CHECKING:  # imported where used: maps.build_bag imports torch
    from dinomix_ros.maps.build_bag import BagMapConfig
    from dinomix_ros.maps.keyframes import KeyframeMap

__all__ = ["register"]

_logger = logging.getLogger("dinomix.map")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``map {build,info,topics,query,eval,push,pull}`` to the ``dinomix`` commands."""
    add_command(sub, "map", _add_actions, summary="build, inspect, query, evaluate and share keyframe maps",
                description="Build, inspect, query, evaluate and share (fleet) keyframe maps; see each action's "
                            "--help.")


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="map_command", required=True, metavar="ACTION")
    add_command(actions, "build", _add_build_arguments, run=run_build, check_early=_check_build_early,
                summary="build a map from a bag or a geotagged image folder",
                description="Bag: images are paired with the pose interpolated at their header stamp, a keyframe "
                            "gate per camera picks keyframes, which are described and stored with pose, GPS/UTM and "
                            "source; with --pose-bag the poses and GPS come from a second bag recorded at the same "
                            "time (header stamps of one clock). Folder: one keyframe per image (natural order), "
                            "posed from its geotag (file name, CSV or EXIF); stamps are 0. Prints the build report "
                            "as JSON.")
    add_command(actions, "info", _add_info_arguments, run=run_info,
                summary="what a map holds (manifest only, no descriptors read)")
    add_command(actions, "topics", _add_topics_arguments, run=run_topics,
                summary="a bag's topics, types, counts and which can feed map build")
    add_command(actions, "query", _add_query_arguments, run=run_query,
                summary="top-k keyframes of a map for each image, verified as the node does (JSON)",
                description="Loads the map with the model's fingerprint (a map built by another model is refused), "
                            "describes the images and prints the best keyframes per image. The best "
                            "--verification-candidates of them are verified geometrically with the node's code and "
                            "settings (the map's local features and intrinsics; --calibration for the query camera) "
                            "and re-ranked by verified score; each verified candidate shows its inliers, verified "
                            "score, model and the pose the node would publish (relative pose, verified pose prior "
                            "and its case). With --descriptors "
                            "Q.npy: stored query descriptors instead of images (no model, no verification), each "
                            "query's candidates with their map row and its search time.")
    add_command(actions, "import", map_import.add_import_arguments, run=_run_import,
                summary="a map from descriptors computed elsewhere (.npy) and a geotag CSV",
                description="Streams an (N, D) descriptor .npy (checked block by block: D, dtype, unit rows) and a "
                            "geotag CSV of N rows in the same order (the columns of `map build --images`) into a new "
                            "map, builds its search index (--index auto: ivfpq_mmap from 10000 keyframes) and prints "
                            "a JSON report.")
    evaluate.register(actions)
    fleet.register(actions)


# --------------------------------------------------------------------------------------------------------- map build


def _add_build_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.maps.build_bag import BagMapConfig
    from dinomix_ros.maps.index import IndexConfig
    from dinomix_ros.maps.keyframes import StorageConfig
    from dinomix_ros.maps.sources.imagefolder import GEOTAG_SOURCES
    from dinomix_ros.maps.sources.poses import KeyframeGateConfig

    p.add_argument("out", type=Path, metavar="OUT", help="map directory to write, e.g. maps/office.dinomap")
    source = p.add_argument_group("source (exactly one)")
    one = source.add_mutually_exclusive_group(required=True)
    one.add_argument("--bag", type=Path, help="ROS 2 bag directory (mcap or sqlite3) with the images",
                     hint="for poses recorded into another bag, give that one as --pose-bag")
    one.add_argument("--images", type=Path, metavar="DIR", help="folder of geotagged images")
    bag = p.add_argument_group("bag options")
    add_bag_flags(bag)
    bag.add_argument("--pose-bag", type=Path, metavar="BAG",
                     help="bag holding --pose-topic and --gps-topic, when they were recorded apart from the images "
                          "(same clock); --bag when left out")
    bag.add_argument("--gps-topic",
                     help="sensor_msgs/NavSatFix topic that geotags keyframes with lat/lon/alt and UTM (a NavSatFix "
                          "--pose-topic is used for this when left out)")
    add_flags(bag, BagMapConfig, fields=("max_gps_gap_s",))
    add_flags(bag, KeyframeGateConfig)
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
    add_flags(out, StorageConfig)
    add_flags(out, IndexConfig, fields=("index",))
    _add_feature_flags(out)
    out.add_argument("--name", help="map name stored in its metadata (OUT's name without .dinomap when left out)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)


def _run_import(args: argparse.Namespace) -> int:
    """``dinomix map import``, with the OUT checks of ``map build``."""
    return map_import.run_import(args, check_map_out, _default_name)


def _add_feature_flags(group: argparse._ArgumentGroup) -> None:
    """Local features stored per keyframe (``--features-*``) and the cameras' calibration (``--calibration``)."""
    from dinomix_ros.imaging.features import FeatureConfig

    add_flags(group, FeatureConfig)
    group.add_argument("--calibration", action="append", type=Path, metavar="YAML",
                       help="ROS camera_info YAML of the camera (camera_calibration's ost.yaml), stored in the map for "
                            "verification with intrinsics; bag: once per --image-topic, in the same order (a bag's "
                            "own camera_info topics are used when left out); folder: once")
    group.add_argument("--extrinsic", action="append", dest="extrinsics", metavar="'FRAME: x y z roll pitch yaw'",
                       help="where a camera is on the robot, stored with its keyframes (their pose priors use it): "
                            "its optical frame in the base frame, as cameras.extrinsics takes it (m, rad; or 'FRAME: "
                            "x y z qx qy qz qw'); FRAME is the images' header.frame_id (bag) or the camera name "
                            "(folder). Once per camera; others get camera_mount's default (forward-looking, at the "
                            "base origin)")


def _feature_settings(args: argparse.Namespace) -> tuple:
    """(FeatureConfig, calibrations read from --calibration, extrinsics from --extrinsic) of a build."""
    from dinomix_ros.imaging.camera import camera_from_info_yaml
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.camera_pose import CameraMountConfig
    from dinomix_ros.localization.extrinsics import CameraExtrinsics, parse_extrinsics

    extrinsics = CameraExtrinsics(CameraMountConfig().matrix(), parse_extrinsics(args.extrinsics or []))
    return from_flags(FeatureConfig, args), [camera_from_info_yaml(p) for p in args.calibration or []], extrinsics


def _bag_calibrations(config: BagMapConfig, calibrations: list) -> dict | None:
    if not calibrations:
        return None
    if len(calibrations) != len(config.cameras):
        raise ValueError(f"--calibration was given {len(calibrations)} times for {len(config.cameras)} image topics; "
                         "give one per --image-topic, in the same order, or none (the bag's camera_info)")
    return dict(zip(config.cameras, calibrations))


def _folder_calibration(calibrations: list) -> object:
    if len(calibrations) > 1:
        raise ValueError(f"--calibration was given {len(calibrations)} times; a folder build has one camera")
    return calibrations[0] if calibrations else None


def run_build(args: argparse.Namespace) -> int:
    """``dinomix map build``: OUT and every input are checked before the model loads; the map is saved atomically."""
    from dinomix_ros.evaluation.reports import RANDOM_WEIGHTS_NOTE
    from dinomix_ros.maps.build_bag import build_map_from_bag
    from dinomix_ros.maps.build_folder import build_map_from_folder
    from dinomix_ros.maps.index import index_for_map, save_map_with_index
    from dinomix_ros.maps.index import IndexConfig
    from dinomix_ros.maps.keyframes import StorageConfig, utc_now_iso

    check_map_out(args.out, args.append)
    config, resolved = _bag_source(args) if args.bag is not None else (None, _folder_source(args))
    storage = from_flags(StorageConfig, args).storage_dtype
    index_kind = from_flags(IndexConfig, args, fields=("index",)).index
    features, calibrations, extrinsics = _feature_settings(args)  # bad calibrations fail before the model loads
    # "storage" is the key earlier builds recorded in the map's metadata: kept so that every build reads alike.
    resolved.update(out=str(args.out), append=args.append, storage=storage, index=index_kind,
                    **({"extrinsics": list(args.extrinsics)} if args.extrinsics else {}))
    _logger.info("map build: %s", json.dumps(resolved))

    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    kmap = _open_map(args, fingerprint, storage)
    if config is not None:
        kmap, report = build_map_from_bag(args.bag, encoder, config, kmap=kmap, progress=show_progress(args),
                                          pose_bag=args.pose_bag, features=features,
                                          intrinsics=_bag_calibrations(config, calibrations), extrinsics=extrinsics)
    else:
        kmap, report = build_map_from_folder(args.images, encoder, args.geotags, args.csv, kmap=kmap,
                                             camera=resolved["camera"], progress=show_progress(args),
                                             batch_size=args.batch_size, features=features,
                                             intrinsics=_folder_calibration(calibrations), extrinsics=extrinsics)
    if report.added == 0 and not args.append:
        raise ValueError(f"no keyframe was added, nothing saved ({report.summary()}); check the topics, the pose "
                         "gap and that the poses cover the images' time span")
    kmap.metadata.setdefault("builds", []).append(
        {"time": utc_now_iso(), "model": fingerprint["id"], "report": report.to_dict(), "config": resolved})
    if args.random_weights:
        kmap.metadata["note"] = RANDOM_WEIGHTS_NOTE
    save_map_with_index(kmap, args.out, index_for_map(kmap, index_kind, "cpu") if index_kind != "exact" else None)
    _logger.info("saved %s (%d keyframes)", args.out, len(kmap))
    result = {"map": str(args.out), **({"note": RANDOM_WEIGHTS_NOTE} if args.random_weights else {}),
              "keyframes": len(kmap), "frames": kmap.frames, "index": index_kind, "report": report.to_dict()}
    print(json.dumps(result, indent=2))
    return 0


def _bag_source(args: argparse.Namespace) -> tuple[BagMapConfig, dict[str, Any]]:
    """The bag build's config (topics checked against the bag: a wrong topic fails in a second) and its record."""
    from dinomix_ros.maps.build_bag import BagMapConfig, check_bag_config
    from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig

    refuse(args, {"csv": "--csv"}, "to --bag (it is a folder option)")
    pose_bag = args.pose_bag
    if args.geotags != "auto":
        raise ValueError("--geotags does not apply to --bag (it is a folder option)")
    if not args.image_topics or not args.pose_topic:
        raise ValueError(f"--bag needs --image-topic (once per camera) and --pose-topic; list the topics with "
                         f"`dinomix map topics {args.bag}`")
    config = from_flags(BagMapConfig, args, fields=("max_gps_gap_s",), image_topics=tuple(args.image_topics),
                        pose_topic=args.pose_topic, gps_topic=args.gps_topic,
                        pairing=from_flags(PosePairingConfig, args, fields=("max_gap_s",)),
                        gate=from_flags(KeyframeGateConfig, args), camera_names=tuple(args.cameras or ()))
    check_bag_config(args.bag, config, pose_bag=pose_bag)
    return config, {"bag": str(args.bag), **({"pose_bag": str(pose_bag)} if pose_bag else {}), **config.to_dict()}


def _folder_source(args: argparse.Namespace) -> dict[str, Any]:
    """The folder build's record, after checking that the folder holds images (before the model loads)."""
    from dinomix_ros.maps.sources.imagefolder import list_images

    refuse(args, {"image_topics": "--image-topic", "pose_topic": "--pose-topic", "gps_topic": "--gps-topic",
                  "pose_bag": "--pose-bag"}, "to --images (they are bag options)")
    if args.cameras and len(args.cameras) > 1:
        raise ValueError(f"--camera was given {len(args.cameras)} times; a folder build names one camera")
    list_images(args.images)
    return {"images": str(args.images), "geotags": args.geotags, "csv": None if args.csv is None else str(args.csv),
            "camera": (args.cameras or ["images"])[0]}


def _check_build_early(raw: list[str]) -> None:
    """OUT, when it comes first (``map build OUT ...``, as documented): anywhere else it is checked after parsing."""
    if raw and not raw[0].startswith("-"):
        check_map_out(Path(raw[0]), "--append" in raw)


def _open_map(args: argparse.Namespace, fingerprint: dict[str, Any], storage: str) -> KeyframeMap:
    """The map to add to: OUT's (same model required) with --append, else a new empty one named by --name or OUT."""
    from dinomix_ros.maps.keyframes import KeyframeMap
    from dinomix_ros.maps.loading import load_map

    if args.append:
        kmap = load_map(args.out, expected_fingerprint=fingerprint)
        if kmap.storage_dtype != storage:
            _logger.info("--storage-dtype %s ignored: the map stores %s", storage, kmap.storage_dtype)
    else:
        kmap = KeyframeMap.empty(fingerprint, storage_dtype=storage,
                                 metadata={"name": args.name or _default_name(args.out)})
    if args.name:
        kmap.metadata["name"] = args.name
    return kmap


def _default_name(out: Path) -> str:
    name = out.name
    return name[: -len(".dinomap")] if name.endswith(".dinomap") and len(name) > len(".dinomap") else name


# ------------------------------------------------------------------------------------------------ map info / topics


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("map", type=Path, metavar="MAP", help="map directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_info(args: argparse.Namespace) -> int:
    """``dinomix map info``: the manifest, summarised (as text or JSON)."""
    from dinomix_ros.maps.manifest import read_manifest

    info = _map_info(args.map, read_manifest(args.map))
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    model = info["model"]
    cal = info["calibration"]
    index = info["index"]
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
         f"{index['kind']} over {index['rows']} rows ({'fresh' if index['fresh'] else 'stale, rebuilt'})"),
        ("calibration", "none" if not cal else
         f"min_similarity {cal.get('min_similarity')} at precision {cal.get('target_precision')} "
         f"({cal.get('setup')}, {cal.get('evaluated')})"),
    ]
    if "note" in info["metadata"]:
        lines.append(("note", str(info["metadata"]["note"])))
    local = info["local_features"]
    lines.append(("features", "none (geometric verification off for this map)" if local is None else
                  f"{local['type']}, {local['slots']} per keyframe, {local['bytes'] / 2**20:.2f} MiB; intrinsics: "
                  f"{', '.join(local['intrinsics']) or 'none'}"))
    if local is not None:
        lines.append(("extrinsics", "; ".join(
            f"{name}: frame {rec['frame_id'] or '(none)'}, {rec['width']}x{rec['height']}, at "
            f"({', '.join(f'{v:.3f}' for v in rec['xyz'])}) m in the base frame"
            for name, rec in local["cameras"].items()) or "none recorded (pose priors use camera_mount.*)"))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in lines))
    return 0


def _map_info(path: Path, m: dict[str, Any]) -> dict[str, Any]:
    """What ``map info --json`` prints, from the manifest ``m`` of the map at ``path``."""
    files = m["files"]
    records = [files["keyframes"], *files["descriptors"]] + ([files["index"]] if files["index"] else [])
    index = files["index"]
    metadata = dict(m["metadata"])
    return {
        "map": str(path),
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
        "local_features": _local_features_info(m),
    }


def _local_features_info(m: dict[str, Any]) -> dict[str, Any] | None:
    """The map's local features (format 2): type, slots, bytes on disk, cameras with intrinsics, camera records
    (frame, image size, position of the camera in the base frame); None without."""
    entry = m.get("local_features")
    if entry is None:
        return None
    chunks = m["files"].get("features") or []
    cameras = {name: {"frame_id": rec["frame_id"], "width": rec["width"], "height": rec["height"],
                      "xyz": [rec["T_base_cam"][3], rec["T_base_cam"][7], rec["T_base_cam"][11]],
                      "T_base_cam": rec["T_base_cam"]}
               for name, rec in sorted(entry.get("cameras", {}).items())}
    return {"type": entry["type"], "slots": entry["slots"], "bytes": sum(int(r["bytes"]) for r in chunks),
            "intrinsics": sorted(entry["intrinsics"]), "cameras": cameras}


def _add_topics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", type=Path, metavar="BAG", help="ROS 2 bag directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_topics(args: argparse.Namespace) -> int:
    """``dinomix map topics``: what each topic can be used for."""
    from dinomix_ros.maps.sources.bags import NAVSATFIX_TYPE
    from dinomix_ros.maps.sources.bags import IMAGE_TYPES, POSE_TYPES, bag_topics

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


# --------------------------------------------------------------------------------------------------------- map query


def _add_query_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.maps.index import IndexConfig

    p.add_argument("map", type=Path, metavar="MAP", help="map directory")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="query images and/or folders of images")
    add_flags(p, MatcherConfig, fields=("top_k",))
    add_flags(p, IndexConfig, fields=("index",))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_verification_flags(p)
    map_import.add_descriptor_query_arguments(p)
    add_model_flags(p, required=False)


def run_query(args: argparse.Namespace) -> int:
    """``dinomix map query``: top-k keyframes per image, with the map's calibrated threshold when it has one."""
    from dinomix_ros.evaluation.reports import RANDOM_WEIGHTS_NOTE, json_ready
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.loading import load_map

    if args.descriptors is not None:
        return map_import.run_descriptor_query(args, _candidate)
    if not args.images:
        raise ValueError("map query needs query IMAGEs (with --checkpoint W or --random-weights), or --descriptors "
                         "Q.npy")
    if args.checkpoint is None and not args.random_weights:
        raise ValueError("map query IMAGE... needs the model that built the map: --checkpoint W (or "
                         "--random-weights)")
    top_k = from_flags(MatcherConfig, args, fields=("top_k",)).top_k
    paths = expand_images([Path(p) for p in args.images])
    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    kmap = load_map(args.map, expected_fingerprint=fingerprint)
    if len(kmap) == 0:
        raise ValueError(f"the map at {args.map} has no keyframes; build it first (`dinomix map build`)")
    index = index_for_map(kmap, args.index, exact_search_device(args.device))
    kind = index.kind
    verifier, verification = QueryVerifier.from_args(args, kmap, index, top_k)
    desc = encoder.describe(paths, progress=show_progress(args), skip_errors=True, desc="query")
    ok = np.isfinite(desc).all(axis=1)
    D = np.full((len(paths), top_k), -np.inf, np.float32)
    I = np.full((len(paths), top_k), -1, np.int64)
    if ok.any():
        D[ok], I[ok] = index.search(desc[ok], top_k)
    threshold = (kmap.metadata.get("calibration") or {}).get("min_similarity")
    queries = []
    for q, path in enumerate(paths):
        entry: dict[str, Any] = {"image": str(path)}
        if not ok[q]:
            entry["error"] = "the image could not be read"
        elif verifier is None:
            entry["candidates"] = [_candidate(kmap, rank, float(D[q, rank]), int(I[q, rank]), threshold)
                                   for rank in range(top_k) if I[q, rank] >= 0]
        else:
            entry["candidates"] = _verified_candidates(verifier, kmap, path, desc[q], threshold)
        queries.append(entry)
    result: dict[str, Any] = {"map": str(args.map), "model": fingerprint["id"],
                              **({"note": RANDOM_WEIGHTS_NOTE} if args.random_weights else {}),
                              "keyframes": len(kmap), "index": kind, "min_similarity": threshold,
                              "verification": verification, "queries": queries}
    print(json.dumps(json_ready(result), indent=2, ensure_ascii=False))
    return 0


def _verified_candidates(verifier: QueryVerifier, kmap: KeyframeMap, path: Path, descriptor: np.ndarray,
                         threshold: float | None) -> list[dict[str, Any]]:
    """One image's candidates verified and re-ranked as the node does (``rank``: the new order; ``similarity_rank``:
    the order by similarity)."""
    cands, checks = verifier.verify(path, descriptor)
    return [{**_candidate(kmap, rank, cand.similarity, cand.row, threshold), "similarity_rank": cand.rank,
             **verifier.describe(cands, checks, rank)} for rank, cand in enumerate(cands)]


def _candidate(kmap: KeyframeMap, rank: int, similarity: float, row: int, threshold: float | None) -> dict[str, Any]:
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
