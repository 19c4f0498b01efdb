"""The ``dinomix`` parser as a whole: flags declared by settings, no import cycles, no torch for --help or map info."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bagfactory import photo_frames, write_camera_bag

from dinomix_ros.cli.main import build_parser, main
from dinomix_ros.evaluation.calibration import CalibrationConfig
from dinomix_ros.imaging.preprocess import ImageConfig
from dinomix_ros.localization.matching import MatcherConfig
from dinomix_ros.maps.build_bag import BagMapConfig
from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.maps.index import IndexConfig
from dinomix_ros.maps.keyframes import KeyframeMap, StorageConfig
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.sources.poses import KeyframeGateConfig, PosePairingConfig
from dinomix_ros.model.checkpoint import ModelSource
from dinomix_ros.model.encoder import EncoderConfig
from dinomix_ros.settings import entries, flag_of, spec_of
from dinomix_ros.util.dtypes import MODEL_DTYPES

REPO = Path(__file__).resolve().parents[2]
SETTINGS = (EncoderConfig, ModelSource, ImageConfig, IndexConfig, StorageConfig, KeyframeGateConfig,
            PosePairingConfig, MatcherConfig, BagMapConfig, CalibrationConfig, FleetConfig)
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
                            "map info", "map topics", "map query", "map eval", "map import", "map push",
                            "map pull"}


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
                assert action.help.replace("%%", "%").startswith(entry.spec.description), (command, flag)
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
    assert ("map eval", "--min-positives") in seen
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
    assert tuple(query_index.choices) == spec_of(IndexConfig, "index").choices and "auto" in query_index.choices
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


@pytest.mark.parametrize("package", ["dinomix_ros.cli", "dinomix_ros.evaluation", "dinomix_ros.maps"])
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
    save_map(KeyframeMap.empty(fingerprint), tmp_path / "m.dinomap")
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


def test_help_is_plain_text_and_shows_only_meaningful_defaults(parsers: dict) -> None:
    for command, parser in parsers.items():
        text = parser.format_help()
        assert "``" not in text and ":mod:" not in text and ":func:" not in text, command
        assert "(default: None)" not in text and "(default: False)" not in text, command
    describe_help = parsers["describe"].format_help()
    assert "--out OUT             output .npy file (N x 4096 float32)\n" in describe_help  # required: no default
    assert "(default: 1.0)" in parsers["map build"].format_help()  # a real default is still shown


def test_an_option_given_twice_is_refused_and_a_collecting_option_keeps_every_value(
        capsys: pytest.CaptureFixture) -> None:
    base = ["map", "build", "out.dinomap", "--random-weights"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(base + ["--bag", "a", "--bag", "b"])
    assert exc.value.code == 2
    assert "--bag was given twice (a and b); it takes one value: for poses recorded into another bag, give that " \
           "one as --pose-bag" in capsys.readouterr().err
    for argv in (["--images", "x", "--geotags", "csv", "--geotags", "exif"], ["--images", "x", "--seed", "1",
                                                                              "--seed", "2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + argv)
        assert "was given twice" in capsys.readouterr().err
    args = build_parser().parse_args(base + ["--bag", "a", "--image-topic", "/a", "--image-topic", "/b",
                                             "--camera", "front", "--camera", "rear"])
    assert args.image_topics == ["/a", "/b"] and args.cameras == ["front", "rear"] and str(args.bag) == "a"
    with pytest.raises(SystemExit):  # top-level flags too: one parser class for every level
        build_parser().parse_args(["map", "eval", "--database", "d", "--database", "e", "--random-weights"])


def _run_cli(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dinomix_ros.cli.main", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_successful_runs_are_quiet_verbose_logs_each_line_once(
        tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture) -> None:
    fingerprint = {"id": "dmx-00000000000000aa", "architecture": "dinomix_vits14", "weights_sha256": "ab" * 32,
                   "preprocessing": "rgb resize 224 imagenet-norm", "descriptor_dim": 8}
    save_map(KeyframeMap.empty(fingerprint), tmp_path / "m.dinomap")
    quiet = _run_cli("map", "info", "m.dinomap", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("map ")
    assert "dinomix --debug map info m.dinomap" in _run_cli("--debug", "map", "info", "m.dinomap", cwd=tmp_path).stderr
    failed = _run_cli("map", "info", "missing.dinomap", cwd=tmp_path)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr == "dinomix: error: no map at missing.dinomap: the directory does not exist\n"

    model = ["--random-weights", "--device", "cpu", "--batch-size", "4"]
    capsys.readouterr()
    assert main(["map", "build", str(tmp_path / "a.dinomap"), "--images", str(corridor_subset), "--geotags", "none",
                 *model]) == 0
    err = capsys.readouterr().err  # only the warning that the weights are random
    assert err == "dinomix: warning: using RANDOM weights (dinov2_vits14, seed 0): similarity scores are " \
                  "meaningless\n"
    assert main(["--verbose", "map", "build", str(tmp_path / "b.dinomap"), "--images", str(corridor_subset),
                 "--geotags", "none", *model]) == 0
    lines = [line.split(" ", 2)[-1] for line in capsys.readouterr().err.splitlines()]  # without the time stamp
    assert len(lines) >= 5 and len(lines) == len(set(lines)), lines
    assert not any("dinomix map build" in line for line in lines)  # the command line is a DEBUG line


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``dinomix map topics BAG | head -1``: the reader goes away before everything is written."""
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2), gps_topic="/gps/fix")
    code = (
        "import os, sys\n"
        "from dinomix_ros.cli.main import main\n"
        "read, write = os.pipe()\n"
        "os.close(read)\n"  # the reader is gone before anything is written
        "os.dup2(write, 1)\n"
        f"code = main(['map', 'topics', {str(bag.path)!r}])\n"
        "sys.stderr.write(f'exit {code}')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "test"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "exit 141", out.stderr  # no "Broken pipe" line, no traceback


def test_map_topics_imports_no_torch(tmp_path: Path) -> None:
    bag = write_camera_bag(tmp_path / "bag", frames=photo_frames(2))
    code = (
        "import contextlib, io, sys\n"
        "from dinomix_ros.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    assert main(['map', 'topics', {str(bag.path)!r}]) == 0\n"
        "assert '/camera/image_raw' in out.getvalue()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss', 'matplotlib', 'rclpy'}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
