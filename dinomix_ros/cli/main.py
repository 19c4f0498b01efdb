"""The ``dinomix`` command line: describe images, inspect weights, build/inspect/query/evaluate maps, benchmark.

Every subcommand has ``--help``; defaults are shown. Library errors (bad checkpoint, bad map, bad image) end the
command with a one-line message and exit code 2, not a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from dinomix_ros.cli import bench, describe, maps, model
from dinomix_ros.cli.common import CommandParser, Formatter

__all__ = ["main", "build_parser"]

_logger = logging.getLogger("dinomix")


def build_parser() -> argparse.ArgumentParser:
    """The ``dinomix`` parser; each command module registers its subcommands (their flags are added on first use)."""
    parser = CommandParser(prog="dinomix", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe.register(sub)
    model.register(sub)
    bench.register(sub)
    maps.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``dinomix`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for a library error (logged as one line; ``--debug`` raises it instead),
        130 when interrupted. argparse exits with 2 itself on a usage error.
    """
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
