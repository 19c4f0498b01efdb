"""``dinomix describe``: DINO-Mix descriptors of images into an N x 4096 float32 ``.npy`` with a JSON sidecar.

The sidecar is named after its output (``desc.npy`` -> ``desc.npy.json``), so two outputs never share one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from dinomix_ros.cli.common import (
    add_command,
    add_model_flags,
    expand_images,
    make_encoder,
    option_value,
    show_progress,
)

__all__ = ["register", "sidecar_path"]

_logger = logging.getLogger("dinomix")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``describe`` to the ``dinomix`` commands."""
    add_command(sub, "describe", _add_arguments, run=run, check_early=_check_early,
                summary="compute descriptors of images into an N x 4096 float32 .npy",
                description="Descriptors in input order (folders expanded in natural order); a JSON sidecar "
                            "OUT.json (desc.npy.json for desc.npy) lists the images and the model fingerprint.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # Kept as text here (Path() on 100k arguments costs seconds): the output is refused before they are looked at.
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="output .npy file (N x 4096 float32)")
    p.add_argument("--skip-errors", action="store_true", help="write NaN rows for unreadable images instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)


def sidecar_path(out: Path) -> Path:
    """The JSON sidecar of the descriptor file ``out``: ``desc.npy`` -> ``desc.npy.json``."""
    return out.with_name(out.name + ".json")


def _check_outputs(out: Path) -> Path:
    """Refuse OUT or its sidecar when they cannot be written; returns the sidecar's path."""
    from dinomix_ros.util.files import check_output_file

    check_output_file(out, (".npy",), what="--out")
    return check_output_file(sidecar_path(out), (".json",), what="--out's sidecar")


def _check_early(raw: list[str]) -> None:
    out = option_value(raw, "--out")
    if out is not None:
        _check_outputs(Path(out))


def run(args: argparse.Namespace) -> int:
    """``dinomix describe``: check OUT and its sidecar first, then write both atomically."""
    from dinomix_ros.util.files import atomic_path

    # Before the images are listed or the model loads: a wrong OUT is refused at once, whatever the input size.
    sidecar = _check_outputs(args.out)
    paths = expand_images([Path(p) for p in args.images])
    encoder = make_encoder(args)
    t0 = time.perf_counter()
    desc = encoder.describe(paths, progress=show_progress(args), skip_errors=args.skip_errors)
    elapsed = time.perf_counter() - t0
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, desc, allow_pickle=False)
    failed = [str(p) for p, row in zip(paths, desc) if not np.isfinite(row).all()]
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps({"images": [str(p) for p in paths], "failed": failed,
                                   "model": encoder.describe_info()}, indent=2))
    _logger.info("%d descriptors (%d x %d float32) -> %s (+ %s) in %.1f s, %.1f images/s", len(paths), *desc.shape,
                 args.out, sidecar.name, elapsed, len(paths) / max(elapsed, 1e-9))
    if failed:
        _logger.warning("%d images could not be read (NaN rows): %s", len(failed), failed[:5])
    return 0
