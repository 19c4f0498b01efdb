"""``dinomix model info|convert``: inspect a weights file, or verify it and re-save it as ``.safetensors``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dinomix_ros.cli.common import add_command

__all__ = ["register"]

_logger = logging.getLogger("dinomix")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``model {info,convert}`` to the ``dinomix`` commands."""
    add_command(sub, "model", _add_actions, summary="inspect or convert weight files")


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    add_command(actions, "info", _add_info_arguments, run=run_info,
                summary="architecture, source format and fingerprint of a weights file (JSON)")
    add_command(actions, "convert", _add_convert_arguments, run=run_convert,
                summary="verify a weights file and re-save it as .safetensors with its fingerprint")


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="DINO-Mix .ckpt, DINOv2 *_pretrain.pth or .safetensors")


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="input weights file")
    p.add_argument("out", type=Path, help="output .safetensors")


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
