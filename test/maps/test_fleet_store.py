"""The fleet map in Milvus Lite (embedded, a .db folder per test): search equals a local exact FAISS search, a region
pull returns exactly the keyframes inside, pushes are idempotent and recorded, pulled keyframes are never pushed
back, an unreachable server or another model's collection loses nothing, and one refused keyframe blocks no other.

Milvus Lite is a slow embedded test engine: the maps here have hundreds of rows, not thousands.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fleetfactory import fleet_fingerprint, placed_map, random_map, unit
from liteserver import free_port

from dinomix_ros.maps.fleet.config import FleetConfig, default_collection, model_field, vector_field
from dinomix_ros.maps.fleet.push import PushLedger, push_backlog
from dinomix_ros.maps.fleet.records import PULLED_PREFIX, SCALAR_FIELDS, keyframe_key, map_uid
from dinomix_ros.maps.fleet.region import Region
from dinomix_ros.maps.fleet.store import (
    FINGERPRINT_PROPERTY, SCHEMA_PROPERTY, SCHEMA_VERSION, FleetModelError, FleetStore, FleetUnavailableError,
)
from dinomix_ros.maps.index import PlaceIndex
from dinomix_ros.maps.keyframes import KeyframeMap


@pytest.fixture
def lite_db(tmp_path):
    """A Milvus Lite data folder, served in this process while the test runs, released after it."""
    path = str(tmp_path / "fleet.db")
    yield path
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)


def _store(uri: str, fp: dict, **kwargs) -> FleetStore:
    return FleetStore(FleetConfig(uri=uri, robot=kwargs.pop("robot", "r1"), **kwargs), fp)


def test_search_on_the_server_equals_local_exact_faiss(lite_db, rng, tmp_path) -> None:
    kmap = random_map(rng, 240)  # 4096-d float16 descriptors, as robots store them
    store = _store(lite_db, kmap.fingerprint, batch_rows=80)
    report = push_backlog(store, kmap, PushLedger(tmp_path / "ledger.json"), "r1")
    assert (report.pushed, report.pending, report.error) == (240, 0, None)
    noisy = kmap.descriptors_f32()[[3, 50, 99, 120, 239]] + 0.02 * rng.standard_normal((5, 4096)).astype(np.float32)
    queries = np.vstack([noisy, unit(rng, 3, 4096)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = PlaceIndex(4096, "exact", "cpu")
    index.add(kmap.descriptors_f32())
    D, I = index.search(queries, 10)
    hits = store.search(queries, 10)
    uid = map_uid(kmap)
    for q in range(queries.shape[0]):
        assert [h["key"] for h in hits[q]] == [keyframe_key("r1", uid, kmap.ids[i]) for i in I[q]], q
        np.testing.assert_allclose([h["similarity"] for h in hits[q]], D[q], atol=1e-4)  # same float32 vectors
    assert [h[0]["keyframe_id"] for h in hits[:5]] == [3, 50, 99, 120, 239]


@pytest.mark.parametrize("kind", ["position", "gps"])
def test_a_region_pull_returns_exactly_the_keyframes_inside(lite_db, rng, tmp_path, kind: str) -> None:
    center_xy, center_gps, radius = (12.0, -3.0), (55.7107, 13.1935), 40.0
    kmap, near_xy, near_gps = placed_map(rng, center_xy, center_gps, radius)
    store = _store(lite_db, kmap.fingerprint)
    assert push_backlog(store, kmap, PushLedger(tmp_path / "l.json"), "r1").pushed == len(kmap)
    region = (Region("position", center_xy, radius, "map") if kind == "position" else
              Region("gps", center_gps, radius))
    expected = near_xy if kind == "position" else near_gps
    keys, dist = store.region_keys(region, limit=1000)
    uid = map_uid(kmap)
    assert set(keys) == {keyframe_key("r1", uid, i) for i in expected}
    assert np.all(np.diff(dist) >= 0) and dist.max() <= radius  # nearest first
    nearest, _ = store.region_keys(region, limit=3)
    assert nearest == keys[:3]
    pulled = store.pull(region, 1000, own_robot="r2")
    local = KeyframeMap.empty(kmap.fingerprint)
    added = pulled.add_to(local)
    assert len(added.ids) == len(expected) and not added.refused
    rows = sorted(int(s.rsplit("/", 1)[1]) for s in local.sources)
    assert rows == sorted(expected)
    order = [int(s.rsplit("/", 1)[1]) for s in local.sources]
    np.testing.assert_array_equal(local.descriptors, kmap.descriptors[order])
    np.testing.assert_array_equal(local.positions, kmap.positions[order])
    np.testing.assert_array_equal(local.gps, kmap.gps[order])
    assert set(local.cameras) == {"r1:front"}


def test_pushes_are_idempotent_and_recorded(lite_db, rng, tmp_path) -> None:
    kmap = random_map(rng, 30)
    store = _store(lite_db, kmap.fingerprint, batch_rows=8)
    ledger = PushLedger.for_map(tmp_path / "m.dinomap")
    assert ledger.path == tmp_path / "m.dinomap.fleet.json"
    assert push_backlog(store, kmap, ledger, "r1").pushed == 30
    entry = ledger.entry({"uri": lite_db, "collection": store.collection, "robot": "r1", "map_uid": map_uid(kmap)})
    assert (entry["pushed_through"], entry["pushed"], entry["refused"]) == (29, 30, {})
    assert push_backlog(store, kmap, ledger, "r1").pushed == 0  # nothing is pushed twice
    ledger.path.unlink()  # a lost ledger re-sends: the keys replace, never duplicate
    assert push_backlog(store, kmap, ledger, "r1").pushed == 30
    assert store.count() == 30
    kmap.add(unit(rng, 5, 4096), stamps_ns=np.arange(5) + 10**9, cameras="front", frame_ids="map")
    report = push_backlog(store, kmap, ledger, "r1")
    assert (report.pushed, store.count()) == (5, 35)
    assert store.existing([keyframe_key("r1", map_uid(kmap), i) for i in (0, 34, 35)]) == {
        keyframe_key("r1", map_uid(kmap), i) for i in (0, 34)}


def test_pulled_keyframes_are_never_pushed_back(lite_db, rng, tmp_path) -> None:
    fp = fleet_fingerprint()
    theirs = random_map(rng, 20, fp)
    push_backlog(_store(lite_db, fp, robot="r1"), theirs, PushLedger(tmp_path / "a.json"), "r1")
    mine = KeyframeMap.empty(fp)
    store = _store(lite_db, fp, robot="r2")
    added = store.pull(Region.everything(), 100, "r2").add_to(mine)
    assert len(added.ids) == 20 and all(s.startswith(PULLED_PREFIX) for s in mine.sources)
    mine.add(unit(rng, 4, 4096), stamps_ns=[1, 2, 3, 4], cameras="front", frame_ids="map")
    report = push_backlog(store, mine, PushLedger(tmp_path / "b.json"), "r2")
    assert (report.pushed, store.count()) == (4, 24)
    # a second pull adds nothing: the map holds every keyframe of the fleet (its own too)
    again = store.pull(Region.everything(), 100, "r2", exclude=("r2", map_uid(mine))).add_to(mine)
    assert (len(again.ids), again.present) == (0, 20)


def test_an_unreachable_server_loses_nothing(rng, tmp_path) -> None:
    kmap = random_map(rng, 6)
    store = _store(f"http://127.0.0.1:{free_port()}", kmap.fingerprint, timeout_s=2.0)
    with pytest.raises(FleetUnavailableError) as info:
        store.connect()
    assert "unreachable" in str(info.value) and "\n" not in str(info.value)
    ledger = PushLedger(tmp_path / "l.json")
    report = push_backlog(store, kmap, ledger, "r1")
    assert (report.pushed, report.pending) == (0, 6) and "unreachable" in report.error
    assert not ledger.path.exists()  # nothing was recorded as pushed


def test_another_model_can_neither_push_nor_pull(lite_db, rng, tmp_path) -> None:
    model_a, model_b = fleet_fingerprint("dmx-aaaaaaaaaaaaaaaa"), fleet_fingerprint("dmx-bbbbbbbbbbbbbbbb")
    push_backlog(_store(lite_db, model_a), random_map(rng, 5, model_a), PushLedger(tmp_path / "a.json"), "r1")
    intruder = _store(lite_db, model_b, collection=default_collection(model_a))
    with pytest.raises(FleetModelError, match="holds descriptors of model dmx-aaaaaaaaaaaaaaaa"):
        intruder.connect()
    ledger = PushLedger(tmp_path / "b.json")
    with pytest.raises(FleetModelError):  # a collection-level refusal, not five refused keyframes
        push_backlog(intruder, random_map(rng, 5, model_b), ledger, "r1")
    assert not ledger.path.exists()
    with pytest.raises(FleetModelError):
        intruder.pull(Region.everything(), 10, "r9")
    own = _store(lite_db, model_b)  # its own collection is another one
    assert own.collection != intruder.collection
    assert push_backlog(own, random_map(rng, 2, model_b), ledger, "r1").pushed == 2


def test_one_refused_keyframe_blocks_no_other(lite_db, rng, tmp_path) -> None:
    """A collection whose schema allows shorter sources (as another dinomix_ros version might make): the keyframes
    it refuses are recorded and retried, the others pushed."""
    from pymilvus import DataType, MilvusClient

    fp = fleet_fingerprint()
    client = MilvusClient(lite_db)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=160)
    schema.add_field(vector_field(fp), DataType.FLOAT_VECTOR, dim=4096)
    schema.add_field(model_field(fp), DataType.BOOL)
    for name, kind, params in SCALAR_FIELDS:
        params = {**params, "max_length": 24} if name == "source" else params
        schema.add_field(name, getattr(DataType, kind), **params)
    index = client.prepare_index_params()
    index.add_index(field_name=vector_field(fp), index_type="FLAT", metric_type="IP")
    client.create_collection(default_collection(fp), schema=schema, index_params=index, properties={
        FINGERPRINT_PROPERTY: json.dumps(fp), SCHEMA_PROPERTY: SCHEMA_VERSION})
    kmap = KeyframeMap.empty(fp)
    sources = ["short"] * 10
    sources[3] = sources[7] = "a source much longer than twenty-four bytes"
    kmap.add(unit(rng, 10, 4096), stamps_ns=np.arange(10), cameras="front", frame_ids="map", sources=sources)
    store = _store(lite_db, fp, batch_rows=4)
    ledger = PushLedger(tmp_path / "l.json")
    report = push_backlog(store, kmap, ledger, "r1")
    assert (report.pushed, report.refused, report.pending, report.error) == (8, 2, 2, None)
    assert "max_length" in report.refused_reasons[0] and store.count() == 8
    again = push_backlog(store, kmap, ledger, "r1")  # retried, refused again, the others untouched
    assert (again.pushed, again.refused) == (0, 2) and store.count() == 8


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]", '{"format": "dinomix_fleet_ledger", "entries": 5}',
                                    "wrong types"])
def test_a_damaged_ledger_costs_a_resend_never_a_duplicate(lite_db, rng, tmp_path, damage: str) -> None:
    kmap = random_map(rng, 6)
    store = _store(lite_db, kmap.fingerprint)
    ledger = PushLedger(tmp_path / "l.json")
    assert push_backlog(store, kmap, ledger, "r1").pushed == 6
    if damage == "wrong types":
        damage = json.dumps({"format": "dinomix_fleet_ledger", "entries": [
            {"uri": lite_db, "collection": store.collection, "robot": "r1", "map_uid": map_uid(kmap),
             "pushed_through": "x", "pushed": [], "refused": {"abc": 1, "3": "old reason"}}]})
    ledger.path.write_text(damage)
    report = push_backlog(store, kmap, ledger, "r1")
    assert (report.pushed, report.error, store.count()) == (6, None, 6)
    assert push_backlog(store, kmap, ledger, "r1").pushed == 0  # and the rewritten ledger is sound again
