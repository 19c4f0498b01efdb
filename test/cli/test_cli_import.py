"""``dinomix map import`` and ``dinomix map query --descriptors``: maps from descriptors computed elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cliutil import run_error, run_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "maps"))
from scalefactory import city, fingerprint_of  # noqa: E402

from dinomix_ros.maps.build_import import import_descriptors  # noqa: E402
from dinomix_ros.maps.errors import MapError  # noqa: E402
from dinomix_ros.maps.loading import load_map  # noqa: E402
from dinomix_ros.model.checkpoint import ModelFingerprint  # noqa: E402

N = 3000


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """D.npy (float32 unit rows), a geotag CSV of N rows in the same order, queries, a fingerprint file."""
    x, place, queries, _ = city(N, 20, seed=11)
    np.save(tmp_path / "D.npy", x)
    np.save(tmp_path / "Q.npy", queries)
    rows = ["image,lat,lon"] + [f"img_{i:05d}.jpg,{55.70 + 1e-5 * i:.7f},{13.19 + 2e-5 * place[i]:.7f}"
                                for i in range(N)]
    (tmp_path / "geo.csv").write_text("\n".join(rows) + "\n")
    fp = ModelFingerprint.from_dict({k: v for k, v in fingerprint_of().items() if k != "id"}).to_dict()
    (tmp_path / "fp.json").write_text(json.dumps(fp))
    return {"dir": tmp_path, "x": x, "queries": queries, "fp": fp}


def test_import_then_query_descriptors_round_trip(inputs: dict, capsys) -> None:
    d = inputs["dir"]
    report = run_json(capsys, "map", "import", d / "city.dinomap", "--descriptors", d / "D.npy", "--csv",
                      d / "geo.csv", "--fingerprint", d / "fp.json", "--quiet")
    assert report["keyframes"] == N and report["index"] == "exact" and report["storage_dtype"] == "float16"
    assert report["model"] == inputs["fp"]["id"] and report["report"]["descriptor_dtype"] == "float32"
    kmap = load_map(d / "city.dinomap", expected_fingerprint=inputs["fp"])
    assert len(kmap) == N and kmap.sources[17].endswith("img_00017.jpg")
    assert kmap.frames == ["utm"] and set(kmap.utm_zones.tolist()) == {33}
    np.testing.assert_allclose(kmap.descriptor_rows([0, 1234]), inputs["x"][[0, 1234]], atol=1e-3)
    assert np.isclose(kmap.gps[10, 0], 55.70 + 1e-4) and np.isfinite(kmap.utm).all()
    # stored queries: exact rows of the map come back as their own best match, with their row and search time
    np.save(d / "own.npy", inputs["x"][[5, 2999]])
    out = run_json(capsys, "map", "query", d / "city.dinomap", "--descriptors", d / "own.npy", "--fingerprint",
                   inputs["fp"]["id"], "--top-k", "3")
    assert [q["candidates"][0]["row"] for q in out["queries"]] == [5, 2999]
    assert all(q["search_ms"] >= 0 and len(q["candidates"]) == 3 for q in out["queries"])
    assert out["queries"][0]["candidates"][0]["similarity"] > 0.999 and out["map_check"] == "verified"
    # real queries, with the fingerprint from `dinomix describe`'s sidecar (beside Q.npy)
    (d / "Q.npy.json").write_text(json.dumps({"images": [], "model": {"fingerprint": inputs["fp"]}}))
    out = run_json(capsys, "map", "query", d / "city.dinomap", "--descriptors", d / "Q.npy")
    exact = (inputs["x"].astype(np.float16).astype(np.float32) @ inputs["queries"].T).argmax(axis=0)
    assert [q["candidates"][0]["row"] for q in out["queries"]] == exact.tolist()
    # a NaN row (an image `describe --skip-errors` could not read) is an entry with an error, not a failure
    bad = inputs["queries"][:2].copy()
    bad[1] = np.nan
    np.save(d / "nan.npy", bad)
    out = run_json(capsys, "map", "query", d / "city.dinomap", "--descriptors", d / "nan.npy", "--fingerprint",
                   d / "fp.json")
    assert "candidates" in out["queries"][0] and out["queries"][1]["error"].startswith("no descriptor")


def test_import_and_query_refuse_bad_inputs_with_one_line(inputs: dict, capsys, caplog) -> None:
    d = inputs["dir"]
    common = ["--csv", d / "geo.csv", "--fingerprint", d / "fp.json", "--quiet"]
    np.save(d / "wide.npy", np.zeros((N, 512), np.float32))
    assert "has shape (3000, 512), expected (N, 256)" in run_error(
        capsys, caplog, "map", "import", d / "a.dinomap", "--descriptors", d / "wide.npy", *common)
    np.save(d / "f64.npy", inputs["x"].astype(np.float64))
    assert "holds float64 values, expected float32 or float16" in run_error(
        capsys, caplog, "map", "import", d / "b.dinomap", "--descriptors", d / "f64.npy", *common)
    np.save(d / "ints.npy", np.zeros((N, 256), np.int8))
    assert "holds int8 values" in run_error(
        capsys, caplog, "map", "import", d / "c.dinomap", "--descriptors", d / "ints.npy", *common)
    np.save(d / "short.npy", inputs["x"][:-1])
    assert "geo.csv has 3000 data rows but" in run_error(
        capsys, caplog, "map", "import", d / "e.dinomap", "--descriptors", d / "short.npy", *common)
    scaled = inputs["x"].copy()
    scaled[1700] *= 2
    np.save(d / "scaled.npy", scaled)
    assert "scaled.npy row 1700 has L2 norm 2" in run_error(
        capsys, caplog, "map", "import", d / "f.dinomap", "--descriptors", d / "scaled.npy", *common)
    assert "which model computed" in run_error(
        capsys, caplog, "map", "import", d / "g.dinomap", "--descriptors", d / "D.npy", "--csv", d / "geo.csv")
    for out in ("a", "b", "c", "e", "f", "g"):  # nothing was written by a refused import
        assert not (d / f"{out}.dinomap" / "manifest.json").exists()
    run_json(capsys, "map", "import", d / "ok.dinomap", "--descriptors", d / "D.npy", *common)
    other = dict(inputs["fp"], id="dmx-0123456789abcdef")
    assert "was built with model" in run_error(
        capsys, caplog, "map", "query", d / "ok.dinomap", "--descriptors", d / "Q.npy", "--fingerprint", other["id"])
    assert "needs the model that built the map" in run_error(
        capsys, caplog, "map", "query", d / "ok.dinomap", str(d / "img.jpg"))
    assert "already holds a map" in run_error(
        capsys, caplog, "map", "import", d / "ok.dinomap", "--descriptors", d / "D.npy", *common)


def test_import_api_streams_float16_rows_into_the_map(inputs: dict) -> None:
    d = inputs["dir"]
    np.save(d / "h.npy", inputs["x"].astype(np.float16))
    kmap, report = import_descriptors(d / "h.dinomap", d / "h.npy", d / "geo.csv", inputs["fp"])
    assert report.keyframes == N and report.descriptor_dtype == "float16" and kmap.storage_dtype == "float16"
    assert np.array_equal(kmap.descriptor_rows(np.arange(N)), inputs["x"].astype(np.float16))
    with pytest.raises(MapError, match="fingerprint"):
        import_descriptors(d / "i.dinomap", d / "h.npy", d / "geo.csv", {"id": "dmx-1"})
