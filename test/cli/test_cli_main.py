"""The ``dinomix`` parser as a whole: flags declared by settings, no import cycles, no torch for --help or map info."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinomix_ros.cli.main import build_parser
from dinomix_ros.imaging.preprocess import ImageConfig
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.build import BagMapConfig
from dinomix_ros.maps.index import IndexConfig
from dinomix_ros.maps.keyframes import KeyframeMap, StorageConfig
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig
from dinomix_ros.model.checkpoint import ModelSource
from dinomix_ros.model.encoder import EncoderConfig
from dinomix_ros.settings import entries, flag_of, spec_of
from dinomix_ros.util.dtypes import MODEL_DTYPES

REPO = Path(__file__).resolve().parents[2]
SETTINGS = (EncoderConfig, ModelSource, ImageConfig, IndexConfig, StorageConfig, KeyframeGateConfig,
            PosePairingConfig, MatcherConfig, BagMapConfig)
#: (command, flag) -> default where the command deliberately differs from the setting's default.
DEFAULT_OVERRIDES = {("map eval", "--exclude-recent-count"): 10}
#: (command or None for all, flag) declared by hand because argparse needs a special form (a required either-or pair,
#: an extra choice): their help is still the setting's description.
BY_HAND = {(None, "--checkpoint"), (None, "--random-weights"), ("map query", "--index")}
OLD_FLAGS = {"--storage", "--max-pose-gap-s", "--batch", "--exclude-recent"}


def commands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command parser with its arguments added, by path ("map build")."""
    parser.ensure_arguments()
    found = {path: parser} if path else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, f"{path} {name}".strip()))
    return found


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return commands(build_parser())


def test_every_command_is_reachable(parsers: dict) -> None:
    assert set(parsers) == {"describe", "model", "model info", "model convert", "model export", "bench", "map",
                            "map build",
                            "map info", "map topics", "map query", "map eval"}


def test_setting_flags_have_the_settings_default_help_and_choices(parsers: dict) -> None:
    seen = set()
    for cls in SETTINGS:
        for entry in entries(cls):
            flag = flag_of(cls, entry.field)
            for command, parser in parsers.items():
                action = options(parser).get(flag)
                if action is None:
                    continue
                seen.add((command, flag))
                assert action.help.startswith(entry.spec.description), (command, flag)
                if (None, flag) in BY_HAND or (command, flag) in BY_HAND:
                    continue
                expected = DEFAULT_OVERRIDES.get((command, flag), entry.default)
                assert action.default == expected, (command, flag)
                assert action.dest == flag[2:].replace("-", "_"), (command, flag)
                if entry.spec.choices is not None:
                    assert tuple(action.choices) == entry.spec.choices, (command, flag)
    model_flags = {"--checkpoint", "--random-weights", "--variant", "--seed", "--device", "--dtype", "--batch-size",
                   "--workers", "--range16", "--backend", "--onnx", "--preprocess"}
    for command in ("describe", "map build", "map query", "map eval"):
        assert {(command, f) for f in model_flags} <= seen
    gate = {"--min-distance-m", "--min-rotation-deg", "--min-interval-s", "--max-interval-s"}
    for command in ("map build", "map eval"):
        assert {(command, f) for f in gate | {"--pose-max-gap-s"}} <= seen
    assert {("map build", "--storage-dtype"), ("map build", "--index"), ("map build", "--max-gps-gap-s"),
            ("map query", "--top-k"), ("map query", "--index"), ("map eval", "--exclude-recent-count"),
            ("bench", "--device"), ("bench", "--batch-size"), ("bench", "--cuda-graphs")} <= seen


def test_hand_declared_flags_keep_their_special_forms(parsers: dict) -> None:
    build = options(parsers["map build"])
    assert build["--checkpoint"].default is None and build["--random-weights"].default is False
    groups = parsers["map build"]._mutually_exclusive_groups
    group = next(g for g in groups if build["--checkpoint"] in g._group_actions)
    assert group.required and build["--random-weights"] in group._group_actions
    query_index = options(parsers["map query"])["--index"]
    assert query_index.default == "auto"
    assert tuple(query_index.choices) == ("auto",) + spec_of(IndexConfig, "index").choices
    assert options(parsers["map eval"])["--exclude-recent-count"].default == 10


def test_old_flag_spellings_are_gone(parsers: dict) -> None:
    for command, parser in parsers.items():
        flags = set(options(parser))
        assert not flags & OLD_FLAGS, command
        for flag, action in options(parser).items():
            if "dtype" in flag and action.choices is not None:  # one spelling of precisions everywhere
                assert set(action.choices) <= set(MODEL_DTYPES), (command, flag)
    with pytest.raises(SystemExit):  # not an abbreviation of anything any more
        build_parser().parse_args(["map", "build", "out", "--images", "x", "--random-weights",
                                   "--max-pose-gap-s", "1"])


def _imports(path: Path) -> set[str]:
    """Modules imported anywhere in a file (module level and inside functions), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _package_graph(package: str) -> dict[str, set[str]]:
    folder = REPO / package.replace(".", "/")
    modules = {f"{package}.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


@pytest.mark.parametrize("package", ["dinomix_ros.cli", "dinomix_ros.evaluation"])
def test_packages_have_no_import_cycle(package: str) -> None:
    graph = _package_graph(package)
    assert len(graph) >= 6 and _cycle(graph) is None, _cycle(graph)


def test_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_evaluation_does_not_depend_on_the_command_line() -> None:
    for path in (REPO / "dinomix_ros" / "evaluation").glob("*.py"):
        imported = _imports(path)
        assert "argparse" not in imported, path.name
        assert not any(m.startswith("dinomix_ros.cli") for m in imported), path.name


def test_help_and_map_info_do_not_import_torch(tmp_path: Path) -> None:
    fingerprint = {"id": "dmx-00000000000000aa", "architecture": "dinomix_vits14", "weights_sha256": "ab" * 32,
                   "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": 8}
    KeyframeMap.empty(fingerprint).save(tmp_path / "m.dinomap")
    code = (
        "import contextlib, io, sys\n"
        "from dinomix_ros.cli.main import main\n"
        "for argv in (['--help'], ['map', '--help'], ['map', 'info', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        f"assert main(['map', 'info', {str(tmp_path / 'm.dinomap')!r}, '--json']) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss', 'matplotlib', 'rclpy'}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"keyframes": 0' in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"
