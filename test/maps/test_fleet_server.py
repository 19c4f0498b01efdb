"""The fleet map against a Milvus Lite server in its own process, reached by URI as robots reach a Milvus server:
the server itself refuses another model's writes and reads, two robot processes pushing at once lose nothing, a
pusher killed in the middle and a server stopped in the middle lose nothing either.

What runs here is Milvus Lite's server (one gRPC worker: its engine is single-writer per collection), not a Milvus
server or cluster: those are not installable on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fleetfactory import fleet_fingerprint, random_map
from liteserver import LiteServer
from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc, schema_pb2

from dinomix_ros.maps.fleet.config import FleetConfig, default_collection, model_field, vector_field
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.records import SCALAR_FIELDS, keyframe_key, map_uid
from dinomix_ros.maps.fleet.store import FleetError, FleetStore
from dinomix_ros.maps.storage import save_map

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path):
    with LiteServer(tmp_path / "fleet.db") as s:
        yield s


def _raw_insert(port: int, collection: str, fp: dict) -> milvus_pb2.MutationResult:
    """One complete row of model ``fp``, sent with gRPC directly (no pymilvus, so no client-side schema check)."""
    def field(name: str, kind: str, value: object) -> schema_pb2.FieldData:
        scalars = {"VARCHAR": lambda v: {"string_data": schema_pb2.StringArray(data=[v])},
                   "INT64": lambda v: {"long_data": schema_pb2.LongArray(data=[v])},
                   "INT16": lambda v: {"int_data": schema_pb2.IntArray(data=[v])},
                   "DOUBLE": lambda v: {"double_data": schema_pb2.DoubleArray(data=[v])},
                   "JSON": lambda v: {"json_data": schema_pb2.JSONArray(data=[json.dumps(v).encode()])}}[kind](value)
        types = {"VARCHAR": "VarChar", "INT64": "Int64", "INT16": "Int16", "DOUBLE": "Double", "JSON": "JSON"}
        return schema_pb2.FieldData(field_name=name, type=schema_pb2.DataType.Value(types[kind]),
                                    scalars=schema_pb2.ScalarField(**scalars))

    values = {"VARCHAR": "x", "INT64": 1, "INT16": 0, "DOUBLE": 0.5, "JSON": {}}
    fields = [field("key", "VARCHAR", "intruder/0/0")]
    fields += [field(name, kind, values[kind]) for name, kind, _ in SCALAR_FIELDS]
    fields.append(schema_pb2.FieldData(field_name=model_field(fp), type=schema_pb2.DataType.Bool,
                                       scalars=schema_pb2.ScalarField(bool_data=schema_pb2.BoolArray(data=[True]))))
    vec = np.zeros(fp["descriptor_dim"], np.float32)
    vec[0] = 1.0
    fields.append(schema_pb2.FieldData(field_name=vector_field(fp), type=schema_pb2.DataType.FloatVector, vectors=(
        schema_pb2.VectorField(dim=vec.shape[0], float_vector=schema_pb2.FloatArray(data=vec.tolist())))))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        return stub.Insert(milvus_pb2.InsertRequest(collection_name=collection, fields_data=fields, num_rows=1),
                           timeout=30)


def test_the_server_refuses_another_models_writes_and_reads(server, rng, tmp_path) -> None:
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    model_a, model_b = fleet_fingerprint("dmx-aaaaaaaaaaaaaaaa"), fleet_fingerprint("dmx-bbbbbbbbbbbbbbbb")
    store = FleetStore(FleetConfig(uri=server.uri, robot="r1"), model_a)
    push_backlog(store, random_map(rng, 3, model_a), PushLedger(tmp_path / "l.json"), "r1")
    collection = default_collection(model_a)
    refused = _raw_insert(server.port, collection, model_b)  # a complete row of model B
    assert refused.status.code != 0 and refused.insert_cnt == 0
    assert any(name in refused.status.reason for name in (vector_field(model_a), vector_field(model_b),
                                                          model_field(model_a), model_field(model_b)))
    accepted = _raw_insert(server.port, collection, model_a)  # the same row of model A
    assert accepted.status.code == 0 and accepted.insert_cnt == 1, accepted.status.reason
    client = MilvusClient(server.uri, dedicated=True)
    with pytest.raises(MilvusException, match=model_field(model_b)):  # B's reads: their filter names B's marker
        client.query(collection, filter=f"{model_field(model_b)} == true", output_fields=["key"])
    with pytest.raises(MilvusException, match=vector_field(model_b)):  # B's searches: B's descriptor field
        client.search(collection, data=[[0.0] * 4095 + [1.0]], anns_field=vector_field(model_b), limit=1)
    with pytest.raises(MilvusException, match=model_field(model_b)):
        client.search(collection, data=[[0.0] * 4095 + [1.0]], anns_field=vector_field(model_a), limit=1,
                      filter=f"{model_field(model_b)} == true")
    assert client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"] == 4
    client.close()
    store.close()


def _push_process(map_path: Path, uri: str, robot: str, batch: int) -> subprocess.Popen:
    """``dinomix map push`` in a process of its own (a robot)."""
    return subprocess.Popen([sys.executable, "-m", "dinomix_ros.cli.main", "map", "push", str(map_path), "--fleet",
                             uri, "--fleet-robot", robot, "--fleet-batch-rows", str(batch)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


_WRITER = """
import json, sys, time
from pathlib import Path
from dinomix_ros.maps.fleet.config import FleetConfig
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.store import FleetStore
from dinomix_ros.maps.loading import load_map
map_path, uri, robot, go = sys.argv[1:5]
kmap = load_map(map_path)
store = FleetStore(FleetConfig(uri=uri, robot=robot, batch_rows=6), kmap.fingerprint)
store.connect()
while not Path(go).exists():
    time.sleep(0.01)
times = []
report = push_backlog(store, kmap, PushLedger.for_map(map_path), robot, on_batch=lambda r: times.append(time.time()))
print(json.dumps({"pushed": report.pushed, "error": report.error, "first": times[0], "last": times[-1]}))
"""


def test_two_robots_pushing_at_once_lose_nothing(server, rng, tmp_path) -> None:
    """Two robot processes, connected, start pushing at the same moment; their batches interleave."""
    fp = fleet_fingerprint()
    maps = {}
    for robot, n in (("r1", 120), ("r2", 90)):
        maps[robot] = random_map(rng, n, fp)
        save_map(maps[robot], tmp_path / f"{robot}.dinomap")
    go = tmp_path / "go"
    procs = {robot: subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / f"{robot}.dinomap"), server.uri,
                                      robot, str(go)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True) for robot in maps}
    FleetStore(FleetConfig(uri=server.uri), fp).connect()  # the collection exists: both push rows, not schemas
    go.touch()
    results = {}
    for robot, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results[robot] = json.loads(out)
        assert (results[robot]["pushed"], results[robot]["error"]) == (len(maps[robot]), None)
    (a, b) = results.values()
    assert a["first"] < b["last"] and b["first"] < a["last"], results  # the two pushes overlapped in time
    store = FleetStore(FleetConfig(uri=server.uri), fp)
    assert store.count() == 210
    want = [keyframe_key(robot, map_uid(m), i) for robot, m in maps.items() for i in m.ids]
    assert store.existing(want) == set(want)
    store.close()


def test_a_pusher_killed_in_the_middle_and_a_server_stopped_in_the_middle_lose_nothing(server, rng, tmp_path) -> None:
    fp = fleet_fingerprint()
    kmap = random_map(rng, 240, fp)
    path = tmp_path / "r1.dinomap"
    save_map(kmap, path)
    ledger = PushLedger.for_map(path)
    scope = {"uri": server.uri, "collection": default_collection(fp), "robot": "r1", "map_uid": map_uid(kmap)}
    proc = _push_process(path, server.uri, "r1", 5)
    deadline = time.monotonic() + 300
    while ledger.entry(scope)["pushed"] < 20:  # some batches acknowledged and recorded, most not
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the pusher recorded no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    first = ledger.entry(scope)["pushed"]
    assert 20 <= first < 240
    store = FleetStore(FleetConfig(uri=server.uri, batch_rows=10), fp)
    kept = store.count()
    assert first <= kept <= first + 5  # at most one acknowledged batch not yet in the ledger

    # the server stops in the middle of the next push: the rest waits in the backlog
    done = []

    def stop_after_three_batches(report) -> None:
        done.append(report.pushed)
        if len(done) == 3:
            server.stop()

    report = push_backlog(store, kmap, ledger, "r1", on_batch=stop_after_three_batches)
    assert report.error is not None and "unreachable" in report.error and "\n" not in report.error
    assert report.pending == 240 - ledger.entry(scope)["pushed_through"] - 1 > 0
    with pytest.raises(FleetError):
        store.count()
    server.start()
    report = push_backlog(store, kmap, ledger, "r1")
    assert report.error is None and report.pending == 0
    assert store.count() == 240  # every keyframe once: re-sent rows replaced themselves
    assert store.existing([keyframe_key("r1", map_uid(kmap), i) for i in range(240)]) == {
        keyframe_key("r1", map_uid(kmap), i) for i in range(240)}
    assert ledger.entry(scope)["pushed_through"] == 239
    store.close()


def test_a_lite_file_is_opened_by_one_process(rng, tmp_path) -> None:
    """Milvus Lite opens a .db folder in one process: a second robot process is refused in one line that says how
    several processes share it (a Lite server)."""
    db = str(tmp_path / "fleet.db")
    kmap = random_map(rng, 2)
    save_map(kmap, tmp_path / "r1.dinomap")
    FleetStore(FleetConfig(uri=db), kmap.fingerprint).connect()  # this process holds it
    try:
        proc = _push_process(tmp_path / "r1.dinomap", db, "r2", 2)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and out == "", err
        (line,) = err.strip().splitlines()
        assert "unreachable" in line and "one process at a time" in line and "milvus-lite server" in line, line
    finally:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(db)
