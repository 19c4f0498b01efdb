"""The content check of a loaded map: deferred past load, in blocks, with the refusal loading always gave; what a
memory-mapped load reads; and what a failed check stops (matching) and allows (appending saves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mapfactory import full_map
from scalefactory import city_map

import dinomix_ros.maps.storage as storage
from dinomix_ros.localization.health import ERROR, HealthMonitor
from dinomix_ros.localization.latest_frames import FrameCounts
from dinomix_ros.localization.live_map import LiveMap
from dinomix_ros.maps.errors import MapFormatError
from dinomix_ros.maps.index import index_for_map, save_map_with_index
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.mmap_index import MmapIndexParams
from dinomix_ros.maps.storage import save_map

REPO = Path(__file__).resolve().parents[2]


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _flip(path: Path, offset: int) -> None:
    """Change one byte of a file in place (what a failing disk or a stray write does), without touching the manifest."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture
def blocked_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 3000-row map whose descriptor chunk (1.5 MB) is hashed in 64 KiB blocks."""
    monkeypatch.setattr(storage, "BLOCK_BYTES", 1 << 16)
    kmap, _ = city_map(3000, seed=5)
    return save_map(kmap, tmp_path / "m.dinomap")


def test_saves_hash_chunks_in_blocks_and_load_checks_them(blocked_map: Path) -> None:
    rec = _manifest(blocked_map)["files"]["descriptors"][0]
    assert rec["block_bytes"] == 1 << 16 and len(rec["block_sha256"]) == -(-rec["bytes"] // (1 << 16))
    assert load_map(blocked_map).integrity.describe() == "verified"
    _flip(blocked_map / rec["file"], 5 * (1 << 16) + 100)
    with pytest.raises(MapFormatError, match=rf"{rec['file']} is corrupted or truncated \(bytes 327680\.\.393215: "
                                             r"sha256 [0-9a-f]{12}\.\.\., manifest says [0-9a-f]{12}\.\.\.\)"):
        load_map(blocked_map)


def test_a_chunk_corrupted_after_load_is_refused_by_the_check(blocked_map: Path) -> None:
    kmap = load_map(blocked_map, verify="deferred")
    assert not kmap.integrity.done and kmap.integrity.describe().startswith("not checked yet")
    live = LiveMap(kmap, matcher=None)
    q = np.asarray(kmap.descriptor_rows([7])[0], dtype=np.float32)
    assert live.process("front", 10**9, q).result.best.row == 7  # answers before the check
    rec = _manifest(blocked_map)["files"]["descriptors"][0]
    _flip(blocked_map / rec["file"], rec["bytes"] - 10)  # after load: the memory map and the check see it
    kmap.integrity.start()
    assert kmap.integrity.wait(timeout=120)
    assert kmap.integrity.failed and "is corrupted or truncated (bytes" in str(kmap.integrity.error)
    with pytest.raises(MapFormatError, match="is corrupted or truncated"):
        kmap.integrity.check()
    # the live map stops answering from the damaged map, says so, keeps recording and appending
    live.start_recording()
    outcome = live.process("front", 2 * 10**9, q)
    assert outcome.result.candidates == [] and outcome.result.rejected_by == ["map_damaged"] and outcome.recorded
    stats = live.stats()
    assert stats["map_check"].startswith("FAILED: ") and live.map_damaged
    level, message, _ = HealthMonitor().report(FrameCounts(), 0, {}, stats, {}, empty_map_warns=True)
    assert level == ERROR and message.startswith("map damaged, not matching against it")
    live.save(blocked_map)  # an append copies nothing: allowed
    assert _manifest(blocked_map)["count"] == 3001
    with pytest.raises(MapFormatError, match="not saved: this save would copy the loaded map's rows"):
        save_map(kmap, blocked_map.parent / "copy.dinomap")  # a full write would launder the damaged chunk


def test_a_resealed_chunk_with_bad_rows_fails_the_check_with_the_row(tmp_path: Path, rng: np.random.Generator) -> None:
    kmap, _ = full_map(rng, 30)
    path = save_map(kmap, tmp_path / "m.dinomap")
    man = _manifest(path)
    rec = man["files"]["descriptors"][0]
    arr = np.load(path / rec["file"])
    arr[17] *= 3
    with open(path / rec["file"], "wb") as f:
        np.save(f, arr)
    import hashlib

    from dinomix_ros.maps.manifest import manifest_bytes

    rec["sha256"] = hashlib.sha256((path / rec["file"]).read_bytes()).hexdigest()
    (path / "manifest.json").write_bytes(manifest_bytes(man))
    loaded = load_map(path, verify="background")
    assert loaded.integrity.wait(timeout=60) and loaded.integrity.failed
    assert "row 17 (map row 17) has L2 norm 3" in str(loaded.integrity.error)


CHILD = r"""
import json, os, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from dinomix_ros.maps.index import index_for_map
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.mmap_index import MmapIndexParams

def io():
    return {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}

def evict(path):
    # this file's clean pages leave the page cache: what the map then reads comes from the disk, page by page
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

def resident(name):
    # bytes of the file mapped into this process (its own page-table entries, whatever the page cache holds)
    total, hit = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            hit = line.rstrip().endswith(name)
        elif hit and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total

chunk = json.load(open(sys.argv[1] + "/manifest.json"))["files"]["descriptors"][0]["file"]
evict(sys.argv[1] + "/" + chunk)
before = io()
kmap = load_map(sys.argv[1], verify="deferred")
index = index_for_map(kmap, "auto", mmap_params=MmapIndexParams(pca_dim=64, pq_m=16, nprobe=16, shortlist=64))
D, I = index.search(np.asarray(kmap.descriptor_rows([11])[0], np.float32), 5)
loaded = io()
mapped = resident(chunk)
kmap.integrity.run()
checked = io()
print(json.dumps({"load_rchar": loaded["rchar"] - before["rchar"], "mapped": mapped, "best": int(I[0, 0]),
                  "load_read_bytes": loaded["read_bytes"] - before["read_bytes"],
                  "kind": index.kind, "check_rchar": checked["rchar"] - loaded["rchar"]}))
"""


def test_a_memory_mapped_load_reads_a_small_part_of_the_map(tmp_path: Path) -> None:
    """Measured in a fresh process, the chunk's pages evicted from the page cache first (posix_fadvise DONTNEED on
    that file only): bytes read() by load + index + first query (/proc/self/io rchar), bytes fetched from the disk
    (read_bytes, memory-map faults included), and the resident pages of the chunk's memory map (/proc/self/smaps);
    the content check then reads every byte."""
    kmap, _ = city_map(20_000, seed=6, dim=1024)
    params = MmapIndexParams(pca_dim=64, pq_m=16, nprobe=16, shortlist=64)
    path = save_map_with_index(kmap, tmp_path / "m.dinomap", index_for_map(kmap, "ivfpq_mmap", mmap_params=params))
    chunk = path / _manifest(path)["files"]["descriptors"][0]["file"]
    size = chunk.stat().st_size  # 20k x 1024 float16 = 41 MB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(REPO)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kind"] == "ivfpq_mmap" and r["best"] == 11
    other = sum(f.stat().st_size for f in path.iterdir() if f != chunk)  # CSV, table, codes, index: read at load
    assert r["load_rchar"] < other + 2_000_000 and r["load_rchar"] < 0.5 * size, r
    assert r["mapped"] < 0.1 * size, r  # the short list's 64 rows, not the chunk
    assert r["load_read_bytes"] < 0.3 * size, r
    assert r["check_rchar"] >= size, r  # the check reads every byte


def test_local_features_are_read_only_for_the_verified_candidates(tmp_path: Path) -> None:
    """The feature chunk is memory-mapped: verifying 5 candidates maps their rows' pages, not the chunk."""
    from dinomix_ros.imaging.features import FeatureConfig, LocalFeatures
    from dinomix_ros.localization.verification import VerificationConfig

    kmap, _ = city_map(4000, seed=7)
    rng = np.random.default_rng(0)

    def features(i: int) -> LocalFeatures:
        pts = rng.uniform(0, 600, (400, 2)).astype(np.float32)
        desc = rng.integers(0, 256, (400, 32), dtype=np.uint8)
        return LocalFeatures(pts, desc, np.full(400, np.nan, np.float32), (640, 480), "orb")

    fresh = KeyframeMap.empty(kmap.fingerprint)
    fresh.enable_local_features("orb", 400)
    x = np.asarray(kmap.descriptor_rows(np.arange(4000)), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for start in range(0, 4000, 500):
        fresh.add(x[start:start + 500], stamps_ns=np.arange(start, start + 500) * 10**8, cameras="front",
                  frame_ids="map", features=[features(i) for i in range(500)])
    path = save_map(fresh, tmp_path / "f.dinomap")
    chunk = _manifest(path)["files"]["features"][0]
    fd = os.open(path / chunk["file"], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # from the disk, page by page (only this file's cache)
    os.close(fd)
    loaded = load_map(path, verify="deferred")
    size = chunk["bytes"]  # 4000 x 15,200 bytes = 61 MB
    live = LiveMap(loaded, verification=VerificationConfig(candidates=5), features=FeatureConfig())
    live.process("front", 10**12, x[123], features=features(0))
    resident = 0
    hit = False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            hit = line.rstrip().endswith(str(path / chunk["file"]))
        elif hit and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    assert 5 * 15_200 <= resident < 5 * (15_200 + 2 * 65_536), resident  # the 5 candidates' rows
    assert resident < 0.02 * size
    loaded.integrity.close()
