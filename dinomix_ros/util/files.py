"""Crash-safe file writing: write beside the target, fsync, then rename over it; directory fsync; output checks.

This module is the one place that writes files atomically (:func:`atomic_path`) and makes renames durable
(:func:`fsync_dir`). Everything that must never leave a half-written file uses it: maps, checkpoints, reports, plots.
New files get the mode ``open()`` gives (0o666 less the umask: 0644 under the usual umask 022), so another account
(a robot's service user, a colleague) can read them as it reads the maps.

:func:`check_output_file` and :func:`check_output_dir` refuse an output that cannot be written (a directory where a
file is expected, a wrong extension, a place this process cannot create files in) before any work starts, so a long
run never ends in an errno about a temporary file.

Temporary files are created in the target's own directory (a rename is atomic only within one file system), named
``.tmp-<target name>.<random hex>`` (:data:`TMP_PREFIX`), so a crash leaves at most such a hidden file behind. The map
storage deletes ``.tmp-*`` leftovers in a map directory on its next save; elsewhere they are harmless and can be
deleted by hand.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TMP_PREFIX", "OutputPathError", "atomic_path", "fsync_dir", "check_output_file", "check_output_dir"]

logger = logging.getLogger(__name__)

#: Name prefix of every temporary file :func:`atomic_path` creates.
TMP_PREFIX = ".tmp-"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputPathError(ValueError):
    """An output path that cannot be written as asked (a directory, a wrong extension, a read-only place)."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames, creations and deletions done inside ``directory`` durable (fsync of the directory).

    Error policy: errors propagate. A rename is a commit only once the directory entry is on disk; a writer that
    cannot make it durable (EIO, ENOSPC, a directory it cannot open) must not report the write as saved, so the
    caller sees the ``OSError``. The one tolerated error is ``EINVAL`` from ``fsync`` itself: POSIX lets a file system
    refuse to sync a directory (some network and FUSE file systems do), and there it is not a failure of this write
    but a property of the file system, which offers no stronger guarantee to ask for; it is logged at debug level.

    Args:
        directory: The directory whose entries changed.

    Raises:
        OSError: The directory cannot be opened, or fsync failed with anything but ``EINVAL``.
    """
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        logger.debug("%s: this file system cannot fsync a directory (%s); renames in it are not forced to disk",
                     directory, exc)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``target``; on success it is fsynced and renamed onto ``target``.

    Write the temporary file by path inside the ``with`` block (and close it there). A crash at any point leaves
    either the old ``target`` or the new one, never a partial file. On an exception (or ``KeyboardInterrupt``) the
    temporary file is removed, ``target`` is untouched, and the exception propagates. The target's directory is
    created if missing; the new file gets the mode ``open()`` would give it (0o666 less the umask), even when the
    writer replaced the temporary file with one of another mode.

    Args:
        target: The file to write.
        sync_dir: Fsync the directory after the rename, so the new file survives a power cut once the block exits.
            Pass False only to batch several renames in one directory, and call :func:`fsync_dir` yourself before
            relying on them (the map storage does this before it commits a manifest that names them).

    Yields:
        The temporary file's path, in ``target``'s directory, named ``.tmp-<target name>.<random hex>``.

    Raises:
        OSError: Creating, fsyncing or renaming the file failed (the target is untouched), or fsyncing the directory
            failed after the rename (see :func:`fsync_dir`): then the new file may be in place but is not known to be
            durable, and the caller must not report it as saved.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)  # never reuse an existing file
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as open() gives
    finally:
        os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
            # Some writers replace the file by path with one of their own (safetensors' save_file makes it 0600):
            # the target gets the mode of the file created above all the same.
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def check_output_file(path: str | os.PathLike[str], suffixes: tuple[str, ...], *, what: str) -> Path:
    """Refuse an output file that cannot be written, before any work: call it first, then write with atomic_path.

    Args:
        path: the file to write (it may exist: it is replaced).
        suffixes: accepted extensions, lower case with the dot (``(".npy",)``); compared case-insensitively.
        what: how the user named it, for messages (``--out``, ``OUT``).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputPathError: ``path`` is a directory, has another extension, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; expected a file name such as "
                              f"{path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{what} {path} has the extension {path.suffix or '(none)'!r}; expected "
                              f"{' or '.join(suffixes)} (the file is written in that format)")
    _check_writable_folder(path.parent, what, path)
    return path


def check_output_dir(path: str | os.PathLike[str], *, what: str) -> Path:
    """Refuse an output folder that cannot be written, before any work (it may exist, or is created later).

    Args:
        path: the folder to write into.
        what: how the user named it, for messages (``--out``, ``OUT``).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputPathError: ``path`` is an existing file, or it (or its nearest existing parent) cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file; expected a folder (a new path, or an existing folder)")
    _check_writable_folder(path, what, path)
    return path


def _check_writable_folder(folder: Path, what: str, target: Path) -> None:
    """``folder``, or its nearest existing parent (where the missing folders will be made), takes new files."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{what} {target}: {existing} is a file, so the folder {folder} cannot be created; "
                              "choose another path")
    # A real probe, not os.access: root passes every access() check, yet cannot create files on /proc or /sys or
    # a read-only mount. The probe carries the temporary-file prefix, so a crash leaves only such a file behind.
    probe = existing / f"{TMP_PREFIX}probe.{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600))
    except OSError as exc:
        raise OutputPathError(f"{what} {target}: cannot create files in {existing} ({exc.strerror}); choose a "
                              "folder you can write to") from None
    os.unlink(probe)
