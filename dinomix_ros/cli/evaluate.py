"""``dinomix map eval``: the flags of the three evaluation setups, over :mod:`dinomix_ros.evaluation.runs` and the
setups' modules (:mod:`~dinomix_ros.evaluation.runs_folders`, :mod:`~dinomix_ros.evaluation.runs_bag`,
:mod:`~dinomix_ros.evaluation.runs_loop_closure`).

Recall@N, precision/recall of the best match and the similarity threshold reaching a target precision, for (a) two
folders, positives from geotags or from an index ground truth (the standard VPR layout), (b) a map against a bag, or
(c) loop closure against RTAB-Map ground truth; and the same queries with geometric verification (``report.json``'s
``verification``, ``pr_verified.png``). Writes ``report.json`` and PNG plots into one run folder; ``--calibrate MAP``
stores the threshold in the map's ``metadata["calibration"]`` for the live node, when enough correct matches support
it (``--min-positives``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from dinomix_ros.cli.common import (
    add_bag_flags,
    add_command,
    add_model_flags,
    exact_search_device,
    make_encoder,
    option_value,
    refuse,
    show_progress,
)
from dinomix_ros.settings import add_flags, from_flags

if TYPE_CHECKING:  # imported where used: maps.build_bag imports torch
    from dinomix_ros.maps.build_bag import BagMapConfig

__all__ = ["register"]

_logger = logging.getLogger("dinomix.map")

#: Default of ``--exclude-recent-count`` in loop-closure evaluation (the node's ``matching.exclude_recent_count``
#: defaults to 0): the frames just before a query are the robot's own recent views, always similar, never loops.
EVAL_EXCLUDE_RECENT_COUNT = 10
_FOLDER_FLAGS = {"queries": "--queries", "database_csv": "--database-csv", "queries_csv": "--queries-csv",
                 "ground_truth": "--ground-truth"}
_POSITION_FLAGS = {"database_csv": "--database-csv", "queries_csv": "--queries-csv", "radius_m": "--radius-m"}
_BAG_FLAGS = {"bag": "--bag", "image_topics": "--image-topic", "pose_topic": "--pose-topic",
              "gate_queries": "--gate-queries"}
_LOOP_FLAGS = {"loop_gt": "--loop-gt"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``dinomix map`` actions."""
    add_command(
        sub, "eval", _add_arguments, run=run, check_early=_check_early,
        summary="Recall@N, precision/recall and threshold calibration",
        description="(a) --database DIR --queries DIR: geotagged folders; positives are database images within "
                    "--radius-m of the query (UTM or x/y metres); or, with --ground-truth FILE, the standard VPR "
                    "layout: positives are listed by index (images numbered from 0 in natural file order). "
                    "(b) --map MAP --bag BAG --image-topic T "
                    "--pose-topic P: bag images as queries, positives are keyframes within --radius-m in the same "
                    "frame. (c) --images DIR --loop-gt GT.bmp: causal loop closure against RTAB-Map ground truth. "
                    "Writes report.json and PNG plots into --out and prints a JSON summary; the precision/recall "
                    "curve is over each query's best match, and --target-precision picks the lowest threshold "
                    "reaching it (stored into a map's metadata with --calibrate).")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.evaluation.calibration import CalibrationConfig
    from dinomix_ros.evaluation.retrieval import DEFAULT_RADIUS_M
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.maps.sources.imagefolder import GEOTAG_SOURCES
    from dinomix_ros.maps.sources.poses import KeyframeGateConfig

    setup = p.add_argument_group("setup (exactly one of --database, --map, --images)")
    one = setup.add_mutually_exclusive_group(required=True)
    one.add_argument("--database", type=Path, metavar="DIR", help="(a) geotagged database folder; needs --queries")
    one.add_argument("--map", type=Path, help="(b) map to evaluate; needs --bag, --image-topic and --pose-topic")
    one.add_argument("--images", type=Path, metavar="DIR",
                     help="(c) image sequence (natural order) for loop closure; needs --loop-gt")
    a = p.add_argument_group("(a) folders")
    a.add_argument("--queries", type=Path, metavar="DIR", help="query folder (geotagged, or see --ground-truth)")
    a.add_argument("--ground-truth", type=Path, metavar="FILE",
                   help="index ground truth instead of geotags: .json or .csv with one list of database indices per "
                        "query (e.g. [[0, 3], [], [7]]; CSV: one line per query), or a .npy Q x R matrix (nonzero: "
                        "positive; never a pickle); images are numbered from 0 in natural file order")
    a.add_argument("--geotags", default="auto", choices=GEOTAG_SOURCES, help="geotag source of both folders")
    a.add_argument("--database-csv", type=Path, metavar="FILE", help="geotag CSV of the database folder")
    a.add_argument("--queries-csv", type=Path, metavar="FILE", help="geotag CSV of the query folder")
    b = p.add_argument_group("(b) map and bag")
    b.add_argument("--bag", type=Path, help="ROS 2 bag with the query images and their poses")
    add_bag_flags(b)
    b.add_argument("--gate-queries", action="store_true",
                   help="query only the frames the keyframe gate (the flags below) would keep, not every frame")
    add_flags(b, KeyframeGateConfig)
    c = p.add_argument_group("(c) loop closure")
    c.add_argument("--loop-gt", type=Path, metavar="GT.bmp",
                   help="N x N ground-truth image (rtabmap-console -gt format), N = number of images")
    add_flags(c, MatcherConfig, fields=("exclude_recent_count",), exclude_recent_count=EVAL_EXCLUDE_RECENT_COUNT)
    _add_verification_flags(p.add_argument_group(
        "geometric verification of the same queries (all setups; (b) uses the features the map stores)"))
    common = p.add_argument_group("output and calibration")
    common.add_argument("--out", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                        help="run folder for report.json and the plots (default: runs/eval-<UTC time>)")
    common.add_argument("--radius-m", type=float,
                        help="(a with geotags, b) a database entry within this distance of the query is a correct "
                             f"match (default: {DEFAULT_RADIUS_M:g})")
    common.add_argument("--target-precision", type=float, default=0.95,
                        help="precision the calibrated min_similarity must reach")
    common.add_argument("--calibrate", type=Path, metavar="MAP",
                        help="store min_similarity, the target precision and the summary in this map's "
                             "metadata['calibration'] (it must have been built by the same model)")
    add_flags(common, CalibrationConfig)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_flags(p)


def _check_early(raw: list[str]) -> None:
    from dinomix_ros.util.files import check_output_dir

    out = option_value(raw, "--out")
    if out is not None:
        check_output_dir(Path(out), what="--out")


def run(args: argparse.Namespace) -> int:
    """``dinomix map eval``: check flags, outputs and inputs, load the model, run the setup, write the run folder."""
    from dinomix_ros.evaluation import calibration, reports, runs, runs_bag, runs_folders, runs_loop_closure
    from dinomix_ros.evaluation.retrieval import DEFAULT_RADIUS_M
    from dinomix_ros.util.files import check_output_dir

    setup = "folders" if args.database is not None else "bag" if args.map is not None else "loop_closure"
    exclude_recent = _check_flags(args, setup)
    cal_config = from_flags(calibration.CalibrationConfig, args)
    radius_m = DEFAULT_RADIUS_M if args.radius_m is None else args.radius_m
    out: Path = getattr(args, "out", None) or Path("runs") / f"eval-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    check_output_dir(out, what="--out")
    if args.calibrate is not None:
        calibration.check_calibration_target(args.calibrate)
        check_output_dir(args.calibrate, what="--calibrate")
    bag_config = _bag_config(args) if setup == "bag" else None
    # Missing files, topics or a ground-truth size mismatch fail before the model loads.
    if setup == "folders" and args.ground_truth is not None:
        runs_folders.check_ground_truth_inputs(args.database, args.queries, args.ground_truth)
    elif setup == "folders":
        runs_folders.check_folder_inputs(args.database, args.queries)
    elif setup == "bag":
        runs_bag.check_bag_inputs(args.map, args.bag, bag_config)
    else:
        runs_loop_closure.check_loop_closure_inputs(args.images, args.loop_gt)
    _logger.info("map eval (%s): out=%s radius_m=%s target_precision=%s calibrate=%s", setup, out, radius_m,
                 args.target_precision, args.calibrate)
    encoder = make_encoder(args)
    fingerprint = encoder.fingerprint.to_dict()
    if args.calibrate is not None:
        calibration.check_same_model(args.calibrate, fingerprint)

    progress, search_device = show_progress(args), exact_search_device(args.device)
    if setup == "folders" and args.ground_truth is not None:
        result = runs_folders.evaluate_folders_ground_truth(encoder, args.database, args.queries, args.ground_truth,
                                                            search_device=search_device, progress=progress,
                                                            **_verification_settings(args))
    elif setup == "folders":
        result = runs_folders.evaluate_folders(encoder, args.database, args.queries, geotags=args.geotags,
                                               database_csv=args.database_csv, queries_csv=args.queries_csv,
                                               radius_m=radius_m, search_device=search_device, progress=progress,
                                               **_verification_settings(args))
    elif setup == "bag":
        settings = _verification_settings(args)
        del settings["features"]  # the map's own
        result = runs_bag.evaluate_map_against_bag(encoder, args.map, args.bag, bag_config,
                                                   gate_queries=args.gate_queries, radius_m=radius_m,
                                                   search_device=search_device, progress=progress, **settings)
    else:
        result = runs_loop_closure.evaluate_loop_closure(encoder, args.images, args.loop_gt,
                                                         exclude_recent=exclude_recent,
                                                         target_precision=args.target_precision, progress=progress,
                                                         **_verification_settings(args))
    report = runs.save_run(result, out, model=fingerprint, target_precision=args.target_precision,
                           random_weights=args.random_weights, calibrate=args.calibrate, calibration=cal_config)
    print(json.dumps(reports.summarize(report, out / reports.REPORT_FILE), indent=2))
    if args.calibrate is not None:
        calibration.require_calibration(report, args.calibrate, cal_config)
    return 0


def _check_flags(args: argparse.Namespace, setup: str) -> int:
    """Refuse flags of another setup and values out of range; returns the loop closure's exclude-recent count."""
    from dinomix_ros.localization.matching import MatcherConfig

    if setup == "folders":
        if args.queries is None:
            raise ValueError("--database needs --queries (a folder of query images)")
        refuse(args, {**_BAG_FLAGS, **_LOOP_FLAGS}, "to --database/--queries (setup a)")
        if args.ground_truth is not None:
            refuse(args, _POSITION_FLAGS, "to --ground-truth (positives come from the file, not from positions)")
            if args.geotags != "auto":
                raise ValueError("--geotags does not apply to --ground-truth (positives come from the file, not "
                                 "from positions)")
    elif setup == "bag":
        if args.bag is None or not args.image_topics or not args.pose_topic:
            raise ValueError("--map needs --bag, --image-topic and --pose-topic (the query images and their poses)")
        refuse(args, {**_FOLDER_FLAGS, **_LOOP_FLAGS}, "to --map/--bag (setup b)")
    else:
        if args.loop_gt is None:
            raise ValueError("--images needs --loop-gt (the N x N ground-truth image, rtabmap-console -gt format)")
        refuse(args, {**_FOLDER_FLAGS, **_BAG_FLAGS, "radius_m": "--radius-m"}, "to --images/--loop-gt (setup c)")
    if args.radius_m is not None and not (math.isfinite(args.radius_m) and args.radius_m > 0):
        raise ValueError(f"--radius-m is {args.radius_m}; expected a positive distance in metres")
    if not 0.0 < args.target_precision <= 1.0:
        raise ValueError(f"--target-precision is {args.target_precision}; expected a value in (0, 1], e.g. 0.95")
    return from_flags(MatcherConfig, args, fields=("exclude_recent_count",)).exclude_recent_count


def _add_verification_flags(group: argparse._ArgumentGroup) -> None:
    """Geometric verification of the same queries (``--verification-*``, ``--features-*``) and the similarity
    threshold both accept rules use (``--min-similarity``)."""
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.localization.verification import VerificationConfig

    add_flags(group, MatcherConfig, fields=("min_similarity",))
    add_flags(group, VerificationConfig)
    add_flags(group, FeatureConfig, fields=("type", "max_features", "max_image_side"))


def _verification_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments of the evaluation setups for verification (verification, features, min_similarity)."""
    from dinomix_ros.imaging.features import FeatureConfig
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.localization.verification import VerificationConfig

    return {"verification": from_flags(VerificationConfig, args), "features": from_flags(FeatureConfig, args),
            "min_similarity": from_flags(MatcherConfig, args, fields=("min_similarity",)).min_similarity}


def _bag_config(args: argparse.Namespace) -> BagMapConfig:
    """Setup (b)'s BagMapConfig: topics, pose pairing and the keyframe gate (used with --gate-queries)."""
    from dinomix_ros.maps.build_bag import BagMapConfig
    from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig

    return BagMapConfig(image_topics=tuple(args.image_topics), pose_topic=args.pose_topic, gps_topic="",
                        pairing=from_flags(PosePairingConfig, args, fields=("max_gap_s",)),
                        gate=from_flags(KeyframeGateConfig, args))
