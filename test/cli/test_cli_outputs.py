"""What ``dinomix`` commands write, as another account sees it: modes that follow the umask, sidecars named after
their output, and outputs refused before any work when they cannot be written."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cliutil import MODEL, run_error, run_json

from dinomix_ros.cli.main import main


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one, or for root (whom permissions do not stop)
    a place in /proc."""
    if os.geteuid() == 0:
        return Path("/proc/self/dinomix-test")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    return folder


def test_every_output_is_readable_by_others_under_umask_022(
        tmp_path: Path, corridor_subset: Path, capsys: pytest.CaptureFixture, umask_022: None) -> None:
    images = sorted(corridor_subset.iterdir())
    assert main(["describe", *map(str, images[:2]), "--out", str(tmp_path / "desc.npy"), *MODEL]) == 0
    run_json(capsys, "map", "build", tmp_path / "m.dinomap", "--images", corridor_subset, "--geotags", "none",
             "--index", "hnsw", *MODEL)
    run_json(capsys, "map", "eval", "--images", corridor_subset, "--loop-gt", _loop_gt(tmp_path, len(images)),
             "--exclude-recent-count", "0", "--out", tmp_path / "ev", *MODEL)
    from dinomix_ros.model import random_model, save_model

    save_model(random_model("vits14", 0), tmp_path / "weights.safetensors")
    written = [tmp_path / "desc.npy", tmp_path / "desc.npy.json", tmp_path / "weights.safetensors",
               *sorted((tmp_path / "ev").iterdir()), *sorted((tmp_path / "m.dinomap").iterdir())]
    assert {p.name for p in written} >= {"report.json", "pr.png", "recall.png", "similarity.png", "manifest.json"}
    assert any(p.suffix == ".faiss" or "index" in p.name for p in written)
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o644) for p in written}
    assert mode(tmp_path / "ev") == 0o755 and mode(tmp_path / "m.dinomap") == 0o755


def _loop_gt(tmp_path: Path, n: int) -> Path:
    from PIL import Image

    path = tmp_path / "gt.bmp"
    Image.fromarray(np.zeros((n, n), np.uint8), mode="L").save(path)
    return path


def test_describe_sidecar_is_named_after_its_output(tmp_path: Path, corridor_subset: Path) -> None:
    image = str(next(iter(sorted(corridor_subset.iterdir()))))
    (tmp_path / "desc.json").write_text('{"mine": true}')  # e.g. the sidecar of an earlier desc.npz, or a user file
    assert main(["describe", image, "--out", str(tmp_path / "desc.npy"), *MODEL]) == 0
    assert main(["describe", image, "--out", str(tmp_path / "desc.2.npy"), *MODEL]) == 0
    assert json.loads((tmp_path / "desc.json").read_text()) == {"mine": True}  # untouched
    assert json.loads((tmp_path / "desc.npy.json").read_text())["images"] == [image]
    assert (tmp_path / "desc.2.npy.json").is_file()


def test_outputs_are_refused_before_the_inputs_are_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A huge input list of images that do not exist: had the inputs been read first, the error would name an
    image. It names the output, so the output was checked first, whatever the input size."""
    huge = [str(tmp_path / "nowhere" / f"{i:06d}.jpg") for i in range(200_000)]
    blocked = unwritable_folder(tmp_path)

    def error(*argv: str | Path) -> str:
        return run_error(capsys, caplog, *argv)

    assert error("describe", *huge, "--out", tmp_path, *MODEL) == \
        f"--out {tmp_path} is a directory; expected a file name such as {tmp_path / 'out.npy'}"
    assert error("describe", *huge, "--out", tmp_path / "desc.txt", *MODEL) == \
        f"--out {tmp_path / 'desc.txt'} has the extension '.txt'; expected .npy (the file is written in that format)"
    assert error("describe", *huge, "--out", blocked / "desc.npy", *MODEL).startswith(
        f"--out {blocked / 'desc.npy'}: cannot create files in ")
    (tmp_path / "desc.npy.json").mkdir()
    assert "--out's sidecar" in error("describe", *huge, "--out", tmp_path / "desc.npy", *MODEL)

    # map build: OUT a file, a folder of other files, or unwritable; --images a folder that does not exist.
    (tmp_path / "file.dinomap").write_text("x")
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "README.md").write_text("my maps")
    missing = tmp_path / "no-such-folder"
    assert error("map", "build", tmp_path / "file.dinomap", "--images", missing, *MODEL) == \
        f"OUT {tmp_path / 'file.dinomap'} is a file; expected a folder (a new path, or an existing folder)"
    assert error("map", "build", tmp_path / "maps", "--images", missing, *MODEL).startswith(
        f"OUT {tmp_path / 'maps'} is a folder that holds other files, not a map")
    assert "cannot create files in" in error("map", "build", blocked / "m.dinomap", "--images", missing, *MODEL)
    # map eval --out and model convert OUT.
    assert error("map", "eval", "--images", missing, "--loop-gt", missing / "gt.bmp", "--out",
                 tmp_path / "file.dinomap", *MODEL).startswith(f"--out {tmp_path / 'file.dinomap'} is a file")
    assert error("model", "convert", missing / "w.ckpt", tmp_path / "w.pt") == \
        f"OUT {tmp_path / 'w.pt'} has the extension '.pt'; expected .safetensors (the file is written in that format)"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["desc.npy.json", "file.dinomap", "maps"] + (["read-only"] if os.geteuid() else [])


@pytest.mark.parametrize("argv", [
    ["describe", "HUGE", "--out", "{tmp}", "--random-weights"],
    ["describe", "HUGE", "--out={tmp}/desc.txt", "--random-weights"],
    ["map", "build", "{tmp}/file.dinomap", "--random-weights", "--images", "HUGE"],
    ["map", "eval", "--database", "HUGE", "--out", "{tmp}/file.dinomap", "--random-weights"],
])
def test_a_wrong_output_is_refused_before_torch_is_imported(tmp_path: Path, argv: list[str]) -> None:
    """Declaring the model flags imports torch (seconds on a small CPU): the output is checked before, from the raw
    arguments, so the refusal takes well under a second whatever the number of inputs."""
    import subprocess
    import sys

    (tmp_path / "file.dinomap").write_text("x")
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        "from dinomix_ros.cli.main import main\n"
        f"argv = {[a.replace('{tmp}', str(tmp_path)) for a in argv]!r}\n"
        "i = argv.index('HUGE')\n"
        "argv[i:i + 1] = [f'/nowhere/{k:06d}.jpg' for k in range(200_000)]\n"
        "code = main(argv)\n"
        "print(code, 'torch' in sys.modules, round(time.perf_counter() - t0, 2))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(repo)),
                         capture_output=True, text=True)
    code_, torch_loaded, seconds = out.stdout.split()
    assert (code_, torch_loaded) == ("2", "False"), (out.stdout, out.stderr)
    assert out.stderr.startswith("dinomix: error: ") and str(tmp_path) in out.stderr and "\n" == out.stderr[-1]
    assert out.stderr.count("\n") == 1, f"{out.stderr} ({seconds} s)"
