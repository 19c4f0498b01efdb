"""A stored search index that declares far more data than it holds (a faiss 'memory bomb') must not be read in
the process: it is refused and the index is rebuilt from the map's descriptors."""

from __future__ import annotations

import resource

import faiss
import numpy as np
import pytest

from dinomix_ros.maps.errors import IndexFormatError
from dinomix_ros.maps.faiss_backend import read_faiss_index
from dinomix_ros.maps.index import index_for_map
from dinomix_ros.maps.keyframes import KeyframeMap

DIM = 4096
FINGERPRINT = {"id": "dmx-test", "architecture": "test", "weights_sha256": "0" * 64, "preprocessing": "p",
               "descriptor_dim": DIM}
CODES_SIZE_OFFSET = 37  # IndexFlatIP: fourcc, d, ntotal, 2 dummies, is_trained, metric, then the float count


def _bomb(dim: int, rows: np.ndarray, claimed_bytes: int) -> bytes:
    index = faiss.IndexFlatIP(dim)
    index.add(rows)
    blob = bytearray(faiss.serialize_index(index).tobytes())
    assert int.from_bytes(blob[CODES_SIZE_OFFSET:CODES_SIZE_OFFSET + 8], "little") == rows.size
    blob[CODES_SIZE_OFFSET:CODES_SIZE_OFFSET + 8] = (claimed_bytes // 4).to_bytes(8, "little")
    return bytes(blob)


@pytest.mark.parametrize("claimed_gib", [4, 64, 1 << 20])
def test_an_index_claiming_gigabytes_is_refused_without_allocating_them(claimed_gib: int, fault_probe) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ours, or faiss's own per-vector limit for absurd sizes: refused either way, never allocated
    with pytest.raises(IndexFormatError, match="asks for far more memory than its size|deserialization_vector_byte"):
        read_faiss_index(np.frombuffer(_bomb(4, np.ones((1, 4), np.float32), claimed_gib << 30), np.uint8))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    fault_probe("hostile map", f"index blob claiming {claimed_gib} GiB", crashed=grown_mib > 1024)
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"


def test_a_map_with_a_bomb_index_is_served_by_a_rebuilt_index() -> None:
    x = np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kmap = KeyframeMap.empty(FINGERPRINT, storage_dtype="float32")
    kmap.add(x, stamps_ns=np.arange(5), cameras="c", frame_ids="map")
    kmap.set_index(_bomb(DIM, x, 8 << 30), "faiss_flat_ip")
    index = index_for_map(kmap, "exact", "cpu")
    assert index.ntotal == 5
    D, I = index.search(x[2:3], 1)
    assert I[0, 0] == 2 and D[0, 0] == pytest.approx(1.0, abs=1e-5)
