"""Content checks of a loaded map's chunk files: now, in the background, or when asked (``load_map(verify=...)``).

Loading a map checks at once everything that decides what the map is: the manifest's seal, the keyframe CSV (hashed
and parsed), every file's size and ``.npy`` header, and the search index's files. What remains is the bulk: the
content of the descriptor and local-feature chunks (8 GB for a 1M x 4096 float16 map). :class:`MapIntegrity`
checks it: the sha256 of every block the manifest lists (``block_sha256``, one per ``block_bytes`` of the file; the
whole-file ``sha256`` for a chunk without blocks) and that every descriptor row is a finite unit vector, with the
messages loading always gave. It reads through its own file descriptor (``pread``; the search reads the same inode
through its memory map), in blocks, with one reusable buffer: a check costs one block of RAM, not the map.

* ``verify=True``: :meth:`run` before ``load_map`` returns; a damaged map is refused with :class:`MapFormatError`.
* ``verify="background"``: :meth:`start` runs it in a low-priority daemon thread; the map answers queries meanwhile
  (from data whose sizes and headers were checked). On a mismatch :attr:`error` holds the same refusal and
  :attr:`failed` turns True: users of the map (the node's :class:`~dinomix_ros.localization.live_map.LiveMap`,
  ``dinomix map query``) stop answering from it, and a save can no longer copy it (see
  :func:`~dinomix_ros.maps.storage.save_map`).
* ``verify="deferred"``: nothing runs until :meth:`start` or :meth:`run` (tests; callers that start it later).

Thread-safe: one lock around the state; the check itself runs without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dinomix_ros.maps.errors import MapFormatError
from dinomix_ros.maps.manifest import corrupted
from dinomix_ros.maps.validation import check_unit_rows

__all__ = ["BLOCK_BYTES", "ChunkCheck", "MapIntegrity", "VERIFY_MODES"]

logger = logging.getLogger(__name__)

#: Bytes per block hash written by saves (``block_bytes`` of a chunk record): the unit of a background check.
BLOCK_BYTES = 64 << 20
#: What ``load_map(verify=...)`` takes besides True (check now) and False (never).
VERIFY_MODES = ("background", "deferred")
_NICE = 10  # the check thread's niceness: the node's worker goes first


@dataclass
class ChunkCheck:
    """One chunk file to check: its open file descriptor (owned by the check) and what the manifest says of it.

    Attributes:
        name: file name, for messages.
        fd: open descriptor of the file (closed when the check is done or closed).
        record: the manifest's record (``bytes``, ``sha256``, optional ``block_bytes`` / ``block_sha256``).
        data_offset: where the array starts in the file (after the ``.npy`` header).
        rows: rows in the file.
        dim: row width in elements (descriptor chunks) or 0 (a chunk checked by hash only).
        dtype: element dtype of a descriptor chunk.
        start_row: map row of the file's first row (for messages).
    """

    name: str
    fd: int
    record: dict[str, Any]
    data_offset: int
    rows: int
    dim: int = 0
    dtype: np.dtype | None = None
    start_row: int = 0

    @property
    def descriptors(self) -> bool:
        return self.dim > 0


class MapIntegrity:
    """The content check of a loaded map's chunks (see the module docstring).

    Args:
        directory: the map directory (messages).
        checks: the chunks to check, in map order; their descriptors are closed when done.
        extra: further checks run after the chunks, as ``(bytes they read, check, file descriptor it owns or None)``; a
            check raises :class:`MapFormatError` (e.g. the keyframe CSV disagrees with the binary table loaded).
        quiet: log at debug level only (the index's codes, checked at load).
    """

    def __init__(self, directory: Any, checks: list[ChunkCheck],
                 extra: list[tuple[int, Callable[[], None], int | None]] | None = None, quiet: bool = False) -> None:
        self.directory = str(directory)
        self._checks = list(checks)
        self._extra = list(extra or [])
        self._log = logger.debug if quiet else logger.info
        self._total = sum(c.record["bytes"] for c in self._checks) + sum(e[0] for e in self._extra)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checked = 0
        self._error: MapFormatError | None = None
        self._seconds = 0.0
        self._in_background = False
        if not self._checks and not self._extra:
            self._done.set()

    # ------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        """Every chunk was checked (passed or failed), or the check was closed."""
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> MapFormatError | None:
        """The refusal, once a chunk failed its check."""
        return self._error

    @property
    def progress(self) -> float:
        """Fraction of the chunk bytes checked (1.0 when there is nothing to check)."""
        with self._lock:
            return 1.0 if self._total == 0 else self._checked / self._total

    def check(self) -> None:
        """Raise the refusal when a chunk failed its check (nothing when it passed or is still running)."""
        if self._error is not None:
            raise self._error

    def describe(self) -> str:
        """One line for logs and diagnostics: verified, checking N %, FAILED: why, or not started."""
        if self._error is not None:
            return f"FAILED: {self._error}"
        if self._done.is_set():
            return "verified" if not self._stop.is_set() else "check stopped"
        if self._thread is None:
            return f"not checked yet ({self._total / 2**30:.2f} GiB)"
        return f"checking {100 * self.progress:.0f} % of {self._total / 2**30:.2f} GiB"

    # ------------------------------------------------------------------ running

    def start(self) -> MapIntegrity:
        """Run the check in a low-priority daemon thread (once); returns self."""
        with self._lock:
            if self._thread is not None or self._done.is_set():
                return self
            self._thread = threading.Thread(target=self._background, name="dinomix-map-check", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Check now, in this thread (or wait for a check already running); raise the refusal if a chunk fails."""
        with self._lock:
            mine = self._thread is None and not self._done.is_set()
            if mine:
                self._thread = threading.current_thread()
        if mine:
            self._check_all()
        else:
            self._done.wait()
        self.check()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started check; True when done."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Stop a running check (the map is being replaced) and release the file descriptors."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout=10.0)
        self._release()

    def _background(self) -> None:
        self._in_background = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        except (OSError, AttributeError):  # not Linux, or not permitted: run at normal priority
            pass
        try:
            self._check_all()
        except Exception as exc:  # never let the thread die silently: a failure the check did not foresee
            logger.error("map %s: the integrity check stopped unexpectedly: %s", self.directory, exc)
            with self._lock:
                if self._error is None:
                    self._error = MapFormatError(f"{self.directory}: the integrity check failed to run ({exc})")
            self._done.set()

    def _check_all(self) -> None:
        t0 = time.monotonic()
        buf = bytearray(min(BLOCK_BYTES, max((c.record["bytes"] for c in self._checks), default=0)) or 1)
        try:
            for chunk in self._checks:
                if self._stop.is_set():
                    break
                try:
                    self._check_chunk(chunk, buf)
                except OSError as exc:  # EIO of a failing disk is damage too
                    raise MapFormatError(f"{chunk.name} could not be read ({exc}); restore the map directory from a "
                                         "backup or rebuild the map") from None
            del buf
            for size, check, _ in self._extra:
                if self._stop.is_set():
                    break
                check()
                with self._lock:
                    self._checked += size
        except MapFormatError as exc:
            if not self._stop.is_set():  # (a check stopped by close() may fail on its closed files: not damage)
                with self._lock:
                    self._error = exc
                if self._in_background:  # run() raises it to its caller instead
                    logger.error("map %s: integrity check FAILED: %s", self.directory, exc)
        else:
            self._seconds = time.monotonic() - t0
            if not self._stop.is_set():
                self._log("map %s: %.2f GiB verified in %.1f s", self.directory, self._total / 2**30, self._seconds)
        finally:
            self._release()
            self._done.set()

    def _check_chunk(self, chunk: ChunkCheck, buf: bytearray) -> None:
        rec = chunk.record
        size = rec["bytes"]
        blocks = rec.get("block_sha256")
        block = rec["block_bytes"] if blocks else size
        whole = hashlib.sha256() if not blocks else None
        rows = _RowChecker(chunk) if chunk.descriptors else None
        view = memoryview(buf)
        for i, start in enumerate(range(0, size, max(block, 1))):
            h = hashlib.sha256() if blocks else whole
            end = min(start + block, size)
            pos = start
            while pos < end:
                if self._stop.is_set():
                    return
                n = _pread(chunk.fd, view[: min(len(buf), end - pos)], pos)
                if n == 0:
                    raise corrupted(chunk.name, f"ends at byte {pos}, manifest says {size} bytes")
                part = view[:n]
                h.update(part)
                if rows is not None:
                    rows.feed(part, pos)
                pos += n
                with self._lock:
                    self._checked += n
            if blocks:
                digest = h.hexdigest()
                if digest != blocks[i]:
                    raise corrupted(chunk.name, f"bytes {start}..{end - 1}: sha256 {digest[:12]}..., manifest says "
                                                f"{blocks[i][:12]}...")
                if rows is not None and rows.error is not None:  # a bad row in bytes whose hash matched
                    raise rows.error
        if whole is not None:
            digest = whole.hexdigest()
            if digest != rec["sha256"]:
                raise corrupted(chunk.name, f"sha256 {digest[:12]}..., manifest says {rec['sha256'][:12]}...")
        if rows is not None and rows.error is not None:
            raise rows.error

    def _release(self) -> None:
        with self._lock:
            fds = [c.fd for c in self._checks] + [e[2] for e in self._extra if e[2] is not None]
            self._checks, self._extra = [], []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class _RowChecker:
    """Checks that the descriptor rows streamed through it (file bytes, in order) are finite unit vectors; the first
    bad row is kept in :attr:`error` (raised once the bytes' hash matched: damage is reported as damage first)."""

    def __init__(self, chunk: ChunkCheck) -> None:
        self.chunk = chunk
        self.row_bytes = chunk.dim * chunk.dtype.itemsize
        self.carry = b""
        self.next_row = 0
        self.error: MapFormatError | None = None

    def feed(self, part: memoryview, pos: int) -> None:
        lo = self.chunk.data_offset
        if self.error is not None or pos + len(part) <= lo:
            return
        data = part[max(lo - pos, 0):]
        if self.carry:
            data = memoryview(self.carry + bytes(data))
        whole = len(data) // self.row_bytes
        if whole:
            arr = np.frombuffer(data[: whole * self.row_bytes], dtype=self.chunk.dtype).reshape(whole, self.chunk.dim)
            first, name, start = self.next_row, self.chunk.name, self.chunk.start_row
            try:
                check_unit_rows(arr, lambda i: f"{name} row {first + i} (map row {start + first + i})",
                                MapFormatError, hint="; the file is not a dinomix descriptor chunk (edited or "
                                                     "damaged): restore the map directory from a backup or rebuild "
                                                     "the map")
            except MapFormatError as exc:
                self.error = exc
            self.next_row += whole
        self.carry = bytes(data[whole * self.row_bytes:])


def _pread(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` (one call; may read less)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
