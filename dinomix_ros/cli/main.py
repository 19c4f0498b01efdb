"""The dinomix command line: describe images, inspect weights, build/inspect/query/evaluate maps, benchmark.

Every command has --help with its defaults. A successful run prints its result on stdout and nothing else;
warnings and errors go to stderr, --verbose adds progress messages and --debug adds details and tracebacks. A
mistake (a bad checkpoint, map, image or flag) ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

from dinomix_ros.cli import bench, describe, maps, model
from dinomix_ros.cli.common import CommandParser, Formatter

__all__ = ["main", "build_parser"]

_logger = logging.getLogger("dinomix")

#: Exit code of a command whose output pipe was closed by the reader (``dinomix map topics BAG | head``), as a
#: shell reports a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    """The dinomix parser; each command module registers its subcommands (their flags are added on first use)."""
    parser = CommandParser(prog="dinomix", description=__doc__, formatter_class=Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="also log progress messages (INFO)")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    describe.register(sub)
    model.register(sub)
    bench.register(sub)
    maps.register(sub)
    return parser


class _LineFormatter(logging.Formatter):
    """``dinomix: error: message`` for users; with --verbose or --debug, time and logger name too."""

    def __init__(self, detailed: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if detailed else None)
        self._detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        if self._detailed:
            return super().format(record)
        return f"dinomix: {record.levelname.lower()}: {record.getMessage()}"


def _third_party_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         file: Any = None, line: str | None = None) -> None:
    """Route a Python warning to the log at DEBUG: what dinomix_ros itself warns about it also logs, once."""
    logging.getLogger("dinomix.warnings").debug("%s:%d: %s: %s", filename, lineno, category.__name__, message)


def _set_verbosity(handler: logging.Handler, args: argparse.Namespace) -> None:
    handler.setFormatter(_LineFormatter(detailed=args.debug or args.verbose))
    logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one dinomix command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for a library error (logged as one line; --debug raises it instead), 130
        when interrupted, 141 when the reader of stdout went away. argparse exits with 2 itself on a usage error.
    """
    root = logging.getLogger()
    previous_level = root.level
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    _set_verbosity(handler, argparse.Namespace(debug=False, verbose=False))  # until the flags are parsed
    args = argparse.Namespace(debug=False)
    try:
        # Parsing may refuse an output already (see CommandParser's early checks): the same one-line error.
        args = build_parser().parse_args(argv)
        _set_verbosity(handler, args)
        _logger.debug("dinomix %s", " ".join(sys.argv[1:] if argv is None else argv))
        with warnings.catch_warnings():
            warnings.showwarning = _third_party_warning
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the boundary, not at interpreter exit
            return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (ValueError, FileNotFoundError, OSError) as exc:
        if args.debug:
            raise
        _logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        _logger.error("interrupted")
        return 130
    finally:  # main() may run again in this process (tests, scripts): leave logging as it was
        root.removeHandler(handler)
        root.setLevel(previous_level)


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the reader is gone, and the interpreter's final flush must not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests): nothing to flush at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
