"""``dinomix map push`` and ``dinomix map pull``: a local map and the fleet's shared map in Milvus.

* ``map push MAP --fleet URI``: the keyframes of MAP the fleet has not got (its ledger ``MAP.fleet.json`` says which;
  keyframes pulled from the fleet are never pushed back), in batches; prints the JSON report.
* ``map pull OUT --fleet URI (--near x,y[,frame] | --gps lat,lon) --radius R | --all``: the fleet's keyframes of a
  region into a new map OUT (or added to it with ``--append``); the model flags name the model, whose collection is
  read. Prints the JSON report.

A fleet that cannot be reached, a collection of another model and every other failure end the command with one line
and exit code 2 (what was pushed before stays recorded in the ledger).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from dinomix_ros.cli.common import add_command, add_model_flags, check_map_out
from dinomix_ros.settings import add_flags, from_flags, spec_of

__all__ = ["register"]

_logger = logging.getLogger("dinomix.map")

_CONNECTION = ("collection", "robot", "token_env", "batch_rows", "timeout_s", "index_type", "index_params")


def register(actions: argparse._SubParsersAction) -> None:
    """Add ``push`` and ``pull`` to the ``map`` actions."""
    add_command(actions, "push", _add_push_arguments, run=run_push,
                summary="push a map's new keyframes to the fleet's map (Milvus)",
                description="Pushes the keyframes of MAP that the fleet has not got (the ledger MAP.fleet.json "
                            "records what was pushed; keyframes pulled from the fleet are never pushed back) into "
                            "the collection of MAP's model, creating it if missing, and prints the report as JSON.")
    add_command(actions, "pull", _add_pull_arguments, run=run_pull, check_early=_check_pull_early,
                summary="pull a region of the fleet's map (Milvus) into a local map",
                description="Reads the fleet's keyframes within --radius of --near (a position in a frame) or --gps "
                            "(a fix), or --all, from the collection of the model the model flags name, into a new "
                            "map OUT (--append: into the map OUT, skipping keyframes it holds); prints the report as "
                            "JSON.")


def _add_fleet_flags(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.maps.fleet.config import FleetConfig

    group = p.add_argument_group("fleet")
    group.add_argument("--fleet", required=True, metavar="URI", help=spec_of(FleetConfig, "uri").description)
    add_flags(group, FleetConfig, fields=_CONNECTION)


def _fleet_config(args: argparse.Namespace, *more_fields: str) -> Any:
    from dinomix_ros.maps.fleet.config import FleetConfig

    if not args.fleet:
        raise ValueError("--fleet is empty: give the Milvus URI (http://host:19530) or a Milvus Lite .db file")
    return from_flags(FleetConfig, args, fields=_CONNECTION + more_fields, uri=args.fleet)


def _add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("map", type=Path, metavar="MAP", help="map directory")
    _add_fleet_flags(p)


def run_push(args: argparse.Namespace) -> int:
    """``dinomix map push``: load MAP, push its backlog, print the report."""
    from dinomix_ros.maps.fleet.config import robot_id
    from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
    from dinomix_ros.maps.fleet.records import map_uid
    from dinomix_ros.maps.fleet.store import FleetError, FleetStore
    from dinomix_ros.maps.loading import load_map

    config = _fleet_config(args)
    kmap = load_map(args.map)
    robot = robot_id(config)
    store = FleetStore(config, kmap.fingerprint)
    try:
        report = push_backlog(store, kmap, PushLedger.for_map(args.map), robot)
    except FleetError as exc:
        raise ValueError(str(exc)) from None
    finally:
        store.close()
    if report.error is not None:
        raise ValueError(f"push of {args.map} to {store.where}: {report.summary()}; run the push again to send "
                         "the rest (the ledger keeps what was sent)")
    print(json.dumps({"map": str(args.map), "fleet": store.where, "robot": robot, "map_uid": map_uid(kmap),
                      "keyframes": len(kmap), **report.to_dict()}, indent=2))
    return 0


def _add_pull_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.maps.keyframes import StorageConfig

    p.add_argument("out", type=Path, metavar="OUT", help="map directory to write, e.g. maps/site.dinomap")
    region = p.add_argument_group("region (exactly one of --near, --gps, --all)")
    one = region.add_mutually_exclusive_group(required=True)
    one.add_argument("--near", metavar="X,Y[,FRAME]", help="centre position (metres) in FRAME ('map' when left out)")
    one.add_argument("--gps", metavar="LAT,LON", help="centre GPS fix (degrees)")
    one.add_argument("--all", action="store_true", help="every keyframe of the collection (up to the maximum)")
    region.add_argument("--radius", type=float, metavar="M",
                        help="radius in metres (horizontal for --near, great-circle for --gps); needed with them")
    _add_fleet_flags(p)
    from dinomix_ros.maps.fleet.config import FleetConfig

    add_flags(p.add_argument_group("pull"), FleetConfig, fields=("pull_max_keyframes",))
    out = p.add_argument_group("map options")
    out.add_argument("--append", action="store_true", help="add to the existing map OUT (same model)")
    add_flags(out, StorageConfig)
    out.add_argument("--name", help="map name stored in its metadata (OUT's name when left out)")
    add_model_flags(p)


def _check_pull_early(raw: list[str]) -> None:
    if raw and not raw[0].startswith("-"):
        check_map_out(Path(raw[0]), "--append" in raw)


def _region(args: argparse.Namespace) -> Any:
    from dinomix_ros.maps.fleet.region import Region, parse_center

    if args.all:
        if args.radius is not None:
            raise ValueError("--radius does not apply to --all")
        return Region.everything()
    if args.radius is None or not args.radius > 0:
        raise ValueError(f"{'--near' if args.near else '--gps'} needs --radius M (metres, > 0)")
    return parse_center(args.near if args.near else f"gps:{args.gps}", args.radius)


def run_pull(args: argparse.Namespace) -> int:
    """``dinomix map pull``: OUT and the region are checked before the model loads; the map is saved atomically."""
    from dinomix_ros.maps.fleet.config import robot_id
    from dinomix_ros.maps.fleet.records import map_uid
    from dinomix_ros.maps.fleet.store import FleetError, FleetStore
    from dinomix_ros.maps.index import save_map
    from dinomix_ros.maps.keyframes import KeyframeMap, StorageConfig
    from dinomix_ros.maps.loading import load_map
    from dinomix_ros.model.checkpoint import ModelSource

    check_map_out(args.out, args.append)
    region = _region(args)
    config = _fleet_config(args, "pull_max_keyframes")
    source = from_flags(ModelSource, args, checkpoint="" if args.checkpoint is None else str(args.checkpoint))
    fingerprint = source.load().fingerprint.to_dict()
    if args.append:
        kmap = load_map(args.out, expected_fingerprint=fingerprint)
    else:
        kmap = KeyframeMap.empty(fingerprint, storage_dtype=from_flags(StorageConfig, args).storage_dtype,
                                 metadata={"name": args.name or args.out.name.removesuffix(".dinomap") or "fleet"})
    robot = robot_id(config)
    store = FleetStore(config, fingerprint)
    try:
        pulled = store.pull(region, config.pull_max_keyframes, robot,
                            exclude=(robot, map_uid(kmap)) if args.append else None)
    except FleetError as exc:
        raise ValueError(str(exc)) from None
    finally:
        store.close()
    added = pulled.add_to(kmap, enable_features=True)
    if len(added.ids) == 0 and not args.append:
        raise ValueError(f"no keyframe of {store.where} lies in {region.describe()}: nothing saved")
    for line in added.refused:
        _logger.warning("pull: %s", line)
    if args.name:
        kmap.metadata["name"] = args.name
    kmap.metadata.setdefault("fleet_pulls", []).append(
        {"fleet": store.where, "region": region.describe(), "added": len(added.ids)})
    save_map(kmap, args.out)
    print(json.dumps({"map": str(args.out), "fleet": store.where, "region": region.describe(),
                      "added": len(added.ids), "present": added.present, "refused": len(added.refused),
                      "keyframes": len(kmap), "frames": kmap.frames}, indent=2))
    return 0
