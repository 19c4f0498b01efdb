"""What the ``dinomix`` commands share: the help formatter, subcommand parsers filled on first use, the model and bag
flags, and the encoder the model flags describe.

Flags that set a configuration value are declared by the setting (:func:`dinomix_ros.settings.add_flags`): the
same name, default, limits and help as the node parameter. The settings classes live beside torch-importing code,
so each subcommand adds its arguments only when it is parsed or its help is shown (:class:`CommandParser`):
``dinomix --help``, ``dinomix map info`` and ``dinomix map topics`` never import torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinomix_ros.settings import add_flags, from_flags, spec_of

if TYPE_CHECKING:  # imported where used: torch is slow to import
    from dinomix_ros.model.encoder import Encoder

__all__ = [
    "Formatter",
    "CommandParser",
    "add_command",
    "refuse",
    "add_model_flags",
    "make_encoder",
    "expand_images",
    "add_bag_flags",
    "exact_search_device",
]


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with defaults shown and descriptions kept as written."""


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose arguments are added by ``add_arguments(parser)`` the first time it is used.

    Used first means: it parses (its subcommand was chosen) or prints its help or usage. The subcommands of a
    ``CommandParser`` are ``CommandParser`` too (argparse creates subparsers of the parent's class).

    Args:
        add_arguments: adds the parser's arguments (and subcommands); None when they are added directly.
        *args, **kwargs: as :class:`argparse.ArgumentParser`.
    """

    def __init__(self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def ensure_arguments(self) -> None:
        """Add the arguments now if they are not there yet."""
        add, self._add_arguments = self._add_arguments, None
        if add is not None:
            add(self)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.ensure_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ensure_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self.ensure_arguments()
        return super().format_help()


def add_command(sub: argparse._SubParsersAction, name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                *, summary: str, description: str | None = None,
                run: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
    """Register subcommand ``name``; ``add_arguments`` runs when it is parsed or its help is shown.

    Args:
        sub: the subparsers action of the parent command (created by a :class:`CommandParser`).
        name: the subcommand.
        add_arguments: adds its flags and positionals.
        summary: one line for the parent's command list.
        description: the text at the top of its own ``--help``.
        run: the function that executes it (``args.func``); None for a command with subcommands of its own.

    Returns:
        The subcommand's parser.
    """
    parser = sub.add_parser(name, help=summary, description=description, formatter_class=Formatter,
                            add_arguments=add_arguments)
    if run is not None:
        parser.set_defaults(func=run)
    return parser


def refuse(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    """Refuse the given flags among ``flags`` (dest -> flag) that do not apply, e.g. a bag option with a folder.

    Raises:
        ValueError: one or more were given; the message names them and says ``why``.
    """
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


# ------------------------------------------------------------------------------------------------------------ model


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The weights (--checkpoint or --random-weights, --variant, --seed), the engine (device, dtype, backend, ONNX
    file, where preprocessing runs, batching) and the 16-bit image range."""
    from dinomix_ros.imaging.preprocess import ImageConfig
    from dinomix_ros.model.checkpoint import ModelSource
    from dinomix_ros.model.encoder import EncoderConfig

    group = parser.add_argument_group("model")
    # Exactly one weights source: a required mutually exclusive pair, which add_flags (one flag each) cannot make.
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help=spec_of(ModelSource, "checkpoint").description)
    source.add_argument("--random-weights", action="store_true",
                        help=spec_of(ModelSource, "random_weights").description)
    add_flags(group, ModelSource, fields=("variant", "seed"))
    add_flags(group, EncoderConfig,
              fields=("device", "dtype", "backend", "onnx", "preprocess", "batch_size", "workers"))
    add_flags(group, ImageConfig)


def make_encoder(args: argparse.Namespace) -> Encoder:
    """The encoder the flags of :func:`add_model_flags` describe (loads the weights).

    Raises:
        SettingError: a flag value out of range (the message names the flag).
        CheckpointError / FileNotFoundError: a bad or missing weights file.
    """
    from dinomix_ros.imaging.preprocess import ImageConfig
    from dinomix_ros.model.checkpoint import ModelSource
    from dinomix_ros.model.encoder import Encoder, EncoderConfig

    config = from_flags(EncoderConfig, args)
    image = from_flags(ImageConfig, args)
    source = from_flags(ModelSource, args, checkpoint="" if args.checkpoint is None else str(args.checkpoint))
    return Encoder(source.load(), config, image)


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their images in natural order.

    Raises:
        FileNotFoundError: a file that does not exist.
    """
    from dinomix_ros.maps.sources.imagefolder import list_images

    paths: list[Path] = []
    for item in inputs:
        paths.extend(list_images(item) if item.is_dir() else [item])
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    return paths


def exact_search_device(model_device: str) -> str:
    """Where an exact search runs (``map.search_device``): beside the model, ``cuda:N`` -> ``cuda``."""
    if model_device == "cpu":
        return "cpu"
    return "cuda" if model_device.startswith("cuda") else "auto"


# -------------------------------------------------------------------------------------------------------------- bags


def add_bag_flags(group: argparse._ArgumentGroup) -> None:
    """--image-topic (repeated), --pose-topic and --pose-max-gap-s: which images of a bag, posed from which topic."""
    from dinomix_ros.maps.sources.poses import PosePairingConfig

    group.add_argument("--image-topic", action="append", dest="image_topics", metavar="TOPIC",
                       help="sensor_msgs/Image or CompressedImage topic; repeat for several cameras")
    group.add_argument("--pose-topic", metavar="TOPIC",
                       help="nav_msgs/Odometry, geometry_msgs/PoseStamped, PoseWithCovarianceStamped or "
                            "sensor_msgs/NavSatFix topic giving the position at each image stamp")
    add_flags(group, PosePairingConfig, fields=("max_gap_s",))
