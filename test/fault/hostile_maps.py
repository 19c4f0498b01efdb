"""Hostile map directories for the fault suite: each kind damages a copy of a good map in one way.

A kind is (name, damage, refusal): ``damage(map_dir, outside_dir)`` changes the copy (``outside_dir`` is a directory
beside it, for link targets; the probe checks nothing there changes), and ``refusal`` is a regex of the one-line
error :meth:`KeyframeMap.load` must raise, or None when the map must still load (hostile extras that are ignored,
an unsealed manifest written before seals existed). "Resealed" kinds rewrite the manifest's file records and seal,
so that only the checks behind the seal can catch the damage: what an attacker who knows the format would do.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.manifest import MANIFEST, SEAL_KEY, manifest_seal
from dinomix_ros.model.checkpoint import LoadedModel, random_model
from dinomix_ros.maps.storage import save_map

__all__ = ["Kind", "hostile_kinds", "lock_kinds", "make_map", "pickle_marker", "random_weights"]

Kind = tuple[str, Callable[[Path, Path], None], "str | None"]

ROWS = 12


@functools.lru_cache(maxsize=1)
def random_weights() -> LoadedModel:
    """The seeded random model the node and ``--random-weights`` use (built once per test process: ~10 s)."""
    return random_model("vits14", 0)


def make_map(path: Path, fingerprint: dict) -> Path:
    """A 12-keyframe map with poses, GPS, a stored exact index and float16 descriptors, saved at ``path``."""
    from dinomix_ros.maps.index import INDEX_KIND_NAMES, index_for_map

    rng = np.random.default_rng(8)
    m = KeyframeMap.empty(fingerprint, metadata={"name": "hostile", "calibration": {"min_similarity": 0.5}})
    x = rng.standard_normal((ROWS, fingerprint["descriptor_dim"])).astype(np.float32)
    m.add(x / np.linalg.norm(x, axis=1, keepdims=True), stamps_ns=np.arange(1, ROWS + 1, dtype=np.int64) * 10**9,
          cameras=["front", "back"] * (ROWS // 2), frame_ids="map", positions=rng.standard_normal((ROWS, 3)),
          gps=np.c_[55.7 + rng.random(ROWS) * 1e-3, 13.2 + rng.random(ROWS) * 1e-3, rng.random(ROWS)],
          sources=[f"bag:/cam@{i}" for i in range(ROWS)])
    blob = index_for_map(m, "exact", "cpu").to_bytes()
    return save_map(m, path, blob, INDEX_KIND_NAMES["exact"])


# ---------------------------------------------------------------------- helpers


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text("utf-8"))


def _write(path: Path, m: dict, *, seal: bool) -> None:
    """Write a manifest, sealed (like a save, refusing nothing) or with its old seal kept."""
    if seal:
        m = {**m, SEAL_KEY: manifest_seal(m)}
    (path / MANIFEST).write_text(json.dumps(m, indent=2), "utf-8")


def _edit(fn: Callable[[dict], None], *, seal: bool) -> Callable[[Path, Path], None]:
    def damage(path: Path, outside: Path) -> None:
        m = _manifest(path)
        fn(m)
        _write(path, m, seal=seal)
    return damage


def _chunk(path: Path) -> Path:
    return path / _manifest(path)["files"]["descriptors"][0]["file"]


def _csv(path: Path) -> Path:
    return path / _manifest(path)["files"]["keyframes"]["file"]


def _index(path: Path) -> Path:
    return path / _manifest(path)["files"]["index"]["file"]


def _resealed(rewrite: Callable[[Path], bytes], which: Callable[[Path], Path]) -> Callable[[Path, Path], None]:
    """Replace a file's content by ``rewrite(file)`` and make the manifest agree with it (size, sha256, seal)."""
    def damage(path: Path, outside: Path) -> None:
        target = which(path)
        data = rewrite(target)
        target.write_bytes(data)
        m = _manifest(path)
        files = m["files"]
        for rec in [files["keyframes"], *files["descriptors"], *([files["index"]] if files["index"] else [])]:
            if rec["file"] == target.name:
                rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        _write(path, m, seal=True)
    return damage


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _descriptors(chunk: Path) -> np.ndarray:
    return np.load(chunk).astype(np.float16)


def _with_rows(edit: Callable[[np.ndarray], None]) -> Callable[[Path], bytes]:
    def rewrite(chunk: Path) -> bytes:
        d = _descriptors(chunk)
        edit(d)
        return _npy(d)
    return rewrite


def _csv_lines(edit: Callable[[list[str]], list[str]]) -> Callable[[Path], bytes]:
    def rewrite(csv_file: Path) -> bytes:
        return "".join(edit(csv_file.read_text("utf-8").splitlines(keepends=True))).encode("utf-8")
    return rewrite


def _set_cell(line: int, column: int, value: str) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        cells = lines[line].rstrip("\n").split(",")
        cells[column] = value
        lines[line] = ",".join(cells) + "\n"
        return lines
    return edit


def _replace(which: Callable[[Path], Path], make: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """Remove a file of the map and put something else under its name (``make(target, outside)``)."""
    def damage(path: Path, outside: Path) -> None:
        target = which(path)
        copy = outside / f"copy-of-{target.name}"
        copy.write_bytes(target.read_bytes())
        target.unlink()
        make(target, outside)
    return damage


def _fifo(target: Path, outside: Path) -> None:
    os.mkfifo(target)


def _link_outside(target: Path, outside: Path) -> None:
    target.symlink_to(outside / f"copy-of-{target.name}")  # an identical copy: only the link itself is wrong


def _link_inside(target: Path, outside: Path) -> None:
    twin = target.parent / f"twin-of-{target.name}"
    twin.write_bytes((outside / f"copy-of-{target.name}").read_bytes())
    target.symlink_to(twin.name)


def _device(target: Path, outside: Path) -> None:
    if os.geteuid() == 0:
        os.mknod(target, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers: an endless file
    else:
        target.symlink_to("/dev/zero")


def _directory(target: Path, outside: Path) -> None:
    target.mkdir()


class PickleMarker:
    """Unpickling this creates the file ``marker``: what loading a map must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_marker(outside: Path) -> Path:
    """The file a pickled payload planted in a map would create (it must never exist)."""
    return outside / "pickle-payload-ran"


def _nested(depth: int) -> Callable[[Path, Path], None]:
    def damage(path: Path, outside: Path) -> None:
        text = (path / MANIFEST).read_text("utf-8")
        text = text.replace('"metadata": {', '"metadata": {"deep": ' + "[" * depth + "]" * depth + ", ", 1)
        (path / MANIFEST).write_text(text, "utf-8")
    return damage


def _text(fn: Callable[[str], str]) -> Callable[[Path, Path], None]:
    def damage(path: Path, outside: Path) -> None:
        (path / MANIFEST).write_text(fn((path / MANIFEST).read_text("utf-8")), "utf-8")
    return damage


def _raw(data: bytes) -> Callable[[Path, Path], None]:
    def damage(path: Path, outside: Path) -> None:
        (path / MANIFEST).write_bytes(data)
    return damage


def _unsealed(path: Path, outside: Path) -> None:
    m = _manifest(path)
    del m[SEAL_KEY]
    (path / MANIFEST).write_text(json.dumps(m, indent=2), "utf-8")


def _junk(path: Path, outside: Path) -> None:
    (path / "notes.txt").write_text("operator notes")
    (path / "descriptors.g000099.npy").mkdir()  # a directory named like a map file
    (path / ".tmp-keyframes.g000042.csv.abcdef").write_bytes(b"half a save")
    os.mkfifo(path / "index.g000077.faiss")  # an unreferenced FIFO: never opened


def _set(key_path: tuple, value: object) -> Callable[[dict], None]:
    def fn(m: dict) -> None:
        d = m
        for k in key_path[:-1]:
            d = d[k]
        d[key_path[-1]] = value
    return fn


def _surrogate(path: Path, outside: Path) -> None:
    m = _manifest(path)
    m["metadata"]["name"] = "\ud800"
    body = json.dumps(m, indent=2)  # ASCII-escaped: the text is valid, the string it holds is not
    (path / MANIFEST).write_text(body, "utf-8")


def _object_chunk(outside: Path) -> Callable[[Path], bytes]:
    def rewrite(chunk: Path) -> bytes:
        arr = np.empty((ROWS, 1), dtype=object)
        arr[:, 0] = PickleMarker(pickle_marker(outside))
        return _npy(arr)
    return rewrite


def _big_header(chunk: Path) -> bytes:
    d = _descriptors(chunk)
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': %r, }" % (d.shape,)
    header = header + " " * (60000 - len(header) - 1) + "\n"
    return b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + d.tobytes()


def hostile_kinds(outside: Path) -> list[Kind]:
    """Every hostile map kind (``outside`` is where pickled payloads would leave their marker)."""
    nan = _with_rows(lambda d: d.__setitem__((3, 5), np.nan))
    inf = _with_rows(lambda d: d.__setitem__((4, 0), np.inf))
    return [
        # manifest.json: the file itself
        ("manifest missing", lambda p, o: (p / MANIFEST).unlink(), r"has no manifest\.json"),
        ("manifest truncated", _text(lambda t: t[: len(t) // 2]), "not valid UTF-8 JSON"),
        ("manifest not utf-8", _raw(b"\xff\xfe{}"), "not valid UTF-8 JSON"),
        ("manifest top level a list", _raw(b"[1, 2, 3]"), "top level is a list"),
        ("manifest nested 100000 deep", _nested(100_000), r"nests 100002 levels deep, at most 32"),
        ("manifest nested 40 deep (sealed)", _nested(40), r"nests 42 levels deep"),
        ("manifest of 20 MiB", _raw(b'{"format": "' + b"x" * (20 << 20) + b'"}'), "larger than 16777216 bytes"),
        ("manifest NaN", _text(lambda t: t.replace('"count": 12', '"count": NaN', 1)), "NaN is not a JSON number"),
        ("manifest duplicate key", _text(lambda t: t.replace("{", '{"count": 5,', 1)), "'count' appears twice"),
        ("manifest lone surrogate", _surrogate, "not plain JSON"),
        ("manifest is a FIFO", _replace(lambda p: p / MANIFEST, _fifo), "is a FIFO"),
        ("manifest links outside", _replace(lambda p: p / MANIFEST, _link_outside), "is a symbolic link"),
        ("manifest is a directory", _replace(lambda p: p / MANIFEST, _directory), "is a directory"),
        # manifest fields edited by hand (the seal no longer matches)
        ("metadata edited", _edit(_set(("metadata", "name"), "elsewhere"), seal=False), "changed after it was written"),
        ("calibration edited", _edit(_set(("metadata", "calibration", "min_similarity"), -1.0), seal=False),
         "changed after it was written"),
        ("fingerprint edited", _edit(_set(("fingerprint", "architecture"), "other"), seal=False),
         "changed after it was written"),
        ("count edited", _edit(_set(("count",), 11), seal=False), "changed after it was written"),
        ("frames edited", _edit(_set(("frames",), ["odom"]), seal=False), "changed after it was written"),
        ("chunk sha256 edited", _edit(_set(("files", "descriptors", 0, "sha256"), "0" * 64), seal=False),
         "changed after it was written"),
        ("seal malformed", _edit(_set((SEAL_KEY,), "not-a-hash"), seal=False), "expected 64 lowercase hex digits"),
        # manifest fields changed and resealed: the field checks behind the seal
        ("version 99 (resealed)", _edit(_set(("version",), 99), seal=True), "written by a newer dinomix_ros"),
        ("count -1 (resealed)", _edit(_set(("count",), -1), seal=True), r"'count' is -1"),
        ("count 10**30 (resealed)", _edit(_set(("count",), 10**30), seal=True), r"'count' is 10+, expected 0\.\."),
        ("next_id below ids (resealed)", _edit(_set(("next_id",), 3), seal=True), "not below the manifest's next_id"),
        ("chunk rows changed (resealed)", _edit(_set(("files", "descriptors", 0, "rows"), 11), seal=True),
         "descriptor chunks hold 11 rows"),
        ("file name ../outside (resealed)", _edit(_set(("files", "keyframes", "file"), "../keyframes.g000001.csv"),
                                                  seal=True), "expected a plain file name"),
        ("frames list wrong (resealed)", _edit(_set(("frames",), ["odom"]), seal=True), "lists frames"),
        ("calibration not an object (resealed)", _edit(_set(("metadata", "calibration"), [0.5]), seal=True),
         r"\['calibration'\] is \[0\.5\], expected an object"),
        ("fingerprint dim mismatch (resealed)", _edit(_set(("fingerprint", "descriptor_dim"), 64), seal=True),
         "fingerprint descriptor_dim 64 != descriptor_dim"),
        ("writer missing (resealed)", _edit(lambda m: m.pop("writer"), seal=True), "'writer' is None"),
        # descriptor chunks
        ("chunk is a FIFO", _replace(_chunk, _fifo), "is a FIFO"),
        ("chunk is a device", _replace(_chunk, _device), "is a device" if os.geteuid() == 0 else "symbolic link"),
        ("chunk links outside", _replace(_chunk, _link_outside), "is a symbolic link"),
        ("chunk links inside", _replace(_chunk, _link_inside), "is a symbolic link"),
        ("chunk is a directory", _replace(_chunk, _directory), "is a directory"),
        ("chunk missing", lambda p, o: _chunk(p).unlink(), "listed in manifest.json but missing"),
        ("chunk truncated", lambda p, o: os.truncate(_chunk(p), _chunk(p).stat().st_size - 7), "truncated"),
        ("chunk extra bytes", lambda p, o: _chunk(p).write_bytes(_chunk(p).read_bytes() + b"x"), "truncated"),
        ("chunk byte flipped", lambda p, o: _chunk(p).write_bytes(_chunk(p).read_bytes()[:-1] + b"\x01"),
         "corrupted or truncated \\(sha256"),
        ("chunk NaN (resealed)", _resealed(nan, _chunk), r"row 3 \(map row 3\) contains NaN or inf"),
        ("chunk inf (resealed)", _resealed(inf, _chunk), r"row 4 \(map row 4\) contains NaN or inf"),
        ("chunk unnormalised (resealed)", _resealed(_with_rows(lambda d: d.__imul__(10)), _chunk),
         r"row 0 \(map row 0\) has L2 norm 10"),
        ("chunk zero rows (resealed)", _resealed(_with_rows(lambda d: d.__setitem__(7, 0)), _chunk),
         r"row 7 \(map row 7\) has L2 norm 0"),
        ("chunk float64 (resealed)", _resealed(lambda c: _npy(_descriptors(c).astype(np.float64)), _chunk),
         "holds a float64 array"),
        ("chunk wrong shape (resealed)", _resealed(lambda c: _npy(_descriptors(c)[:, :64]), _chunk),
         r"shape \(12, 64\)"),
        ("chunk pickled objects (resealed)", _resealed(_object_chunk(outside), _chunk), "holds a object array"),
        ("chunk 60 kB npy header (resealed)", _resealed(_big_header, _chunk), "header is 60000 bytes long"),
        ("chunk not npy (resealed)", _resealed(lambda c: b"\x00" * c.stat().st_size, _chunk),
         "not a valid .npy file"),
        # keyframe table
        ("csv is a FIFO", _replace(_csv, _fifo), "is a FIFO"),
        ("csv links outside", _replace(_csv, _link_outside), "is a symbolic link"),
        ("csv missing", lambda p, o: _csv(p).unlink(), "listed in manifest.json but missing"),
        ("csv field of 200k characters (resealed)", _resealed(_csv_lines(_set_cell(1, 18, "s" * 200_000)), _csv),
         "field larger than field limit"),
        ("csv field of 10k characters (resealed)", _resealed(_csv_lines(_set_cell(1, 18, "s" * 10_000)), _csv),
         "is 10000 characters long, at most 8192"),
        ("csv 100000 extra rows (resealed)", _resealed(_csv_lines(lambda ls: ls + ls[1:2] * 100_000), _csv),
         "more than the 12 keyframe rows"),
        ("csv duplicate ids (resealed)", _resealed(_csv_lines(_set_cell(3, 0, "1")), _csv), "strictly increasing"),
        ("csv NUL byte (resealed)", _resealed(_csv_lines(_set_cell(2, 2, "fr\x00nt")), _csv),
         "control character|NUL"),
        ("csv not utf-8 (resealed)", _resealed(lambda c: c.read_bytes().replace(b"front", b"fr\xffnt", 1), _csv),
         "not UTF-8"),
        ("csv header wrong (resealed)", _resealed(_csv_lines(_set_cell(0, 1, "stamp")), _csv), "header is"),
        ("csv 1e400 position (resealed)", _resealed(_csv_lines(_set_cell(1, 4, "1e400")), _csv),
         "not a finite number"),
        ("csv 5000-digit id (resealed)", _resealed(_csv_lines(_set_cell(1, 0, "9" * 5000)), _csv),
         "is not an integer|does not fit in int64"),
        # the optional index, and what a map directory may hold besides its files: ignored
        ("index garbage (resealed)", _resealed(lambda f: b"\x00" * 100, _index), None),
        ("index missing", lambda p, o: _index(p).unlink(), None),
        ("index links outside", _replace(_index, _link_outside), None),
        ("index is a FIFO", _replace(_index, _fifo), None),
        ("junk, a directory and a FIFO named like map files", _junk, None),
        ("manifest without a seal (written before seals)", _unsealed, None),
    ]


def lock_kinds() -> list[tuple[str, Callable[[Path, Path], Path | None]]]:
    """(name, damage) of hostile ``.lock`` entries; damage returns a path outside that must not appear or change."""
    def dangling(p: Path, o: Path) -> Path:
        (p / ".lock").unlink(missing_ok=True)
        (p / ".lock").symlink_to(o / "created-by-lock")
        return o / "created-by-lock"

    def existing(p: Path, o: Path) -> Path:
        (o / "victim").write_text("do not touch")
        (p / ".lock").unlink(missing_ok=True)
        (p / ".lock").symlink_to(o / "victim")
        return o / "victim"

    def fifo(p: Path, o: Path) -> None:
        (p / ".lock").unlink(missing_ok=True)
        os.mkfifo(p / ".lock")

    def directory(p: Path, o: Path) -> None:
        (p / ".lock").unlink(missing_ok=True)
        (p / ".lock").mkdir()

    return [(".lock links outside (dangling)", dangling), (".lock links to a file outside", existing),
            (".lock is a FIFO", fifo), (".lock is a directory", directory)]
