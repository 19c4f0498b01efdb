"""Tests for dinomix_ros.maps.storage and .loading (KeyframeMap.save / load): round trips, append-only chunks,
verification on load, index freshness, crash safety, concurrency, hostile files.

The kill test runs this file's ``kill_block`` in a child process (imported from the test directory), so the child
and the parent agree on every row without sharing state.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from mapfactory import DIM, STAMP0, assert_same_map, fingerprint, full_map, unit

from dinomix_ros.maps.keyframe_csv import CSV_COLUMNS
from dinomix_ros.maps.keyframes import (
    KeyframeMap,
    MapConflictError,
    MapError,
    MapFormatError,
    MapLockedError,
    MapMismatchError,
    MapNotFoundError,
)
from dinomix_ros.maps import storage
from dinomix_ros.maps.manifest import SEAL_KEY, manifest_bytes, manifest_seal, read_manifest
from dinomix_ros.maps.storage import save_map
from dinomix_ros.maps.loading import load_map

REPO = Path(__file__).resolve().parents[2]
TEST_DIR = Path(__file__).resolve().parent


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text("utf-8"))


def rewrite_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest, sealed again: only the checks behind the seal can catch what the test changed."""
    (path / "manifest.json").write_bytes(manifest_bytes(manifest))


def refresh_record(path: Path, rec: dict) -> None:
    """Make a manifest record match its (tampered) file, so that only deeper checks can catch the damage."""
    data = (path / rec["file"]).read_bytes()
    rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_round_trip_every_field(tmp_path: Path, rng: np.random.Generator, storage_dtype: str) -> None:
    m, desc = full_map(rng, storage_dtype=storage_dtype)
    save_map(m, tmp_path / "office.dinomap", b"\x00index bytes\xff", "faiss_flat_ip")
    loaded = load_map(tmp_path / "office.dinomap")
    assert_same_map(m, loaded)
    assert loaded.stamps_ns[0] == STAMP0 and loaded.stamps_ns.dtype == np.int64
    assert loaded.created == m.created
    if storage_dtype == "float32":
        assert np.array_equal(loaded.descriptors, desc)
    else:
        assert loaded.descriptors.dtype == np.float16
        np.testing.assert_allclose(loaded.descriptors_f32(), desc, atol=1e-3)
    assert loaded.index_blob.tobytes() == b"\x00index bytes\xff" and loaded.index_kind == "faiss_flat_ip"
    assert loaded.keyframe(1) == m.keyframe(1)  # row 1 has no NaN, so tuple equality is meaningful
    kf = loaded.keyframe(7)
    assert (kf.utm, kf.utm_zone, kf.utm_band, kf.camera) == (None, 0, "", "caméra_arrière")
    assert loaded.keyframe(2).position is None and loaded.keyframe(4).orientation is None
    assert loaded.keyframe(5).gps is None and np.isnan(loaded.keyframe(6).gps[2])
    assert loaded.frames == ["map", "odom", "utm"]
    assert isinstance(loaded.descriptors, np.memmap)  # single chunk: zero-copy memory map


def test_keyframe_csv_is_plain_and_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    man = read_manifest(tmp_path / "m")
    with open(tmp_path / "m" / man["files"]["keyframes"]["file"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(m) + 1
    row = dict(zip(rows[0], rows[3]))  # keyframe 2: unknown position
    assert (row["x"], row["y"], row["z"]) == ("", "", "")
    assert int(row["stamp_ns"]) == STAMP0 + 2 * 33_333_333
    assert float(rows[2][4]) == m.positions[1, 0]
    assert rows[4][4:7] == ["-0.0", "5e-324", "1.7976931348623157e+308"]
    assert man["count"] == 12 and man["descriptor_dtype"] == "float16" and man["frames"] == ["map", "odom", "utm"]


def test_empty_map_round_trip(tmp_path: Path) -> None:
    m = KeyframeMap.empty(fingerprint(), storage_dtype="float32")
    save_map(m, tmp_path / "e")
    loaded = load_map(tmp_path / "e")
    assert len(loaded) == 0 and loaded.descriptors.shape == (0, DIM) and loaded.index_blob is None
    assert read_manifest(tmp_path / "e")["files"]["descriptors"] == []


def test_faiss_index_blob_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    faiss = pytest.importorskip("faiss")
    m, _ = full_map(rng)
    index = faiss.IndexFlatIP(DIM)
    index.add(m.descriptors_f32())
    save_map(m, tmp_path / "m", faiss.serialize_index(index), "faiss_flat_ip")
    assert (tmp_path / "m" / read_manifest(tmp_path / "m")["files"]["index"]["file"]).suffix == ".faiss"
    loaded = load_map(tmp_path / "m")
    xq = m.descriptors_f32()[:3]
    _, expected = index.search(xq, 4)
    _, found = faiss.deserialize_index(loaded.index_blob).search(xq, 4)
    assert np.array_equal(found, expected) and found[:, 0].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------- append-only chunks


def test_append_writes_one_chunk_and_leaves_old_chunks_untouched(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    old = read_manifest(path)
    old_chunk = path / old["files"]["descriptors"][0]["file"]
    before = (os.stat(old_chunk).st_ino, os.stat(old_chunk).st_mtime_ns, sha(old_chunk))

    loaded = load_map(path)
    new_ids = loaded.add(unit(rng, 3), stamps_ns=[1, 2, 3], cameras="rear", frame_ids="odom")
    assert new_ids.tolist() == [12, 13, 14]
    save_map(loaded, path)
    new = read_manifest(path)
    assert new["files"]["descriptors"][:1] == old["files"]["descriptors"]
    assert len(new["files"]["descriptors"]) == 2 and new["files"]["descriptors"][1]["rows"] == 3
    assert (os.stat(old_chunk).st_ino, os.stat(old_chunk).st_mtime_ns, sha(old_chunk)) == before
    chunks = ["descriptors.g000001.npy", "descriptors.g000002.npy"]
    assert sorted(p.name for p in path.glob("descriptors.*.npy")) == chunks
    assert sorted(p.name for p in path.glob("table.*.npy")) == ["table.g000002.npy"]  # rewritten with the CSV
    assert not (path / old["files"]["keyframes"]["file"]).exists()  # replaced table deleted after the commit
    assert new["generation"] == 2 and new["count"] == 15 and new["created"] == old["created"]
    assert_same_map(loaded, load_map(path))

    loaded.metadata["notes"] = "metadata-only save"
    save_map(loaded, path)  # nothing added: no new chunk
    assert read_manifest(path)["files"]["descriptors"] == new["files"]["descriptors"]
    assert load_map(path).metadata["notes"] == "metadata-only save"


def test_save_elsewhere_writes_everything_and_existing_maps_need_overwrite(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "a")
    m.add(unit(rng, 2), stamps_ns=[5, 6], cameras="front", frame_ids="map")
    save_map(m, tmp_path / "a")
    loaded = load_map(tmp_path / "a")
    save_map(loaded, tmp_path / "b")
    assert [c["rows"] for c in read_manifest(tmp_path / "b")["files"]["descriptors"]] == [14]
    assert_same_map(loaded, load_map(tmp_path / "b"))

    other, _ = full_map(np.random.default_rng(7), n=9)
    with pytest.raises(MapError, match=r"already holds a map \(14 keyframes.*overwrite=True"):
        save_map(other, tmp_path / "a")
    save_map(other, tmp_path / "a", overwrite=True)
    assert_same_map(other, load_map(tmp_path / "a"))
    assert sorted(p.name for p in (tmp_path / "a").glob("*.npy")) == ["descriptors.g000003.npy", "table.g000003.npy"]


def test_compact_rewrites_one_chunk(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path, b"idx", "bin_test")
    for k in range(2):
        m.add(unit(rng, 2), stamps_ns=[k, k + 1], cameras="front", frame_ids="map")
        save_map(m, path)
    assert len(read_manifest(path)["files"]["descriptors"]) == 3
    save_map(m, path, compact=True)
    man = read_manifest(path)
    assert [c["rows"] for c in man["files"]["descriptors"]] == [16]
    assert sorted(p.name for p in path.glob("descriptors.*.npy")) == [man["files"]["descriptors"][0]["file"]]
    loaded = load_map(path)
    assert_same_map(m, loaded)
    assert np.array_equal(np.concatenate(list(m.iter_descriptors_f32(block_rows=5))), loaded.descriptors_f32())


# ---------------------------------------------------------------------- refusals on load


def test_fingerprint_mismatch_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    other = fingerprint("dmx-ffffffffffffffff")
    other["architecture"] = "dinomix_vitl14"
    both = r"dmx-1a2b3c4d5e6f7a8b \(dinomix_vitb14\).*dmx-ffffffffffffffff \(dinomix_vitl14\)"
    with pytest.raises(MapMismatchError, match=both):
        load_map(tmp_path / "m", expected_fingerprint=other)
    with pytest.raises(MapMismatchError, match="dmx-ffffffffffffffff"):
        m.check_compatible(other)
    m.check_compatible(fingerprint())
    assert len(load_map(tmp_path / "m", expected_fingerprint=fingerprint())) == 12

    loaded = load_map(tmp_path / "m")
    loaded.fingerprint = other
    with pytest.raises(MapMismatchError, match="built with model dmx-1a2b3c4d5e6f7a8b"):
        save_map(loaded, tmp_path / "m")


def test_flipped_byte_in_chunk_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    chunk = tmp_path / "m" / "descriptors.g000001.npy"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(MapFormatError, match=r"descriptors\.g000001\.npy is corrupted or truncated \(sha256"):
        load_map(tmp_path / "m")
    # The documented cost of verify=False: sizes and headers only, so a flipped data byte goes unnoticed.
    assert len(load_map(tmp_path / "m", verify=False)) == 12


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_chunk_is_refused(tmp_path: Path, rng: np.random.Generator, verify: bool) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    chunk = tmp_path / "m" / "descriptors.g000001.npy"
    os.truncate(chunk, chunk.stat().st_size - 10)
    short = r"descriptors\.g000001\.npy is corrupted or truncated \(\d+ bytes, manifest says"
    with pytest.raises(MapFormatError, match=short):
        load_map(tmp_path / "m", verify=verify)
    man = manifest_of(tmp_path / "m")  # a manifest that agrees with the short file: the .npy header still tells
    refresh_record(tmp_path / "m", man["files"]["descriptors"][0])
    rewrite_manifest(tmp_path / "m", man)
    with pytest.raises(MapFormatError, match=r"cannot hold a \(12, 64\) float16 array"):
        load_map(tmp_path / "m", verify=verify)


def test_chunk_with_wrong_shape_or_dtype_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    np.save(tmp_path / "m" / "descriptors.g000001.npy", np.zeros((12, DIM), dtype=np.float32), allow_pickle=False)
    man = manifest_of(tmp_path / "m")
    refresh_record(tmp_path / "m", man["files"]["descriptors"][0])
    rewrite_manifest(tmp_path / "m", man)
    with pytest.raises(MapFormatError, match=r"holds a float32 array of shape \(12, 64\), expected float16"):
        load_map(tmp_path / "m")


def test_missing_csv_rows_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    table = tmp_path / "m" / "keyframes.g000001.csv"
    lines = table.read_text("utf-8").splitlines(keepends=True)
    table.write_text("".join(lines[:-1]), "utf-8")
    with pytest.raises(MapFormatError, match=r"keyframes\.g000001\.csv is corrupted or truncated"):
        load_map(tmp_path / "m")
    man = manifest_of(tmp_path / "m")
    refresh_record(tmp_path / "m", man["files"]["keyframes"])
    rewrite_manifest(tmp_path / "m", man)
    with pytest.raises(MapFormatError, match=r"has 11 keyframe rows but manifest.json says 12"):
        load_map(tmp_path / "m")


@pytest.mark.parametrize("column, value, match", [
    ("utm_zone", "61", r"line 3: utm_zone 61 outside 1\.\.60"),
    ("x", "nan", r"line 3, column x: 'nan' is not a finite number \(unknown values are empty cells\)"),
    ("qw", "1.0.0", r"line 3, column qw: '1\.0\.0' is not a finite number"),
    ("stamp_ns", "1.7e18", r"line 3, column stamp_ns: '1\.7e18' is not an integer"),
    ("id", "0", r"line 3: id 0 after 0; ids must be strictly increasing"),
    ("frame_id", "", r"line 3: frame_ids is empty"),
])
def test_edited_csv_values_are_refused(tmp_path: Path, rng: np.random.Generator, column: str, value: str,
                                       match: str) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    table = tmp_path / "m" / "keyframes.g000001.csv"
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[2][CSV_COLUMNS.index(column)] = value  # keyframe 1, file line 3
    with open(table, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    man = manifest_of(tmp_path / "m")
    refresh_record(tmp_path / "m", man["files"]["keyframes"])
    rewrite_manifest(tmp_path / "m", man)
    with pytest.raises(MapFormatError, match=r"keyframes\.g000001\.csv " + match):
        load_map(tmp_path / "m")


def test_newer_version_and_foreign_manifests_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    writer = load_map(tmp_path / "m")
    man = manifest_of(tmp_path / "m")
    rewrite_manifest(tmp_path / "m", {**man, "version": 3})
    with pytest.raises(MapFormatError, match=r"written by a newer dinomix_ros \(map format version 3"):
        load_map(tmp_path / "m")
    with pytest.raises(MapFormatError, match="newer dinomix_ros"):
        read_manifest(tmp_path / "m")
    with pytest.raises(MapFormatError, match="unreadable here.*overwrite=True"):
        save_map(writer, tmp_path / "m")
    rewrite_manifest(tmp_path / "m", {**man, "format": "something.else"})
    with pytest.raises(MapFormatError, match="not a dinomix_ros map"):
        load_map(tmp_path / "m")
    bad = json.loads(json.dumps(man))
    bad["files"]["descriptors"][0]["file"] = "../../etc/descriptors.g000001.npy"
    rewrite_manifest(tmp_path / "m", bad)
    with pytest.raises(MapFormatError, match="expected a plain file name"):
        load_map(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text('{"format": ', "utf-8")
    with pytest.raises(MapFormatError, match="not valid UTF-8 JSON"):
        load_map(tmp_path / "m")


def test_the_manifest_is_sealed_and_unsealed_legacy_manifests_still_load(
        tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    man = manifest_of(tmp_path / "m")
    assert man[SEAL_KEY] == manifest_seal(man)
    for edit in (("metadata", "name"), ("fingerprint", "architecture"), ("created",)):  # any field, not only the id
        edited = json.loads(json.dumps(man))
        target = edited
        for key in edit[:-1]:
            target = target[key]
        target[edit[-1]] = "edited by hand"
        (tmp_path / "m" / "manifest.json").write_text(json.dumps(edited), "utf-8")
        with pytest.raises(MapFormatError, match="was changed after it was written"):
            load_map(tmp_path / "m")
    # A manifest written before seals existed (no key) loads, says so, and the next save seals it.
    legacy = {k: v for k, v in man.items() if k != SEAL_KEY}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(legacy, indent=2), "utf-8")
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.manifest"):
        loaded = load_map(tmp_path / "m")
    assert "has no manifest_sha256" in caplog.text
    assert_same_map(m, loaded)
    loaded.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    save_map(loaded, tmp_path / "m")  # appends: the unsealed manifest was the committed state
    assert manifest_of(tmp_path / "m")[SEAL_KEY] == manifest_seal(manifest_of(tmp_path / "m"))
    assert [c["rows"] for c in read_manifest(tmp_path / "m")["files"]["descriptors"]] == [12, 1]


def test_only_regular_files_are_opened_never_through_links(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    chunk = tmp_path / "m" / "descriptors.g000001.npy"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(chunk.read_bytes())  # identical content: only the link is wrong
    chunk.unlink()
    chunk.symlink_to(outside)
    with pytest.raises(MapFormatError, match="descriptors.g000001.npy is a symbolic link"):
        load_map(tmp_path / "m")
    chunk.unlink()
    os.mkfifo(chunk)  # opening a FIFO for reading blocks until a writer comes: it must never be opened
    t0 = time.monotonic()
    with pytest.raises(MapFormatError, match="descriptors.g000001.npy is a FIFO"):
        load_map(tmp_path / "m")
    assert time.monotonic() - t0 < 10
    manifest = tmp_path / "m" / "manifest.json"
    shutil.copy(manifest, tmp_path / "manifest-copy.json")
    manifest.unlink()
    manifest.symlink_to(tmp_path / "manifest-copy.json")
    with pytest.raises(MapFormatError, match="manifest.json is a symbolic link"):
        read_manifest(tmp_path / "m")


def test_a_lock_file_that_is_not_a_regular_file_refuses_the_save(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    lock = tmp_path / "m" / ".lock"
    lock.unlink()
    lock.symlink_to(tmp_path / "created-outside")  # dangling: O_CREAT through it would create a file out there
    m.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    with pytest.raises(MapError, match=r"\.lock is not a regular file"):
        save_map(m, tmp_path / "m")
    assert not os.path.lexists(tmp_path / "created-outside")
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(MapError, match=r"\.lock is not a regular file"):
        save_map(m, tmp_path / "m", lock_timeout_s=1.0)
    lock.unlink()
    save_map(m, tmp_path / "m")  # nothing was lost: the keyframe added before the refusals is saved now
    assert len(load_map(tmp_path / "m")) == 13


def test_descriptors_that_are_not_unit_vectors_are_refused_on_load(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    m.add(unit(rng, 3), stamps_ns=[1, 2, 3], cameras="front", frame_ids="map")
    save_map(m, tmp_path / "m")  # two chunks: the message gives the chunk row and the map row
    man = manifest_of(tmp_path / "m")
    rec = man["files"]["descriptors"][1]
    chunk = tmp_path / "m" / rec["file"]
    d = np.load(chunk)
    for value, message in ((3.0, r"row 1 \(map row 13\) has L2 norm [\d.]+, expected 1 \+- 0.01"),
                           (np.nan, r"row 1 \(map row 13\) contains NaN or inf")):
        bad = d.copy()
        bad[1] *= value
        np.save(chunk, bad)
        refresh_record(tmp_path / "m", rec)
        rewrite_manifest(tmp_path / "m", man)
        with pytest.raises(MapFormatError, match=message):
            load_map(tmp_path / "m")
        load_map(tmp_path / "m", verify=False)  # documented: verify=False checks sizes and headers only


def test_hostile_sizes_are_refused_with_one_line(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    man = manifest_of(tmp_path / "m")
    deep = json.dumps(man).replace('"metadata": {', '"metadata": {"x": ' + "[" * 50_000 + "]" * 50_000 + ", ", 1)
    (tmp_path / "m" / "manifest.json").write_text(deep, "utf-8")
    with pytest.raises(MapFormatError, match="nests 50002 levels deep, at most 32 are allowed"):
        load_map(tmp_path / "m")
    with pytest.raises(MapError, match="nests 41 levels deep, at most 31"):  # a save never writes what load refuses
        KeyframeMap.empty(fingerprint(), metadata={"x": json.loads("[" * 40 + "]" * 40)})
    rewrite_manifest(tmp_path / "m", man)
    table = tmp_path / "m" / man["files"]["keyframes"]["file"]
    lines = table.read_text("utf-8").splitlines(keepends=True)
    for edited, message in ((lines[:2] + ["x" * 200_000 + "\n"] + lines[2:], "field larger than field limit"),
                            (lines + lines[1:] * 1000, "more than the 12 keyframe rows")):
        table.write_text("".join(edited), "utf-8")
        refresh_record(tmp_path / "m", man["files"]["keyframes"])
        rewrite_manifest(tmp_path / "m", man)
        with pytest.raises(MapFormatError, match=message) as caught:
            load_map(tmp_path / "m")
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_missing_map_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(MapNotFoundError, match="directory does not exist"):
        load_map(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        load_map(tmp_path / "empty")


def test_missing_chunk_file_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    m, _ = full_map(rng)
    save_map(m, tmp_path / "m")
    (tmp_path / "m" / "descriptors.g000001.npy").unlink()
    with pytest.raises(MapFormatError, match=r"descriptors\.g000001\.npy is listed in manifest.json but missing"):
        load_map(tmp_path / "m")


# ---------------------------------------------------------------------- search index freshness


def test_index_kept_when_fresh_and_dropped_when_stale(tmp_path: Path, rng: np.random.Generator,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dinomix_ros.maps.storage")
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path, np.arange(50, dtype=np.uint8), "faiss_test")
    index_file = path / read_manifest(path)["files"]["index"]["file"]

    loaded = load_map(path)
    assert loaded.index_blob.tolist() == list(range(50))
    loaded.metadata["touched"] = True
    save_map(loaded, path)  # no rows added: the committed index still covers every row and is not rewritten
    assert read_manifest(path)["files"]["index"]["file"] == index_file.name and index_file.exists()

    lazy = load_map(path, load_index=False)
    assert lazy.index_blob is None
    save_map(lazy, path)
    assert load_map(path).index_kind == "faiss_test"

    loaded = load_map(path)
    loaded.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    assert loaded.index_blob is None and loaded.index_kind is None  # stale at once in memory
    caplog.clear()
    save_map(loaded, path)
    assert "index stale (built for 12 rows, map has 13)" in caplog.text
    assert read_manifest(path)["files"]["index"] is None and not index_file.exists()
    assert load_map(path).index_blob is None

    save_map(loaded, path, b"fresh", "faiss_test")
    assert load_map(path).index_blob.tobytes() == b"fresh"


def test_stale_or_corrupted_index_on_disk_is_ignored(tmp_path: Path, rng: np.random.Generator,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dinomix_ros.maps.loading")
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path, b"0123456789", "faiss_test")
    man = manifest_of(path)
    index_file = path / man["files"]["index"]["file"]
    index_file.write_bytes(b"0123456780")
    loaded = load_map(path)
    assert loaded.index_blob is None and len(loaded) == 12
    assert "corrupted or truncated" in caplog.text and "index stale, will be rebuilt" in caplog.text

    index_file.write_bytes(b"0123456789")
    man["files"]["index"]["rows"] = 11
    rewrite_manifest(path, man)
    caplog.clear()
    assert load_map(path).index_blob is None
    assert "built for 11 rows but the map has 12: index stale" in caplog.text


# ---------------------------------------------------------------------- crash safety

KILL_ROWS = 128
KILL_DIM = 512

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from test_storage import KILL_ROWS, kill_block
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.storage import save_map

path = sys.argv[1]
m = load_map(path)
k = len(m) // KILL_ROWS
print("ready", flush=True)
while True:
    desc, fields = kill_block(k)
    m.add(desc, **fields)
    k += 1
    m.metadata["blocks"] = k
    save_map(m, path, compact=sys.argv[3] == "compact")
"""


def kill_block(k: int) -> tuple[np.ndarray, dict]:
    """Rows of block ``k`` of the kill test; a pure function of ``k`` so any committed state can be recomputed."""
    rng = np.random.default_rng([1338, k])
    desc = unit(rng, KILL_ROWS, KILL_DIM)
    stamps = STAMP0 + k * KILL_ROWS + np.arange(KILL_ROWS, dtype=np.int64)
    return desc, {"stamps_ns": stamps, "cameras": "cam_ø", "frame_ids": "map",
                  "positions": rng.standard_normal((KILL_ROWS, 3)), "sources": [f"bag:/cam@{s}" for s in stamps]}


def leftovers(path: Path) -> list[str]:
    """Files a save in progress leaves behind: temp files, or generation files the manifest does not reference."""
    files = read_manifest(path)["files"]
    referenced = {files["keyframes"]["file"], files["table"]["file"], files["sources"]["file"],
                  *(c["file"] for c in files["descriptors"])}
    return sorted(n for n in os.listdir(path) if n.startswith(".tmp-")
                  or (n.endswith((".npy", ".csv", ".txt")) and n not in referenced))


def assert_committed_prefix(m: KeyframeMap, blocks: dict) -> int:
    """The map must equal blocks 0..k-1 exactly for some k (old or new state, never a mix); returns k."""
    assert len(m) % KILL_ROWS == 0
    k = len(m) // KILL_ROWS
    assert m.metadata["blocks"] == k
    for b in range(k):
        blocks.setdefault(b, kill_block(b))
    rows = slice(0, len(m))
    assert np.array_equal(m.ids, np.arange(len(m)))
    assert np.array_equal(m.descriptors, np.concatenate([blocks[b][0] for b in range(k)]).astype(np.float16))
    assert np.array_equal(m.stamps_ns, np.concatenate([blocks[b][1]["stamps_ns"] for b in range(k)])[rows])
    assert np.array_equal(m.positions, np.concatenate([blocks[b][1]["positions"] for b in range(k)]))
    assert m.sources.tolist() == [s for b in range(k) for s in blocks[b][1]["sources"]]
    return k


def test_sigkill_during_save_leaves_old_or_new_map(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "kill.dinomap"
    m = KeyframeMap.empty(fingerprint(dim=KILL_DIM), metadata={"blocks": 0})
    for k in range(2):
        desc, fields = kill_block(k)
        m.add(desc, **fields)
    m.metadata["blocks"] = 2
    save_map(m, path)
    blocks: dict = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    committed, mid_save = 2, []
    for delay in rng.uniform(0.0, 0.25, size=10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(TEST_DIR), "append"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()
            time.sleep(delay)
        finally:
            child.kill()  # SIGKILL: no cleanup handlers, no flush, the flock dies with the process
            _, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err.decode()  # it was still saving, not crashed
        if leftovers(path):
            mid_save.append(leftovers(path))
        k = assert_committed_prefix(load_map(path), blocks)
        assert k >= committed  # a committed save is never lost
        committed = k
    assert committed > 2, "the child never completed a save; the test proves nothing"
    assert mid_save, "no kill landed inside save(); rerun or lengthen the saves"
    final = load_map(path)
    save_map(final, path, compact=True)  # a normal save removes whatever the kills left behind
    assert leftovers(path) == []
    assert_committed_prefix(load_map(path), blocks)


def test_readers_see_whole_generations_while_a_writer_saves(tmp_path: Path) -> None:
    """Readers take no lock; a reader whose files are replaced under it re-reads the manifest and retries."""
    path = tmp_path / "busy.dinomap"
    m = KeyframeMap.empty(fingerprint(dim=KILL_DIM), metadata={"blocks": 1})
    desc, fields = kill_block(0)
    m.add(desc, **fields)
    save_map(m, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(TEST_DIR), "compact"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blocks: dict = {}
    seen = set()
    try:
        assert writer.stdout.readline() == b"ready\n", writer.stderr.read().decode()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen.add(assert_committed_prefix(load_map(path, mmap=False), blocks))
    finally:
        writer.kill()
        _, err = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, err.decode()
    assert len(seen) >= 3, f"the writer committed too few generations during the reads ({sorted(seen)})"


def test_orphans_of_a_crashed_save_load_fine_and_are_cleaned(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    junk = [".tmp-descriptors.g000002.npy.0a1b2c", ".tmp-manifest.json.3d4e5f", "descriptors.g000002.npy",
            "keyframes.g000002.csv", "index.g000002.faiss"]
    for name in junk:
        (path / name).write_bytes(b"partial write")
    (path / "notes.txt").write_text("operator notes", "utf-8")
    loaded = load_map(path)
    assert_same_map(m, loaded)
    loaded.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    save_map(loaded, path)
    man = read_manifest(path)
    assert man["generation"] == 3  # above every generation in the directory, so no name is reused
    assert sorted(os.listdir(path)) == sorted([".lock", "manifest.json", "notes.txt", "keyframes.g000003.csv",
                                               "table.g000003.npy", "sources.g000003.txt",
                                               "descriptors.g000001.npy", "descriptors.g000003.npy"])
    assert_same_map(loaded, load_map(path))

    first = tmp_path / "interrupted_first_save"
    first.mkdir()
    (first / ".tmp-descriptors.g000001.npy.aaaaaa").write_bytes(b"partial")
    with pytest.raises(MapNotFoundError, match="first save was interrupted"):
        load_map(first)
    save_map(m, first)
    assert not (first / ".tmp-descriptors.g000001.npy.aaaaaa").exists()


# ---------------------------------------------------------------------- concurrency


def test_second_writer_is_refused_instead_of_losing_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    a, b = load_map(path), load_map(path)
    a.add(unit(rng, 1), stamps_ns=[1], cameras="front", frame_ids="map")
    save_map(a, path)
    b.add(unit(rng, 2), stamps_ns=[1, 2], cameras="front", frame_ids="map")
    with pytest.raises(MapConflictError, match=r"generation 2 on disk, 1 expected"):
        save_map(b, path)
    assert len(load_map(path)) == 13


def test_save_waits_for_the_lock_and_times_out(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    with open(path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: conflicts like another process would
        t0 = time.monotonic()
        with pytest.raises(MapLockedError, match="locked by another process"):
            save_map(m, path, lock_timeout_s=0.2)
        assert 0.2 <= time.monotonic() - t0 < 5
    save_map(m, path, lock_timeout_s=0.2)
    assert read_manifest(path)["generation"] == 2


# ---------------------------------------------------------------------- write failures (dinomix_ros.util.files)


def failing_directory_fsync(code: int, call: int | None = None) -> Callable[[int], None]:
    """An os.fsync that fails with ``code`` on the ``call``-th fsync of a directory (every one if None)."""
    real = os.fsync
    seen = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(fd)
            if call is None or len(seen) == call:
                raise OSError(code, f"{os.strerror(code)} (injected)")
        real(fd)

    return fsync


def test_failed_write_leaves_the_previous_map_and_no_temp_files(tmp_path: Path, rng: np.random.Generator,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    before, manifest = sorted(os.listdir(path)), manifest_of(path)
    m.add(unit(rng, 2), stamps_ns=[1, 2], cameras="front", frame_ids="map")

    def half_written(w: object, kmap: KeyframeMap) -> None:
        w.write(b"id,stamp_ns\n")
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(storage, "write_csv", half_written)
    with pytest.raises(OSError, match="No space left on device"):
        save_map(m, path)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before  # no .tmp-* file, and the chunk written before the CSV is gone too
    assert manifest_of(path) == manifest
    save_map(m, path)  # the object is still in step with the disk: this appends
    assert [c["rows"] for c in read_manifest(path)["files"]["descriptors"]] == [12, 2]
    assert_same_map(m, load_map(path))


def test_directory_fsync_failure_fails_the_save_before_and_after_the_commit(tmp_path: Path, rng: np.random.Generator,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m"
    m, _ = full_map(rng)
    save_map(m, path)
    before, manifest = sorted(os.listdir(path)), manifest_of(path)
    m.add(unit(rng, 2), stamps_ns=[1, 2], cameras="front", frame_ids="map")
    monkeypatch.setattr(os, "fsync", failing_directory_fsync(errno.EIO, call=1))  # before the manifest names files
    with pytest.raises(OSError) as caught:
        save_map(m, path)
    assert caught.value.errno == errno.EIO
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before and manifest_of(path) == manifest  # not committed, nothing left over

    # Right after the commit: the new generation is in place but not known to be durable, so the save still fails...
    monkeypatch.setattr(os, "fsync", failing_directory_fsync(errno.EIO, call=2))
    with pytest.raises(OSError):
        save_map(m, path)
    monkeypatch.undo()
    assert (read_manifest(path)["generation"], read_manifest(path)["count"]) == (2, 14)
    # ...and the object knows what was committed: the next save appends instead of reporting a conflict.
    m.add(unit(rng, 1), stamps_ns=[3], cameras="front", frame_ids="map")
    save_map(m, path)
    assert [c["rows"] for c in read_manifest(path)["files"]["descriptors"]] == [12, 2, 1]
    assert_same_map(m, load_map(path))

    # A file system that cannot fsync directories (EINVAL) is not an error.
    monkeypatch.setattr(os, "fsync", failing_directory_fsync(errno.EINVAL))
    m.add(unit(rng, 1), stamps_ns=[4], cameras="front", frame_ids="map")
    save_map(m, tmp_path / "new_map")
    save_map(m, path, compact=True)
    monkeypatch.undo()
    assert_same_map(m, load_map(tmp_path / "new_map"))
    assert_same_map(m, load_map(path))
