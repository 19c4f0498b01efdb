"""The ``dinomix`` command line: describe images, inspect weights, build/inspect/query/evaluate maps, benchmark.

Every subcommand has ``--help``; defaults are shown. Library errors (bad checkpoint, bad map, bad image) end the
command with a one-line message and exit code 2, not a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]

_logger = logging.getLogger("dinomix")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --random-weights and the engine options, shared by every command that runs the model."""
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors file")
    source.add_argument("--random-weights", action="store_true",
                        help="seeded random weights (tests/demos only: scores are meaningless)")
    group.add_argument("--variant", default="vits14",
                       help="backbone for --random-weights (vits14, vitb14, vitl14, vitg14)")
    group.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="inference precision")
    group.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    group.add_argument("--workers", type=int, default=2, help="image decode/resize threads")
    group.add_argument("--range16", default="full", choices=["full", "minmax"],
                       help="16-bit images to 8-bit: full range, or stretched per image (12-bit/thermal cameras)")


def make_encoder(args: argparse.Namespace):  # noqa: ANN201 - Encoder (imported lazily: torch is slow to import)
    from dinomix_ros.model.encoder import Encoder, EncoderConfig

    from dinomix_ros.imaging.preprocess import ImageConfig

    config = EncoderConfig(device=args.device, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers)
    image = ImageConfig(range16=args.range16)
    if args.random_weights:
        return Encoder.from_random(args.variant, args.seed, config, image)
    return Encoder.from_checkpoint(args.checkpoint, config, image)


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their images in natural order."""
    from dinomix_ros.maps.sources.imagefolder import list_images

    paths: list[Path] = []
    for item in inputs:
        paths.extend(list_images(item) if item.is_dir() else [item])
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# describe


def cmd_describe(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------------------------------------------------
# model info / convert


def cmd_model_info(args: argparse.Namespace) -> int:
    from dinomix_ros.model import load_model

    print(json.dumps(load_model(args.checkpoint).describe(), indent=2))
    return 0


def cmd_model_convert(args: argparse.Namespace) -> int:
    from dinomix_ros.model import load_model, save_model

    loaded = load_model(args.checkpoint)
    save_model(loaded, args.out)
    _logger.info("wrote %s (%s, fingerprint %s)", args.out, loaded.spec.model_name, loaded.fingerprint.id)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    from dinomix_ros.model.benchmark import bench_model

    result = bench_model(variants=args.variants.split(","), dtypes=args.dtypes.split(","), device=args.device,
                         batch=args.batch, iters=args.iters, warmup=args.warmup, cuda_graphs=not args.no_cuda_graphs)
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinomix", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("describe", help="compute descriptors of images into an N x 4096 float32 .npy",
                       formatter_class=_Formatter,
                       description="Descriptors in input order (folders expanded in natural order); a JSON sidecar "
                                   "beside OUT lists the images and the model fingerprint.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="output .npy (N x 4096 float32)")
    p.add_argument("--skip-errors", action="store_true", help="write NaN rows for unreadable images instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_describe)

    model = sub.add_parser("model", help="inspect or convert weight files", formatter_class=_Formatter)
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = msub.add_parser("info", help="architecture, source format and fingerprint of a weights file (JSON)",
                        formatter_class=_Formatter)
    p.add_argument("checkpoint", type=Path, help="DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors")
    p.set_defaults(func=cmd_model_info)
    p = msub.add_parser("convert", help="verify a weights file and re-save it as .safetensors with its fingerprint",
                        formatter_class=_Formatter)
    p.add_argument("checkpoint", type=Path, help="input weights file")
    p.add_argument("out", type=Path, help="output .safetensors")
    p.set_defaults(func=cmd_model_convert)

    p = sub.add_parser("bench", help="model latency/throughput benchmark, printed as JSON", formatter_class=_Formatter)
    p.add_argument("--variants", default="vits14,vitb14", help="comma-separated backbones")
    p.add_argument("--dtypes", default="float32", help="comma-separated dtypes (float32,float16,bfloat16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=32, help="throughput batch size (256 is typical on a GPU)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time batch-1 CUDA inference eagerly")
    p.set_defaults(func=cmd_bench)

    from dinomix_ros.cli.maps import add_map_parser  # map build/info/query/eval live beside the map code

    add_map_parser(sub, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _logger.info("dinomix %s", " ".join(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if args.debug:
            raise
        _logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        _logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
