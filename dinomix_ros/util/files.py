"""Crash-safe file writing: write beside the target, fsync, then rename over it; and directory fsync.

This module is the one place that writes files atomically (:func:`atomic_path`) and makes renames durable
(:func:`fsync_dir`). Everything that must never leave a half-written file uses it: maps, checkpoints, reports, plots.

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
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TMP_PREFIX", "atomic_path", "fsync_dir"]

logger = logging.getLogger(__name__)

#: Name prefix of every temporary file :func:`atomic_path` creates.
TMP_PREFIX = ".tmp-"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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
    created if missing; the new file gets the mode ``open()`` would give it (0o666 less the umask).

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
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666))  # never reuse an existing file
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(target.parent)
