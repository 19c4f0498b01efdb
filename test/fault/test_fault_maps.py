"""Fault suite, hostile maps: 60+ kinds of damaged or hostile map directories against ``KeyframeMap.load``,
``dinomix map info`` and ``dinomix map query`` (subprocesses), and hostile ``.lock`` entries against saves.

Every probe works on its own copy of one good map (:mod:`hostile_maps` says what each kind does and what load must
say). Asserted per probe: load refuses with the expected one-line :class:`MapError` (or loads, for ignored extras),
within a timeout (a FIFO must not block); the CLI ends with exit 2 and exactly one error line, no traceback (exit 0
where the map is fine for that command); nothing outside the map directory changes (a sentinel file, link targets,
a pickled payload's marker); a map that loads keeps every keyframe and takes a save. Failures are collected so that
every probe is recorded in the table before the test fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hostile_maps import ROWS, hostile_kinds, lock_kinds, make_map, pickle_marker, random_weights

from dinomix_ros.maps.errors import MapError
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.manifest import read_manifest
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

KLASS = "hostile map"
REPO = Path(__file__).resolve().parents[2]
LOAD_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 240.0
# `map query` builds a model first (~10 s of CPU each): run it for one kind of each layer, the rest get `map info`
# (which reads the manifest only) and the in-process load.
QUERY_KINDS = ("manifest nested 100000 deep", "metadata edited", "chunk is a FIFO", "chunk links outside",
               "chunk NaN (resealed)", "csv field of 200k characters (resealed)", "index garbage (resealed)")


@pytest.fixture(scope="module")
def fingerprint() -> dict:
    return random_weights().fingerprint.to_dict()  # what `--random-weights` (and the node) use


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, fingerprint: dict) -> Path:
    return make_map(tmp_path_factory.mktemp("pristine") / "good.dinomap", fingerprint)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed, FIFOs not opened): type, and content hash or link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                state[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                state[str(p.relative_to(root))] = ("link", os.readlink(p))
            else:
                state[str(p.relative_to(root))] = ("other", stat.S_IFMT(st.st_mode))
    return state


def load_with_timeout(path: Path, **kwargs: object) -> tuple[object, bool]:
    """(the loaded map or the exception, hung): load in a thread so that a blocking open cannot stall the suite."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(load_map(path, **kwargs))
        except BaseException as exc:  # recorded and asserted on by the caller
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LOAD_TIMEOUT_S)
    return (box[0] if box else None), t.is_alive()


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "dinomix_ros.cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_all(commands: dict[str, list[str]], parallel: int = 3) -> dict[str, tuple[int | None, str, str]]:
    """Run CLI commands, ``parallel`` at a time: name -> (exit code or None if it hung, stdout, stderr)."""
    results, pending, running = {}, list(commands.items()), {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            running[name] = (cli(*args), time.monotonic())
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started < CLI_TIMEOUT_S:
                continue
            if proc.poll() is None:
                proc.kill()
                out, err = proc.communicate()
                results[name] = (None, out, err)
            else:
                out, err = proc.communicate()
                results[name] = (proc.returncode, out, err)
            del running[name]
        time.sleep(0.05)
    return results


def one_line_error(result: tuple[int | None, str, str]) -> str | None:
    """Why a CLI result is not a clean refusal (exit 2, one ERROR line, no traceback, nothing on stdout), or None."""
    code, out, err = result
    errors = [line for line in err.splitlines() if line.startswith("dinomix: error: ")]
    if code != 2:
        return f"exit {code}"
    if "Traceback" in err or len(errors) != 1 or out.strip():
        return f"not one error line: {err[-600:]!r}"
    return None


def test_hostile_maps_are_refused_by_load_and_the_cli(pristine: Path, tmp_path: Path, fault_probe) -> None:
    query_image = tmp_path / "query.png"
    cv2.imwrite(str(query_image), np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    count = len(hostile_kinds(tmp_path))
    assert count >= 30
    failures, commands, probes = [], {}, {}
    for i in range(count):
        outside = tmp_path / f"k{i:02d}" / "outside"  # the probe's own: link targets, sentinel, payload marker
        outside.mkdir(parents=True)
        (outside / "sentinel.bin").write_bytes(os.urandom(4096))
        name, damage, refusal = hostile_kinds(outside)[i]
        work = tmp_path / f"k{i:02d}" / "m.dinomap"
        shutil.copytree(pristine, work, symlinks=True)
        damage(work, outside)
        before = tree_state(outside)
        outcome, hung = load_with_timeout(work)
        lost = 0
        problems = []
        if hung:
            problems.append("load hung")
        elif refusal is None:
            if not isinstance(outcome, KeyframeMap):
                problems.append(f"expected to load, got {outcome!r}")
            else:
                lost = ROWS - len(outcome)
                outcome.add(np.eye(1, outcome.descriptor_dim, dtype=np.float32), stamps_ns=[10**12], cameras="front",
                            frame_ids="map")
                save_map(outcome, work)  # a map that loads takes a save (appending)
                again, _ = load_with_timeout(work)
                if not isinstance(again, KeyframeMap) or len(again) != ROWS + 1:
                    problems.append(f"after a save: {again!r}")
        elif not isinstance(outcome, MapError):
            problems.append(f"expected a MapError, got {outcome!r}")
        elif not re.search(refusal, str(outcome)) or "\n" in str(outcome) or len(str(outcome)) > 1000:
            problems.append(f"message {str(outcome)[:400]!r} does not match {refusal!r} on one short line")
        try:
            read_manifest(work)
            info_fails = False
        except MapError:
            info_fails = True
        probes[name] = (work, outside, before, info_fails, refusal, problems, hung, lost)
        commands[f"info {name}"] = ["map", "info", str(work)]
        if name in QUERY_KINDS:
            commands[f"query {name}"] = ["map", "query", str(work), str(query_image), "--random-weights",
                                         "--device", "cpu", "--quiet"]
    results = run_all(commands)
    for name, (work, outside, before, info_fails, refusal, problems, hung, lost) in probes.items():
        info = results[f"info {name}"]
        hung = hung or info[0] is None
        why = one_line_error(info) if info_fails else (None if info[0] == 0 else f"exit {info[0]}: {info[2][-400:]}")
        if why:
            problems.append(f"map info: {why}")
        if f"query {name}" in results:
            query = results[f"query {name}"]
            hung = hung or query[0] is None
            why = one_line_error(query) if refusal else (None if query[0] == 0 else f"exit {query[0]}")
            if why:
                problems.append(f"map query: {why}")
        touched = tree_state(outside) != before or pickle_marker(outside).exists()
        if touched:
            problems.append("something outside the map changed")
        crashed = any(r[0] not in (0, 2, None) or "Traceback" in r[2] for k, r in results.items() if k.endswith(name))
        fault_probe(KLASS, name, crashed=crashed, hung=hung, keyframes_lost=lost, outside_touched=touched)
        failures += [f"{name}: {p}" for p in problems]
    assert not failures, "\n".join(failures)
    assert load_map(pristine).ids.tolist() == list(range(ROWS))  # the original was never touched


def test_hostile_lock_entries_refuse_the_save_and_touch_nothing_outside(
        pristine: Path, tmp_path: Path, fault_probe) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    failures = []
    for i, (name, damage) in enumerate(lock_kinds()):
        work = tmp_path / f"l{i}" / "m.dinomap"
        shutil.copytree(pristine, work, symlinks=True)
        watched = damage(work, outside)
        before = tree_state(outside)
        m = load_map(work)
        m.add(np.eye(1, m.descriptor_dim, dtype=np.float32), stamps_ns=[10**12], cameras="front", frame_ids="map")
        box: list[object] = []
        t = threading.Thread(target=lambda: box.append(_try(lambda: save_map(m, work, lock_timeout_s=2.0))),
                             daemon=True)
        t.start()
        t.join(LOAD_TIMEOUT_S)
        hung = t.is_alive()
        touched = tree_state(outside) != before
        fault_probe(KLASS, name, hung=hung, outside_touched=touched)
        outcome = box[0] if box else None
        if hung or not isinstance(outcome, MapError) or "is not a regular file" not in str(outcome):
            failures.append(f"{name}: hung={hung}, {outcome!r}")
        if touched or (watched is not None and watched.name == "created-by-lock" and os.path.lexists(watched)):
            failures.append(f"{name}: something outside changed")
        if len(load_map(work)) != ROWS:  # the committed map is intact
            failures.append(f"{name}: committed map changed")
        assert len(m) == ROWS + 1  # the unsaved keyframe is still in memory
    assert not failures, "\n".join(failures)


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # the outcome is asserted by the caller
        return exc
