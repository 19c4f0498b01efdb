"""``dinomix model info|convert|export``: inspect a weights file, verify it and re-save it as ``.safetensors``, or
export it to ONNX for ONNX Runtime and TensorRT."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dinomix_ros.cli.common import add_command

__all__ = ["register"]

_logger = logging.getLogger("dinomix")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``model {info,convert,export}`` to the ``dinomix`` commands."""
    add_command(sub, "model", _add_actions, summary="inspect, convert or export weight files")


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    add_command(actions, "info", _add_info_arguments, run=run_info,
                summary="architecture, source format and fingerprint of a weights file (JSON)")
    add_command(actions, "convert", _add_convert_arguments, run=run_convert,
                summary="verify a weights file and re-save it as .safetensors with its fingerprint")
    add_command(actions, "export", _add_export_arguments, run=run_export,
                summary="export to ONNX (dynamic batch, fingerprint in the metadata) for ONNX Runtime / TensorRT",
                description=_EXPORT_HELP)


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors")


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="input weights file")
    p.add_argument("out", type=Path, help="output .safetensors")


_EXPORT_HELP = """\
Export DINO-Mix weights to ONNX: input uint8 (B, 224, 224, 3) RGB by default (resize done, normalisation inside the
graph), output (B, 4096) float32 descriptors; the batch dimension is dynamic. The metadata holds the model
fingerprint and the preprocessing id, so the node's onnxruntime backend refuses a file of other weights. Unless
--no-verify, ONNX Runtime runs the file once and its descriptors are compared with PyTorch float32.

Use it with the node (model.backend: onnxruntime, model.onnx: OUT.onnx) or build a TensorRT engine on a Jetson:
  trtexec --onnx=OUT.onnx --fp16 --minShapes=images:1x224x224x3 --optShapes=images:1x224x224x3 \\
          --maxShapes=images:8x224x224x3 --saveEngine=OUT.engine
"""


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.model.export import INPUT_LAYOUTS, ONNX_OPSET

    p.add_argument("checkpoint", type=Path, help="DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors")
    p.add_argument("out", type=Path, help="output .onnx")
    p.add_argument("--input", choices=INPUT_LAYOUTS, default=INPUT_LAYOUTS[0],
                   help="input of the graph: uint8 NHWC RGB (normalisation inside; 4x less to upload) or "
                        "ImageNet-normalised float32 NCHW (for TensorRT releases without uint8 inputs)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (>= 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against PyTorch")


def run_info(args: argparse.Namespace) -> int:
    """``dinomix model info``: the weights file described, as JSON."""
    from dinomix_ros.model import load_model

    print(json.dumps(load_model(args.checkpoint).describe(), indent=2))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """``dinomix model convert``: load (which verifies the file) and save as .safetensors with the fingerprint."""
    from dinomix_ros.util.files import check_output_file

    check_output_file(args.out, (".safetensors",), what="OUT")  # before torch loads: seconds
    from dinomix_ros.model import load_model, save_model

    loaded = load_model(args.checkpoint)
    save_model(loaded, args.out)
    _logger.info("wrote %s (%s, fingerprint %s)", args.out, loaded.spec.model_name, loaded.fingerprint.id)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``dinomix model export``: write the ONNX file, then (unless --no-verify) compare ONNX Runtime with PyTorch."""
    from dinomix_ros.model import load_model
    from dinomix_ros.model.export import export_onnx

    loaded = load_model(args.checkpoint)
    export_onnx(loaded, args.out, input=args.input, opset=args.opset)
    report = {"onnx": str(args.out), "architecture": loaded.spec.model_name, "fingerprint": loaded.fingerprint.id,
              "input": args.input, "opset": args.opset}
    if not args.no_verify:
        report["verify"] = _verify_export(loaded, args.out)
    print(json.dumps(report, indent=2))
    return 0


def _verify_export(loaded, path: Path) -> dict:
    """ONNX Runtime (CPU) against PyTorch float32 on 4 seeded random images: min cosine and max |difference|."""
    import numpy as np
    import torch

    from dinomix_ros.model.backends import OnnxRuntimeBackend
    from dinomix_ros.imaging.preprocess import normalize

    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    got = OnnxRuntimeBackend(loaded, torch.device("cpu"), "float32", str(path)).forward(batch)
    with torch.inference_mode():
        expected = loaded.model(normalize(batch)).numpy()
    cosine = float((got * expected).sum(1).min())
    _logger.info("ONNX Runtime vs PyTorch float32: min cosine %.8f", cosine)
    if cosine < 0.99999:
        raise ValueError(f"the exported file does not reproduce PyTorch: min cosine {cosine:.6f}, expected >= "
                         "0.99999; report this with `dinomix model info` of the checkpoint")
    return {"min_cosine": cosine, "max_abs_diff": float(np.abs(got - expected).max())}
