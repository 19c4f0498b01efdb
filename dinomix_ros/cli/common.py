"""What the ``dinomix`` commands share: the help formatter, subcommand parsers filled on first use, options that may
be given once, the model and bag flags, and the encoder the model flags describe.

Flags that set a configuration value are declared by the setting (:func:`dinomix_ros.settings.add_flags`): the
same name, default, limits and help as the node parameter. The settings classes live beside torch-importing code,
so each subcommand adds its arguments only when it is parsed or its help is shown (:class:`CommandParser`):
``dinomix --help``, ``dinomix map info`` and ``dinomix map topics`` never import torch.

An option that takes one value may be given once: given twice it is refused (:class:`StoreOnce`), never silently
replaced by the last one. Options that collect values (``--image-topic``, ``--camera``) use all of them.

Declaring the model flags imports torch (seconds), so a command that writes an output checks it first, from the raw
arguments (``check_early`` of :func:`add_command`, helped by :func:`option_value`): a wrong ``--out`` is refused in
well under a second, however many inputs follow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinomix_ros.settings import add_flags, from_flags, spec_of

if TYPE_CHECKING:  # imported where used: torch is slow to import
    from dinomix_ros.model.encoder import Encoder

__all__ = [
    "Formatter",
    "StoreOnce",
    "CommandParser",
    "add_command",
    "option_value",
    "refuse",
    "show_progress",
    "add_model_flags",
    "make_encoder",
    "expand_images",
    "add_bag_flags",
    "exact_search_device",
    "check_map_out",
]


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with defaults shown and descriptions kept as written.

    A default is shown only when it says something: not for required options, options without a default (None) and
    on/off switches (``store_true``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


class StoreOnce(argparse._StoreAction):
    """``store``, except that the option may be given only once: a second value is a usage error, not a silent
    replacement of the first (``--bag a --bag b`` would otherwise read only ``b``).

    Args:
        hint: said after the refusal, e.g. how to give two bags their distinct roles.
        *args, **kwargs: as ``argparse._StoreAction``.
    """

    def __init__(self, *args: Any, hint: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hint = hint

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given: dict[str, Any] = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in given:
            parser.error(f"{option_string} was given twice ({given[self.dest]} and {values}); it takes one value"
                         + (f": {self.hint}" if self.hint else ""))
        given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose arguments are added by ``add_arguments(parser)`` the first time it is used.

    Used first means: it parses (its subcommand was chosen) or prints its help or usage. The subcommands of a
    ``CommandParser`` are ``CommandParser`` too (argparse creates subparsers of the parent's class).

    Args:
        add_arguments: adds the parser's arguments (and subcommands); None when they are added directly.
        check_early: called with the raw arguments before they are added and parsed (not for ``--help``), to refuse
            an output before adding the arguments imports torch; raises ValueError (e.g. OutputPathError).
        *args, **kwargs: as :class:`argparse.ArgumentParser`.
    """

    def __init__(self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 check_early: Callable[[list[str]], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments
        self._check_early = check_early
        # Every single-value option of this parser and its groups is StoreOnce (groups share these registries).
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)

    def ensure_arguments(self) -> None:
        """Add the arguments now if they are not there yet."""
        add, self._add_arguments = self._add_arguments, None
        if add is not None:
            add(self)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._check_early is not None and args is not None:
            raw = list(args)
            options = raw[:raw.index("--")] if "--" in raw else raw
            if "-h" not in options and "--help" not in options:
                self._check_early(raw)
        self.ensure_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ensure_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self.ensure_arguments()
        return super().format_help()


def add_command(sub: argparse._SubParsersAction, name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                *, summary: str, description: str | None = None, run: Callable[[argparse.Namespace], int] | None = None,
                check_early: Callable[[list[str]], None] | None = None) -> argparse.ArgumentParser:
    """Register subcommand ``name``; ``add_arguments`` runs when it is parsed or its help is shown.

    Args:
        sub: the subparsers action of the parent command (created by a :class:`CommandParser`).
        name: the subcommand.
        add_arguments: adds its flags and positionals.
        summary: one line for the parent's command list.
        description: the text at the top of its own ``--help``.
        run: the function that executes it (``args.func``); None for a command with subcommands of its own.
        check_early: checks its outputs from the raw arguments before its flags are added (see
            :class:`CommandParser`); ``run`` checks them again.

    Returns:
        The subcommand's parser.
    """
    parser = sub.add_parser(name, help=summary, description=description, formatter_class=Formatter,
                            add_arguments=add_arguments, check_early=check_early)
    if run is not None:
        parser.set_defaults(func=run)
    return parser


def option_value(raw: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in raw arguments (``--out X`` or ``--out=X``, before any ``--``); None if absent.

    For early checks only: an abbreviation of the flag is not recognised here (argparse resolves it later, and
    ``run`` checks the value again).
    """
    for i, token in enumerate(raw):
        if token == "--":
            break
        if token == flag and i + 1 < len(raw):
            return raw[i + 1]
        if token.startswith(flag + "="):
            return token[len(flag) + 1:]
    return None


def refuse(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    """Refuse the given flags among ``flags`` (dest -> flag) that do not apply, e.g. a bag option with a folder.

    Raises:
        ValueError: one or more were given; the message names them and says ``why``.
    """
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with --quiet, and not when stderr goes to a file or pipe."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# ------------------------------------------------------------------------------------------------------------ model


def add_model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The weights (--checkpoint or --random-weights, --variant, --seed), the engine (device, dtype, backend, ONNX
    file, where preprocessing runs, batching) and the 16-bit image range. ``required``: one weights source must be
    given (False: the command checks, e.g. only some of its modes need the model)."""
    from dinomix_ros.imaging.preprocess import ImageConfig
    from dinomix_ros.model.checkpoint import ModelSource
    from dinomix_ros.model.encoder import EncoderConfig

    group = parser.add_argument_group("model")
    # Exactly one weights source: a required mutually exclusive pair, which add_flags (one flag each) cannot make.
    source = group.add_mutually_exclusive_group(required=required)
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


# -------------------------------------------------------------------------------------------------------------- maps


def check_map_out(out: Path, append: bool) -> None:
    """A map OUT (map build, map pull) is a folder this process can write; --append needs a map at OUT; without it,
    OUT must be new or empty.

    Raises:
        ValueError: OUT cannot be written, or holds a map (without --append), or other files.
        MapNotFoundError: --append and no map at OUT.
    """
    from dinomix_ros.maps.keyframes import MapNotFoundError
    from dinomix_ros.maps.manifest import MANIFEST
    from dinomix_ros.util.files import check_output_dir

    check_output_dir(out, what="OUT")
    has_map = (out / MANIFEST).is_file()
    if append and not has_map:
        raise MapNotFoundError(f"--append: there is no map at {out}; leave out --append to create one")
    if not append and has_map:
        raise ValueError(f"{out} already holds a map; pass --append to add to it, or choose another OUT")
    if not append and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"OUT {out} is a folder that holds other files, not a map; a map is a folder of its own: "
                         f"choose a new path such as {out / 'my.dinomap'}")
