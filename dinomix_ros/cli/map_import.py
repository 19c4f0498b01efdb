"""``dinomix map import`` (a map from descriptors computed elsewhere) and ``dinomix map query MAP --descriptors Q.npy``
(search a map with stored descriptors, no model).

Both read ``.npy`` descriptor files memory-mapped and in blocks (:mod:`dinomix_ros.maps.build_import`), and take the
model that computed them from ``--fingerprint`` (a fingerprint JSON, a ``dinomix describe`` sidecar or a map's
``manifest.json``, as a file or inline; for a query also the bare id ``dmx-...``), ``--fingerprint-of CHECKPOINT``
(loads the weights to fingerprint them), or else the ``.npy``'s own ``dinomix describe`` sidecar (``Q.npy.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinomix_ros.cli.common import show_progress
from dinomix_ros.settings import add_flags, from_flags

__all__ = ["add_descriptor_query_arguments", "add_import_arguments", "fingerprint_from", "run_descriptor_query",
           "run_import"]

_logger = logging.getLogger("dinomix.map")


def add_fingerprint_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, query: bool) -> None:
    also_id = ", or its id dmx-..." if query else ""
    p.add_argument("--fingerprint", metavar="JSON" + ("|ID" if query else ""),
                   help="the model that computed the descriptors: a fingerprint (JSON text or file; a `dinomix "
                        f"describe` sidecar or a map's manifest.json also work){also_id}; default: the .npy's sidecar "
                        "NAME.npy.json written by `dinomix describe`")
    p.add_argument("--fingerprint-of", type=Path, metavar="CHECKPOINT",
                   help="fingerprint the model in this weights file instead (.ckpt, .pth, .safetensors; loads it)")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.maps.index import IndexConfig
    from dinomix_ros.maps.keyframes import StorageConfig

    p.add_argument("out", type=Path, metavar="OUT", help="map directory to create, e.g. maps/city.dinomap")
    p.add_argument("--descriptors", type=Path, required=True, metavar="D.npy",
                   help="(N, D) float32 or float16 L2-normalised descriptors, one row per image (read in blocks)")
    p.add_argument("--csv", type=Path, required=True, metavar="GEOTAGS.csv",
                   help="geotag CSV with N data rows in the .npy's row order: an image column plus lat/lon[/alt], "
                        "x/y[/yaw] and/or UTM columns (as for `map build --images`)")
    add_fingerprint_flags(p, query=False)
    p.add_argument("--camera", default="images", metavar="NAME", help="camera name of the keyframes")
    p.add_argument("--name", help="map name stored in its metadata (OUT's name without .dinomap when left out)")
    add_flags(p, StorageConfig)
    add_flags(p, IndexConfig, fields=("index",))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_descriptor_query_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("stored query descriptors (instead of images and a model)")
    group.add_argument("--descriptors", type=Path, metavar="Q.npy",
                       help="(Q, D) float32/float16 query descriptors: prints each query's candidates with their map "
                            "row and its search time (search_ms); a NaN row (an image `describe --skip-errors` could "
                            "not read) gets an error entry")
    add_fingerprint_flags(group, query=True)


def fingerprint_from(args: argparse.Namespace, npy: Path, *, id_ok: bool) -> dict[str, Any] | str:
    """The fingerprint of the model that computed ``npy`` (a dict; with ``id_ok`` maybe only its id, a str).

    Raises:
        ValueError: none given and no sidecar, or a text that is no fingerprint.
    """
    from dinomix_ros.model.checkpoint import CheckpointError, ModelFingerprint

    text, where = args.fingerprint, "--fingerprint"
    if args.fingerprint_of is not None:
        if text is not None:
            raise ValueError("give --fingerprint or --fingerprint-of, not both")
        from dinomix_ros.model.checkpoint import ModelSource

        return ModelSource(checkpoint=str(args.fingerprint_of)).load().fingerprint.to_dict()
    if text is None:
        sidecar = npy.with_name(npy.name + ".json")
        if not sidecar.is_file():
            raise ValueError(f"which model computed {npy}? give --fingerprint (JSON, or a map's manifest.json), "
                             f"--fingerprint-of CHECKPOINT, or put `dinomix describe`'s sidecar at {sidecar}")
        text, where = str(sidecar), str(sidecar)
    if id_ok and text.startswith("dmx-") and "{" not in text:
        return text
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {text[:80]!r} is neither fingerprint JSON nor a readable JSON file "
                         f"({exc})") from None
    for key in ("fingerprint", "model"):  # a manifest / map info, a describe sidecar
        if isinstance(data, dict) and isinstance(data.get(key), dict) and "architecture" not in data:
            data = data[key]
    if isinstance(data, dict) and isinstance(data.get("fingerprint"), dict):
        data = data["fingerprint"]
    try:
        return ModelFingerprint.from_dict(data if isinstance(data, dict) else {}).to_dict()
    except CheckpointError as exc:
        raise ValueError(f"{where}: not a model fingerprint ({exc})") from None


def run_import(args: argparse.Namespace, check_out: Callable[[Path, bool], None],
               default_name: Callable[[Path], str]) -> int:
    """``dinomix map import``: check the inputs, write the map, build and save its index, print a JSON report.

    ``check_out`` and ``default_name`` are ``map build``'s checks of OUT and its default map name.
    """
    from dinomix_ros.maps.build_import import import_descriptors
    from dinomix_ros.maps.index import IndexConfig, index_for_map, save_map_with_index
    from dinomix_ros.maps.keyframes import StorageConfig
    from dinomix_ros.util.progress import progress_bar

    check_out(args.out, False)
    fingerprint = fingerprint_from(args, args.descriptors, id_ok=False)
    storage = from_flags(StorageConfig, args).storage_dtype
    kind = from_flags(IndexConfig, args, fields=("index",)).index
    bars: dict[str, list] = {}  # stage -> [bar, rows done]

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = [progress_bar(total, f"import: {stage}", show_progress(args), unit="row"), 0]
        bars[stage][0].update(done - bars[stage][1])
        bars[stage][1] = done

    t0 = time.perf_counter()
    try:
        kmap, report = import_descriptors(args.out, args.descriptors, args.csv, fingerprint, storage_dtype=storage,
                                          camera=args.camera, progress=progress,
                                          metadata={"name": args.name or default_name(args.out),
                                                    "source": f"import:{args.descriptors}"})
    finally:
        for bar, _ in bars.values():
            bar.close()
    t1 = time.perf_counter()
    index = index_for_map(kmap, kind, "cpu")
    save_map_with_index(kmap, args.out, index)
    print(json.dumps({"map": str(args.out), "keyframes": len(kmap), "model": fingerprint["id"],
                      "storage_dtype": kmap.storage_dtype, "index": index.kind, "report": report.to_dict(),
                      "index_s": round(time.perf_counter() - t1, 3), "seconds": round(time.perf_counter() - t0, 3)},
                     indent=2))
    return 0


def run_descriptor_query(args: argparse.Namespace, candidate: Callable[..., dict[str, Any]]) -> int:
    """``dinomix map query MAP --descriptors Q.npy``: top-k candidates per stored query descriptor, with timings.

    ``candidate(kmap, rank, similarity, row, threshold)`` is ``map query``'s JSON of one candidate.
    """
    from dinomix_ros.evaluation.reports import json_ready
    from dinomix_ros.localization.matching import MatcherConfig
    from dinomix_ros.maps.build_import import open_descriptors
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.loading import load_map
    from dinomix_ros.maps.manifest import read_manifest
    from dinomix_ros.maps.validation import NORM_TOLERANCE

    if args.images:
        raise ValueError("give query IMAGEs or --descriptors Q.npy, not both")
    top_k = from_flags(MatcherConfig, args, fields=("top_k",)).top_k
    manifest = read_manifest(args.map)
    fingerprint = fingerprint_from(args, args.descriptors, id_ok=True)
    queries = open_descriptors(args.descriptors, manifest["descriptor_dim"])
    fp_id = fingerprint if isinstance(fingerprint, str) else fingerprint["id"]
    t0 = time.perf_counter()
    kmap = load_map(args.map, expected_fingerprint={"id": fp_id}, verify="background")
    if len(kmap) == 0:
        raise ValueError(f"the map at {args.map} has no keyframes")
    index = index_for_map(kmap, args.index, "cpu")
    ready_s = time.perf_counter() - t0
    threshold = (kmap.metadata.get("calibration") or {}).get("min_similarity")
    entries = []
    for start in range(0, queries.shape[0], 4096):  # the file is read in blocks
        block = np.asarray(queries[start:start + 4096], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        for j, q in enumerate(block):
            entry: dict[str, Any] = {"query": start + j}
            if not np.isfinite(q).all():
                entry["error"] = "no descriptor (a NaN row: the image could not be described)"
            elif abs(norms[j] - 1.0) > NORM_TOLERANCE:
                raise ValueError(f"--descriptors {args.descriptors} row {start + j} has L2 norm {norms[j]:.4g}, "
                                 f"expected 1 +- {NORM_TOLERANCE}: query with L2-normalised descriptors")
            else:
                t = time.perf_counter()
                D, I = index.search(q, top_k)  # noqa: E741
                entry["search_ms"] = round((time.perf_counter() - t) * 1e3, 3)
                entry["candidates"] = [{"row": int(I[0, r]), **candidate(kmap, r, float(D[0, r]), int(I[0, r]),
                                                                         threshold)}
                                       for r in range(top_k) if I[0, r] >= 0]
            entries.append(entry)
    if kmap.integrity is not None:
        kmap.integrity.run()  # the answers are printed only from a map whose check passed
    times = [e["search_ms"] for e in entries if "search_ms" in e]
    result = {"map": str(args.map), "model": fp_id, "keyframes": len(kmap), "index": index.kind,
              "ready_s": round(ready_s, 3),
              "map_check": "none" if kmap.integrity is None else kmap.integrity.describe(),
              "search_ms_p50": float(np.percentile(times, 50)) if times else None,
              "search_ms_p95": float(np.percentile(times, 95)) if times else None,
              "min_similarity": threshold, "queries": entries}
    print(json.dumps(json_ready(result), indent=2, ensure_ascii=False))
    return 0
