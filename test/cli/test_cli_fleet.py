"""``dinomix map push`` and ``dinomix map pull`` in-process against Milvus Lite (an embedded .db folder): a map goes to
the fleet and a region comes back as a map, pulled keyframes are never pushed back, and every failure is one line
with exit code 2."""

from __future__ import annotations

import json

import pytest
from cliutil import MODEL, run_error, run_json
from fleetfactory import fleet_fingerprint, placed_map, random_map
from liteserver import free_port

from dinomix_ros.maps.fleet.config import default_collection
from dinomix_ros.model.checkpoint import ModelSource
from dinomix_ros.maps.loading import load_map
from dinomix_ros.maps.storage import save_map

PULL_MODEL = [a for a in MODEL if a != "--quiet"]  # a pull describes no image: no progress bar to quieten


@pytest.fixture(scope="module")
def random_model_fingerprint() -> dict:
    """The fingerprint of the model MODEL names (seeded random ViT-S/14): pulls read its collection."""
    return ModelSource(random_weights=True).load().fingerprint.to_dict()


@pytest.fixture
def lite_db(tmp_path):
    path = str(tmp_path / "fleet.db")
    yield path
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)


def test_push_then_pull_regions_into_a_map(tmp_path, rng, capsys, lite_db, random_model_fingerprint) -> None:
    center_xy, center_gps, radius = (12.0, -3.0), (55.7107, 13.1935), 40.0
    kmap, near_xy, near_gps = placed_map(rng, center_xy, center_gps, radius, fp=random_model_fingerprint)
    save_map(kmap, tmp_path / "r1.dinomap")
    pushed = run_json(capsys, "map", "push", tmp_path / "r1.dinomap", "--fleet", lite_db, "--fleet-robot", "r1",
                      "--fleet-batch-rows", "16")
    assert (pushed["pushed"], pushed["pending"], pushed["robot"]) == (len(kmap), 0, "r1")
    assert json.loads((tmp_path / "r1.dinomap.fleet.json").read_text())["entries"][0]["pushed"] == len(kmap)
    again = run_json(capsys, "map", "push", tmp_path / "r1.dinomap", "--fleet", lite_db, "--fleet-robot", "r1")
    assert again["pushed"] == 0

    out = tmp_path / "site.dinomap"
    pulled = run_json(capsys, "map", "pull", out, "--fleet", lite_db, "--near", "12,-3", "--radius", "40",
                      "--fleet-robot", "r2", *PULL_MODEL)
    assert (pulled["added"], pulled["keyframes"], pulled["frames"]) == (len(near_xy), len(near_xy), ["map"])
    site = load_map(out, expected_fingerprint=random_model_fingerprint)
    assert sorted(int(s.rsplit("/", 1)[1]) for s in site.sources) == sorted(near_xy)
    assert site.metadata["name"] == "site" and site.metadata["fleet_pulls"][0]["added"] == len(near_xy)
    gps = run_json(capsys, "map", "pull", out, "--fleet", lite_db, "--gps", "55.7107,13.1935", "--radius", "40",
                   "--append", "--fleet-robot", "r2", *PULL_MODEL)
    assert (gps["added"], gps["keyframes"]) == (len(near_gps), len(near_xy) + len(near_gps))
    everything = run_json(capsys, "map", "pull", out, "--fleet", lite_db, "--all", "--append", "--fleet-robot", "r2",
                          *PULL_MODEL)
    assert everything["present"] == len(near_xy) + len(near_gps)  # held already: not added twice
    assert everything["keyframes"] == len(kmap)
    back = run_json(capsys, "map", "push", out, "--fleet", lite_db, "--fleet-robot", "r2")
    assert back["pushed"] == 0  # every keyframe of it came from the fleet


def test_failures_are_one_line(tmp_path, rng, capsys, caplog, lite_db, random_model_fingerprint) -> None:
    kmap = random_map(rng, 4, fleet_fingerprint("dmx-aaaaaaaaaaaaaaaa"))
    save_map(kmap, tmp_path / "a.dinomap")
    dead = f"http://127.0.0.1:{free_port()}"
    line = run_error(capsys, caplog, "map", "push", tmp_path / "a.dinomap", "--fleet", dead, "--fleet-timeout-s", "2")
    assert "unreachable" in line and "0 keyframes" in line and "4 still to push" in line
    run_json(capsys, "map", "push", tmp_path / "a.dinomap", "--fleet", lite_db)
    other = random_map(rng, 2, fleet_fingerprint("dmx-bbbbbbbbbbbbbbbb"))
    save_map(other, tmp_path / "b.dinomap")
    line = run_error(capsys, caplog, "map", "push", tmp_path / "b.dinomap", "--fleet", lite_db, "--fleet-collection",
                     default_collection(kmap.fingerprint))
    assert "holds descriptors of model dmx-aaaaaaaaaaaaaaaa" in line
    line = run_error(capsys, caplog, "map", "pull", tmp_path / "new.dinomap", "--fleet", lite_db, "--all",
                     "--fleet-collection", default_collection(kmap.fingerprint), *PULL_MODEL)
    assert "holds descriptors of model dmx-aaaaaaaaaaaaaaaa" in line and not (tmp_path / "new.dinomap").exists()
    for args, words in ((["--near", "1,2"], "needs --radius"), (["--all", "--radius", "3"], "does not apply"),
                        (["--gps", "95,0", "--radius", "3"], "lat in [-90, 90]")):
        line = run_error(capsys, caplog, "map", "pull", tmp_path / "n.dinomap", "--fleet", lite_db, *args, *PULL_MODEL)
        assert words in line
    line = run_error(capsys, caplog, "map", "pull", tmp_path / "a.dinomap", "--fleet", lite_db, "--all", *PULL_MODEL)
    assert "already holds a map" in line
    line = run_error(capsys, caplog, "map", "pull", tmp_path / "empty.dinomap", "--fleet", lite_db, "--near", "0,0",
                     "--radius", "1", *PULL_MODEL)
    assert "no keyframe" in line and not (tmp_path / "empty.dinomap").exists()
