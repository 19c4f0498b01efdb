"""Tests for dinomix_ros.util.files: the one atomic-write helper and the directory fsync error policy."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from dinomix_ros.util import files
from dinomix_ros.util.files import TMP_PREFIX, atomic_path, fsync_dir

REAL_FSYNC = os.fsync


def failing_fsync(code: int, *, directories: bool) -> Callable[[int], None]:
    """An os.fsync that fails with ``code`` on directories (or on regular files) and syncs everything else."""

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) == directories:
            raise OSError(code, f"{os.strerror(code)} (injected)")
        REAL_FSYNC(fd)

    return fsync


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_atomic_path_writes_beside_the_target_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.json"  # the folder is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(f"{TMP_PREFIX}report.json.")
        assert tmp.exists() and tmp.read_bytes() == b""  # created empty, exclusively, by the helper
        tmp.write_text("new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # like open(), not mkstemp's 0o600


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_in_the_block_removes_the_temp_file_and_keeps_the_target(
    tmp_path: Path, error: type[BaseException]
) -> None:
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    inode = target.stat().st_ino
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise error("writer failed")
    assert target.read_text() == "old" and target.stat().st_ino == inode
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_failed_file_fsync_or_rename_keeps_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "plot.png"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", failing_fsync(errno.EIO, directories=False))
    with pytest.raises(OSError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert caught.value.errno == errno.EIO
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["plot.png"]
    monkeypatch.undo()

    occupied = tmp_path / "occupied"  # a non-empty directory cannot be replaced by a file
    (occupied / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        with atomic_path(occupied) as tmp:
            tmp.write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["occupied", "plot.png"] and os.listdir(occupied) == ["inside"]


def test_fsync_dir_propagates_errors_except_einval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    fsync_dir(tmp_path)  # a real directory on a real file system
    before = open_fds()
    for code in (errno.EIO, errno.ENOSPC, errno.EROFS):
        monkeypatch.setattr(os, "fsync", failing_fsync(code, directories=True))
        with pytest.raises(OSError) as caught:
            fsync_dir(tmp_path)
        assert caught.value.errno == code
    assert open_fds() == before  # the directory is closed on failure too

    caplog.set_level(logging.DEBUG, logger="dinomix_ros.util.files")
    monkeypatch.setattr(os, "fsync", failing_fsync(errno.EINVAL, directories=True))
    assert fsync_dir(tmp_path) is None  # the file system cannot sync directories: tolerated, not an error
    assert "cannot fsync a directory" in caplog.text
    assert open_fds() == before
    monkeypatch.undo()

    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")


def test_directory_fsync_is_after_the_rename_and_its_failure_propagates(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    synced: list[tuple[Path, bool]] = []
    monkeypatch.setattr(files, "fsync_dir", lambda d: synced.append((Path(d), target.exists())))
    with atomic_path(target) as tmp:
        tmp.write_text("1")
    assert synced == [(tmp_path, True)]
    with atomic_path(target, sync_dir=False) as tmp:  # the caller batches renames and fsyncs the folder itself
        tmp.write_text("2")
    assert synced == [(tmp_path, True)] and target.read_text() == "2"
    monkeypatch.undo()

    # The rename happened but is not known to be durable: the caller hears about it instead of reporting success.
    monkeypatch.setattr(os, "fsync", failing_fsync(errno.EIO, directories=True))
    with pytest.raises(OSError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("3")
    assert caught.value.errno == errno.EIO
    assert target.read_text() == "3" and os.listdir(tmp_path) == ["report.json"]


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_files_follow_the_umask_even_when_the_writer_replaces_the_temp_file(
        tmp_path: Path, umask: int, expected: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "plain.json") as tmp:
            tmp.write_text("{}")
        with atomic_path(tmp_path / "replaced.safetensors") as tmp:  # as safetensors' save_file does: 0600
            (tmp.parent / "own").write_bytes(b"data")
            os.chmod(tmp.parent / "own", 0o600)
            os.replace(tmp.parent / "own", tmp)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "replaced.safetensors").stat().st_mode) == expected


def test_output_checks_refuse_what_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert files.check_output_file(tmp_path / "new" / "deeper" / "d.NPY", (".npy",), what="--out") == \
        tmp_path / "new" / "deeper" / "d.NPY"  # missing folders are made later; the extension is case-blind
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["file"]  # the probe is gone
    with pytest.raises(files.OutputPathError, match=r"--out .* is a directory; expected a file name such as"):
        files.check_output_file(tmp_path, (".npy",), what="--out")
    with pytest.raises(files.OutputPathError, match=r"has the extension '\.txt'; expected \.npy or \.npz"):
        files.check_output_file(tmp_path / "d.txt", (".npy", ".npz"), what="--out")
    with pytest.raises(files.OutputPathError, match=r"has the extension '\(none\)'"):
        files.check_output_file(tmp_path / "d", (".npy",), what="--out")
    with pytest.raises(files.OutputPathError, match=r"file is a file, so the folder .* cannot be created"):
        files.check_output_file(tmp_path / "file" / "d.npy", (".npy",), what="--out")
    assert files.check_output_dir(tmp_path / "run", what="--out") == tmp_path / "run"
    assert files.check_output_dir(tmp_path, what="--out") == tmp_path
    with pytest.raises(files.OutputPathError, match=r"OUT .*file is a file; expected a folder"):
        files.check_output_dir(tmp_path / "file", what="OUT")
    blocked = Path("/proc/self/dinomix") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(files.OutputPathError, match=r"cannot create files in .*; choose a folder you can write to"):
        files.check_output_dir(blocked, what="--out")
    with pytest.raises(files.OutputPathError, match=r"cannot create files in"):
        files.check_output_file(blocked / "d.npy", (".npy",), what="--out")
    assert isinstance(files.OutputPathError("x"), ValueError)  # the command line reports it as one line
