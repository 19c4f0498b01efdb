"""On-disk storage of keyframe maps: atomic generations in a map directory, append-only chunks, the writers' lock.

:func:`save_map` writes a :class:`~dinomix_ros.maps.keyframes.KeyframeMap`; verified loading,
:func:`~dinomix_ros.maps.loading.load_map`, is :mod:`dinomix_ros.maps.loading`. The table imports neither: loading and
saving are functions over it. A map is a directory a person can inspect with
standard tools (see ``maps/README.md``)::

    office.dinomap/
      manifest.json                  format, version, generation, counts, fingerprint, metadata, and every file's
                                     row count, byte size and sha256 (the single commit point; :mod:`.manifest`)
      keyframes.g000003.csv          one row per keyframe (ids, stamps, camera, frame, pose, GPS, UTM, source;
                                     :mod:`.keyframe_csv`)
      descriptors.g000001.npy        (rows, D) little-endian float16/float32, C order; append-only chunks, one per
      descriptors.g000003.npy        save that added rows, named by the generation that wrote it
      index.g000003.faiss            optional search index blob (always rebuildable from the descriptors)
      .lock                          advisory lock file (fcntl.flock) taken by writers

Atomicity: a save writes every new file under a temporary name (``.tmp-*``) in the map directory, fsyncs it and
renames it to a name that no committed manifest references (names carry a generation number larger than any in the
directory), fsyncs the directory, then writes ``manifest.json`` the same way: the ``os.replace`` onto
``manifest.json`` is the commit point. Only after the directory is fsynced again are files that the new manifest no
longer references deleted. A crash at any moment therefore leaves either the old or the new manifest, and every file
that manifest references is complete; leftovers are unreferenced and are removed by the next successful save. Every
file is written through :func:`dinomix_ros.util.files.atomic_path`, hashed while it is written.

Concurrency: writers take an exclusive ``fcntl.flock`` on ``<map>/.lock`` (Linux/POSIX, local file systems; flock is
not reliable on NFS) for the whole save, so two processes never interleave. A writer also refuses to append when the
map on disk changed since it loaded or last saved it (:class:`MapConflictError`) instead of silently dropping the
other writer's rows. Readers take no lock: a reader whose files vanish under it because a writer committed a newer
generation re-reads the manifest and retries (:mod:`~dinomix_ros.maps.loading`).

What an object knows is committed: each :class:`KeyframeMap` carries, in its ``_storage_state`` attribute (owned by
this module and :mod:`~dinomix_ros.maps.loading`, opaque to the table), a ``{realpath of map directory:
_DiskState}`` dict recording the generation, row count, chunk records and index record it last loaded or committed
there. A save appends only when that record matches the manifest on disk; it is updated at the commit point, so a
save that fails after committing still appends next time.

Nothing here uses pickle: the manifest is JSON, keyframes are CSV, descriptor chunks are parsed with
:mod:`numpy.lib.format` header readers (float dtypes only) and memory-mapped from the already verified file
descriptor (:mod:`~dinomix_ros.maps.loading`), and the index is raw bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinomix_ros.maps.errors import MapConflictError, MapError, MapFormatError, MapLockedError, MapNotFoundError
from dinomix_ros.maps.integrity import BLOCK_BYTES
from dinomix_ros.maps.keyframe_csv import write_csv
from dinomix_ros.maps.keyframe_table import sources_bytes, table_records
from dinomix_ros.maps.keyframes import KeyframeMap, utc_now_iso
from dinomix_ros.maps.local_features import slot_dtype
from dinomix_ros.maps.manifest import (
    MANIFEST, claimed_generation, generation_file, generation_of, listed_files, manifest_bytes, new_manifest,
    read_manifest,
)
from dinomix_ros.maps.validation import STORAGE_DTYPES, check_fingerprint, check_metadata, check_same_model
from dinomix_ros.util.files import TMP_PREFIX, atomic_path, fsync_dir

__all__ = ["LOCK_FILE", "save_map"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_IO_BLOCK = 8 << 20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class _DiskState:
    """What an object knows is committed at one map directory (used to append and to detect other writers)."""

    generation: int
    rows: int
    chunks: list[dict[str, Any]]
    index: dict[str, Any] | None
    features: list[dict[str, Any]] | None = None  # local-feature chunk records (format 2), None without


@dataclass(frozen=True)
class _SavePlan:
    """What one save writes: its generation, and the committed state it appends to (if any)."""

    generation: int
    base: _DiskState | None  # what this object committed at the directory, when the save may build on it
    append: bool  # keep base's chunks and write only the rows added since

    @property
    def start(self) -> int:
        """First row the new descriptor chunk holds."""
        return self.base.rows if self.append and self.base is not None else 0


def _known(kmap: KeyframeMap, key: str) -> _DiskState | None:
    """What ``kmap`` knows is committed at the map directory whose real path is ``key``."""
    states = kmap._storage_state
    return None if states is None else states.get(key)


def _remember(kmap: KeyframeMap, key: str, state: _DiskState) -> None:
    """Record that ``state`` is committed at ``key`` (right after the commit point, or after loading it)."""
    if kmap._storage_state is None:
        kmap._storage_state = {}
    kmap._storage_state[key] = state


# ---------------------------------------------------------------------- save


def save_map(
    kmap: KeyframeMap,
    path: str | os.PathLike[str],
    index_blob: np.ndarray | bytes | None = None,
    index_kind: str | None = None,
    *,
    overwrite: bool = False,
    compact: bool = False,
    lock_timeout_s: float = 30.0,
) -> Path:
    """Save the map ``kmap`` atomically to the map directory ``path`` (created if missing).

    If ``kmap`` loaded or last saved ``path`` and nobody changed it since, the save appends: it writes one new
    descriptor chunk with the rows added since (none if none were added), a new keyframe CSV and manifest, and
    never touches the existing chunk files. Otherwise it writes everything (one chunk).

    Args:
        kmap: The map.
        path: Map directory, e.g. ``maps/office.dinomap``.
        index_blob: Optional serialized search index built over all current rows (see :meth:`KeyframeMap.set_index`).
            Without one, a previously attached or saved index is kept while it still covers all rows and
            dropped (logged) once rows were added.
        index_kind: Kind of ``index_blob``; required with it.
        overwrite: Replace a map at ``path`` that ``kmap`` did not load/save, or that another writer changed.
        compact: Rewrite all descriptors into a single chunk (and delete the old chunks after the commit).
        lock_timeout_s: How long to wait for another writer's lock.

    Returns:
        The map directory.

    Raises:
        MapError: ``path`` holds a different map and ``overwrite`` is False, or the metadata is not JSON-able.
        MapConflictError: The map at ``path`` changed on disk since ``kmap`` loaded/saved it.
        MapMismatchError: Appending to a map made by another model (the fingerprint id was changed).
        MapFormatError: The existing manifest is unreadable or newer, and ``overwrite`` is False.
        MapLockedError: Another process held the lock for ``lock_timeout_s``.
        OSError: Writing failed (disk full, permissions); the previous map is left intact. Or fsyncing the map
            directory failed after the commit (see :func:`dinomix_ros.util.files.fsync_dir`): the new generation
            may be in place but is not known to be durable; ``kmap`` stays in step with it, so saving again
            appends.
    """
    t0 = time.monotonic()
    _check_savable(kmap, index_blob, index_kind)
    directory = _map_directory(path)
    key = os.path.realpath(directory)
    with _DirLock(directory, lock_timeout_s):
        plan = _plan_save(kmap, directory, key, overwrite=overwrite, compact=compact)
        _check_copied_content(kmap, plan)
        manifest = _commit_generation(kmap, directory, key, plan)
        removed = _remove_unreferenced(directory, _referenced(manifest))
        if removed:
            fsync_dir(directory)
    files = manifest["files"]
    logger.info("saved map %s: generation %d, %d keyframes (%s), %d chunk(s), index %s, %d file(s) removed, "
                "%.3f s", directory, plan.generation, len(kmap),
                f"+{len(kmap) - plan.start} appended" if plan.append else "full write", len(files["descriptors"]),
                files["index"]["file"] if files["index"] else "none", removed, time.monotonic() - t0)
    return directory


def _check_savable(kmap: KeyframeMap, index_blob: np.ndarray | bytes | None, index_kind: str | None) -> None:
    """Refuse a fingerprint or metadata changed into something unsavable; attach ``index_blob`` if given."""
    check_fingerprint(kmap.fingerprint, "fingerprint", MapError)
    if kmap.fingerprint["descriptor_dim"] != kmap.descriptor_dim:
        raise MapError(f"fingerprint['descriptor_dim'] is {kmap.fingerprint['descriptor_dim']} but the map holds "
                       f"{kmap.descriptor_dim}-d descriptors; restore the fingerprint the map was created with")
    check_metadata(kmap.metadata, "metadata", MapError)
    if index_blob is not None:
        if index_kind is None:
            raise MapError("index_blob given without index_kind; pass e.g. index_kind='faiss_flat_ip'")
        kmap.set_index(index_blob, index_kind)
    elif index_kind is not None:
        raise MapError("index_kind given without index_blob")


def _check_copied_content(kmap: KeyframeMap, plan: _SavePlan) -> None:
    """A save that copies loaded rows into new files (a full write, or local features rewritten) must not launder a
    damaged chunk into a freshly hashed one: finish the map's pending content check first (refused if it failed).
    An append copies nothing: it stays possible on a map whose check failed (the damaged chunk keeps its hashes)."""
    integrity = kmap.integrity
    if integrity is None:
        return
    base = plan.base if plan.append else None
    store = kmap.local_features
    rewrites_features = store is not None and plan.append and base is not None and (
        base.features is None or not _feature_slots(base.features, store.slots)) and base.rows > 0
    if plan.append and not rewrites_features:
        return
    try:
        integrity.run()
    except MapFormatError as exc:
        raise MapFormatError(f"not saved: this save would copy the loaded map's rows into new files, and the map is "
                             f"damaged ({exc}). Restore the map directory from a backup (saving back to it, which "
                             "appends, still works)") from None


def _map_directory(path: str | os.PathLike[str]) -> Path:
    """The map directory at ``path``, created (durably) if missing."""
    directory = Path(path)
    if not directory.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
    elif not directory.is_dir():
        raise MapError(f"{directory} exists and is not a directory; a map is saved as a directory "
                       "(e.g. maps/office.dinomap)")
    return directory


def _plan_save(kmap: KeyframeMap, directory: Path, key: str, *, overwrite: bool, compact: bool) -> _SavePlan:
    """Check that ``kmap`` may be saved into ``directory`` (the caller holds the lock) and choose the generation."""
    disk, disk_gen = _existing_manifest(directory, overwrite)
    known = _known(kmap, key)
    ours = disk is not None and not overwrite  # checked below: this object wrote what is committed
    if ours:
        if known is None:
            raise MapError(
                f"{directory} already holds a map ({disk['count']} keyframes, generation "
                f"{disk['generation']}, model {disk['fingerprint'].get('id')}) that this object did not load; "
                "load it and add to it, choose a new path, or pass overwrite=True to replace it"
            )
        if disk["generation"] != known.generation or disk["files"]["descriptors"] != known.chunks:
            raise MapConflictError(
                f"{directory} changed on disk since this object loaded or saved it (generation "
                f"{disk['generation']} on disk, {known.generation} expected): another process saved it. "
                "Load it again and re-add your keyframes, or pass overwrite=True to replace it"
            )
        check_same_model(disk["fingerprint"], kmap.fingerprint, f"the map at {directory}")
    # Above every generation in the directory, leftovers included, so no name is ever reused.
    generation = max(disk_gen, _max_file_generation(directory)) + 1
    if disk is not None:
        # Leftovers of a crashed save are unreferenced by the committed manifest: safe to delete under the lock.
        _remove_unreferenced(directory, _referenced(disk))
    return _SavePlan(generation, known if ours else None, ours and not compact)


def _commit_generation(kmap: KeyframeMap, directory: Path, key: str, plan: _SavePlan) -> dict[str, Any]:
    """Write the new files, then commit them by replacing manifest.json; return the committed manifest."""
    gen = plan.generation
    created: list[Path] = []
    committed = False
    try:
        chunks = list(plan.base.chunks) if plan.append and plan.base is not None else []
        if len(kmap) > plan.start:
            chunks.append(_write_chunk(kmap, directory, gen, plan.start, created))
        name = generation_file("keyframes", gen, "csv")
        sha, size = _write_file(directory, name, lambda w: write_csv(w, kmap), created)
        kf_rec = {"file": name, "rows": len(kmap), "bytes": size, "sha256": sha}
        table = _write_table(kmap, directory, gen, created)
        index_rec = _index_for_save(kmap, directory, gen, plan.base, created)
        feature_recs = _features_for_save(kmap, directory, gen, plan, created)
        fsync_dir(directory)  # the new names are durable before a manifest references them
        manifest = new_manifest(kmap, gen, utc_now_iso(), kf_rec, chunks, index_rec, feature_recs, table)
        data = manifest_bytes(manifest)
        _write_file(directory, MANIFEST, lambda w: w.write(data), None)
        committed = True  # os.replace onto manifest.json happened: this is the commit point
        _remember(kmap, key, _DiskState(generation=gen, rows=len(kmap), chunks=chunks, index=index_rec,
                                        features=feature_recs))
        fsync_dir(directory)
    except BaseException:
        if not committed:
            for p in created:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        raise
    return manifest


def _write_table(kmap: KeyframeMap, directory: Path, gen: int, created: list[Path]) -> dict[str, dict[str, Any]]:
    """Write the binary keyframe table and the sources (:mod:`.keyframe_table`); their manifest records."""
    records = table_records(kmap)
    out = {}
    for key, name, fill in (
            ("table", generation_file("table", gen, "npy"), lambda w: _write_npy(w, records)),
            ("sources", generation_file("sources", gen, "txt"), lambda w: w.write(sources_bytes(kmap)))):
        sha, size = _write_file(directory, name, fill, created)
        out[key] = {"file": name, "rows": len(kmap), "bytes": size, "sha256": sha}
    return out


def _write_npy(w: _HashingWriter, arr: np.ndarray) -> None:
    """``arr`` as a version 1.0 ``.npy`` (C order, no pickle)."""
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    np.lib.format.write_array_header_1_0(w, header)
    w.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _write_chunk(kmap: KeyframeMap, directory: Path, gen: int, start: int, created: list[Path]) -> dict[str, Any]:
    """Write rows [start, len(kmap)) as descriptors.g<gen>.npy; return its manifest record."""
    rows = len(kmap) - start
    dim = kmap.descriptor_dim
    dtype = STORAGE_DTYPES[kmap.storage_dtype]
    name = generation_file("descriptors", gen, "npy")

    def write(w: _HashingWriter) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)}
        np.lib.format.write_array_header_1_0(w, header)
        for part in kmap._stored_blocks(start, max(1, _IO_BLOCK // (dim * dtype.itemsize))):
            w.write(memoryview(part).cast("B"))

    rec = _write_chunk_file(directory, name, write, created)
    return {"file": name, "rows": rows, **{k: v for k, v in rec.items() if k != "file"}}


def _features_for_save(kmap: KeyframeMap, directory: Path, gen: int, plan: _SavePlan,
                       created: list[Path]) -> list[dict[str, Any]] | None:
    """Records of the local-feature chunks to commit: the committed ones plus rows added since, or a full write.

    Appends like the descriptors when the committed map has feature chunks of the same slot count; otherwise (a
    format 1 map gaining features, a full write) one chunk holds every row.
    """
    store = kmap.local_features
    if store is None:
        return None
    base = plan.base.features if plan.append and plan.base is not None else None
    start = plan.start if base is not None and _feature_slots(base, store.slots) else 0
    recs = list(base) if start else []
    if len(kmap) > start:
        recs.append(_write_feature_chunk(store, directory, gen, start, len(kmap) - start, created))
    return recs


def _feature_slots(recs: list[dict[str, Any]], slots: int) -> bool:
    """Whether committed feature chunks can be appended to (every chunk has ``slots`` slots)."""
    return all(rec.get("slots", slots) == slots for rec in recs)


def _write_feature_chunk(store: Any, directory: Path, gen: int, start: int, rows: int,
                         created: list[Path]) -> dict[str, Any]:
    """Write local-feature rows [start, start + rows) as features.g<gen>.npy; return its manifest record."""
    name = generation_file("features", gen, "npy")
    dtype = slot_dtype(store.kind)

    def write(w: _HashingWriter) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, store.slots)}
        np.lib.format.write_array_header_1_0(w, header)
        for part in store.blocks(start):
            w.write(memoryview(part).cast("B"))

    rec = _write_chunk_file(directory, name, write, created)
    return {"file": name, "rows": rows, **{k: v for k, v in rec.items() if k != "file"}, "slots": store.slots}


def _index_for_save(kmap: KeyframeMap, directory: Path, gen: int, base: _DiskState | None,
                    created: list[Path]) -> dict[str, Any] | None:
    """Manifest record of the index to commit: reuse the committed file, write the attached blob, or none.

    An index stored as codes per row (``codes``) appends like the descriptors: when the committed index has the same
    blob (trained quantizers), its code chunks are kept and only the rows added since are written.
    """
    attached = kmap._attached_index()
    count = len(kmap)
    if attached is not None and attached.rows == count:
        same_blob = base is not None and base.index is not None and base.index["sha256"] == attached.sha256 \
            and base.index["kind"] == attached.kind
        if same_blob and base.index["rows"] == count and (attached.codes is None) == ("codes" not in base.index):
            return base.index
        if same_blob:
            rec = {k: v for k, v in base.index.items() if k != "codes"}
        else:
            name = generation_file("index", gen, "faiss" if attached.kind.lower().startswith("faiss") else "bin")
            sha, size = _write_file(directory, name, lambda w: w.write(memoryview(attached.blob).cast("B")), created)
            rec = {"file": name, "kind": attached.kind, "bytes": size, "sha256": sha}
        rec["rows"] = count
        if attached.codes is not None:
            kept = list(base.index.get("codes") or []) if same_blob and "codes" in base.index else []
            start = sum(r["rows"] for r in kept)
            if count > start:
                kept.append(_write_code_chunk(attached.codes, directory, gen, start, count - start, created))
            rec["codes"] = kept
        return rec
    if base is not None and base.index is not None and base.index["rows"] == count:
        return base.index  # committed index still covers every row (e.g. loaded with load_index=False)
    if attached is not None:
        built_for = attached.rows
    elif base is not None and base.index is not None:
        built_for = base.index["rows"]
    else:
        return None
    logger.info("index stale (built for %d rows, map has %d): not saved, will be rebuilt", built_for, count)
    kmap._drop_index()
    return None


def _write_code_chunk(codes: tuple[np.ndarray, ...], directory: Path, gen: int, start: int, rows: int,
                      created: list[Path]) -> dict[str, Any]:
    """Write index code rows [start, start + rows) as codes.g<gen>.npy (uint8, (rows, code_size)); its record."""
    name = generation_file("codes", gen, "npy")
    width = codes[0].shape[1]

    def write(w: _HashingWriter) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (rows, width)}
        np.lib.format.write_array_header_1_0(w, header)
        offset = 0
        for block in codes:
            lo, hi = max(start - offset, 0), block.shape[0]
            offset += block.shape[0]
            if lo < hi:
                w.write(memoryview(np.ascontiguousarray(block[lo:hi])).cast("B"))

    rec = _write_chunk_file(directory, name, write, created)
    return {"file": name, "rows": rows, **{k: v for k, v in rec.items() if k != "file"}}


def _existing_manifest(directory: Path, overwrite: bool) -> tuple[dict[str, Any] | None, int]:
    """Return (committed manifest or None, its generation or 0) for a save into ``directory``."""
    try:
        disk = read_manifest(directory)
    except MapNotFoundError:
        return None, 0
    except MapFormatError as exc:
        if not overwrite:
            raise MapFormatError(f"cannot save into {directory}: its existing map is unreadable here ({exc}). "
                                 "Pass overwrite=True to replace it, or choose a new path") from None
        return None, claimed_generation(directory)
    return disk, disk["generation"]


def _referenced(manifest: dict[str, Any]) -> set[str]:
    """Every name in the map directory that a save must keep while ``manifest`` is committed."""
    return {MANIFEST, LOCK_FILE, *listed_files(manifest)}


def _max_file_generation(directory: Path) -> int:
    """The largest generation in any file name in ``directory`` (0 if none)."""
    return max((g for g in map(generation_of, os.listdir(directory)) if g is not None), default=0)


def _remove_unreferenced(directory: Path, referenced: set[str]) -> int:
    """Delete temp files and generation files that ``referenced`` does not name (caller holds the lock)."""
    removed = 0
    for name in os.listdir(directory):
        if name in referenced or not (name.startswith(TMP_PREFIX) or generation_of(name) is not None):
            continue
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(directory / name).st_mode):
                logger.warning("map %s: %s is a directory named like a map file; left alone", directory, name)
                continue
            os.unlink(directory / name)  # a link or FIFO is unlinked itself, never followed
            removed += 1
            logger.debug("map %s: removed unreferenced %s", directory, name)
    return removed


class _HashingWriter:
    """Binary writer that hashes and counts what passes through it; with ``block_bytes``, also each block of that
    many bytes (the ``block_sha256`` of a chunk record, what background checks verify)."""

    def __init__(self, f: io.BufferedWriter, block_bytes: int = 0) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.block_bytes = block_bytes
        self.blocks: list[str] = []
        self._block = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        if self.block_bytes:
            pos = 0
            while pos < len(view):
                room = self.block_bytes - (self.size + pos) % self.block_bytes
                part = view[pos:pos + room]
                self._block.update(part)
                pos += len(part)
                if (self.size + pos) % self.block_bytes == 0:
                    self.blocks.append(self._block.hexdigest())
                    self._block = hashlib.sha256()
        n = self._f.write(view)
        self.size += n
        return n

    def block_record(self) -> dict[str, Any]:
        """``block_bytes`` and ``block_sha256`` for a file of more than one block, else nothing (its sha256 serves)."""
        if not self.block_bytes or self.size <= self.block_bytes:
            return {}
        blocks = self.blocks + ([self._block.hexdigest()] if self.size % self.block_bytes else [])
        return {"block_bytes": self.block_bytes, "block_sha256": blocks}


def _write_file(directory: Path, name: str, fill: Callable[[_HashingWriter], None],
                created: list[Path] | None) -> tuple[str, int]:
    """Write ``directory/name`` atomically through ``fill``; return (sha256 hex, size) of what was written."""
    rec = _write_chunk_file(directory, name, fill, created, block_bytes=0)
    return rec["sha256"], rec["bytes"]


def _write_chunk_file(directory: Path, name: str, fill: Callable[[_HashingWriter], None],
                      created: list[Path] | None, block_bytes: int | None = None) -> dict[str, Any]:
    """Write ``directory/name`` atomically through ``fill``; return its record: ``file``, ``bytes``, ``sha256`` and,
    for a file of several blocks, ``block_bytes`` and ``block_sha256``.

    The rename is not yet durable: the caller fsyncs the directory once for all the files of a generation.
    """
    with atomic_path(directory / name, sync_dir=False) as tmp, open(tmp, "wb") as f:
        w = _HashingWriter(f, BLOCK_BYTES if block_bytes is None else block_bytes)
        fill(w)
    if created is not None:
        created.append(directory / name)
    return {"file": name, "bytes": w.size, "sha256": w.sha.hexdigest(), **w.block_record()}


class _DirLock:
    """Exclusive advisory lock on <map>/.lock (released by the kernel if the process dies)."""

    def __init__(self, directory: Path, timeout_s: float) -> None:
        self._path = directory / LOCK_FILE
        self._timeout_s = timeout_s
        self._fd = -1

    def __enter__(self) -> _DirLock:
        fd = self._open()
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise MapLockedError(
                        f"{self._path} is locked by another process saving this map (waited {self._timeout_s:g} s); "
                        "wait for it to finish, or raise lock_timeout_s"
                    ) from None
                time.sleep(0.02)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def _open(self) -> int:
        """Open (or create) the lock file: a regular file in the map directory, never through a link."""
        refused = (f"{self._path} is not a regular file: a link, FIFO or device there could make a save write or "
                   "block elsewhere, so it is refused. Remove it (saves recreate it)")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(self._path).st_mode):  # before open(): never open a device or FIFO
                raise MapError(refused)
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink (even a dangling one: O_CREAT never creates its target)
                raise MapError(refused) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MapError(refused)
        return fd
