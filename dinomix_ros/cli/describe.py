"""``dinomix describe``: DINO-Mix descriptors of images into an N x 4096 float32 ``.npy`` with a JSON sidecar."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from dinomix_ros.cli.common import add_command, add_model_flags, expand_images, make_encoder

__all__ = ["register"]

_logger = logging.getLogger("dinomix")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``describe`` to the ``dinomix`` commands."""
    add_command(sub, "describe", _add_arguments, run=run,
                summary="compute descriptors of images into an N x 4096 float32 .npy",
                description="Descriptors in input order (folders expanded in natural order); a JSON sidecar beside "
                            "OUT lists the images and the model fingerprint.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="output .npy (N x 4096 float32)")
    p.add_argument("--skip-errors", action="store_true", help="write NaN rows for unreadable images instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)


def run(args: argparse.Namespace) -> int:
    """``dinomix describe``: write OUT and its sidecar (OUT with .json) atomically."""
    from dinomix_ros.util.files import atomic_path

    paths = expand_images(args.images)
    encoder = make_encoder(args)
    t0 = time.perf_counter()
    desc = encoder.describe(paths, progress=not args.quiet, skip_errors=args.skip_errors)
    elapsed = time.perf_counter() - t0
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, desc, allow_pickle=False)
    sidecar = args.out.with_suffix(".json")
    failed = [str(p) for p, row in zip(paths, desc) if not np.isfinite(row).all()]
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps({"images": [str(p) for p in paths], "failed": failed,
                                   "model": encoder.describe_info()}, indent=2))
    _logger.info("%d descriptors (%d x %d float32) -> %s (+ %s) in %.1f s, %.1f images/s", len(paths), *desc.shape,
                 args.out, sidecar.name, elapsed, len(paths) / max(elapsed, 1e-9))
    if failed:
        _logger.warning("%d images could not be read (NaN rows): %s", len(failed), failed[:5])
    return 0
