"""Fleet regions and settings without a server: which keyframes a pull selects, and the fleet settings' checks.

Distances are checked against points placed at known distances (the spherical destination formula, written here
independently of the code under test); the bounding-box filter is a Milvus expression that is also Python, so it is
evaluated here on points of the circle's edge.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from fleetfactory import destination

from dinomix_ros.maps.fleet.config import FleetConfig, default_collection, display_uri, robot_id, vector_field
from dinomix_ros.maps.fleet.region import Region, parse_center, quote
from dinomix_ros.settings import SettingError


def in_box(region: Region, row: dict) -> bool:
    """Evaluate the region's Milvus filter expression (it is also a Python expression) on one row."""
    return bool(eval(region.box_filter(), {}, dict(row)))  # noqa: S307 - our own expression, tested as such


@pytest.mark.parametrize("center", [(55.7, 13.19), (-33.9, 151.2), (0.0, 0.0), (60.1, 179.99), (-45.0, -179.995),
                                    (89.99, 10.0)])
def test_gps_region_keeps_exactly_the_fixes_inside_the_circle(center: tuple[float, float]) -> None:
    radius = 250.0
    region = Region("gps", center, radius)
    rows, expected = [], []
    for bearing in np.arange(0.0, 360.0, 22.5):
        for fraction in (0.0, 0.3, 0.9, 0.995, 1.005, 1.2, 3.0):
            lat, lon = destination(*center, bearing, fraction * radius)
            rows.append({"lat": lat, "lon": lon})
            expected.append(fraction * radius if fraction <= 1 else math.inf)
    rows += [{"lat": None, "lon": None}, {"lat": center[0], "lon": None}]  # unknown fixes are never inside
    expected += [math.inf, math.inf]
    got = region.distances(rows)
    inside = np.isfinite(np.array(expected))
    assert np.array_equal(np.isfinite(got), inside)
    np.testing.assert_allclose(got[inside], np.array(expected)[inside], rtol=1e-7, atol=1e-4)  # 0.1 mm
    # the server's box holds every point of the circle (the edge included), across the antimeridian and near a pole
    for row, want in zip(rows[:-2], expected[:-2]):
        if math.isfinite(want):
            assert in_box(region, row), (region.box_filter(), row)
    far = destination(*center, 45.0, 3 * radius)
    if abs(center[0]) < 89:
        assert not in_box(region, {"lat": far[0], "lon": far[1]})


def test_gps_boxes_across_the_antimeridian_and_around_a_pole() -> None:
    east = Region("gps", (10.0, 179.999), 500.0).box_filter()
    west = Region("gps", (10.0, -179.999), 500.0).box_filter()
    assert " or " in east and " or " in west
    pole = Region("gps", (89.999, 0.0), 1000.0).box_filter()
    assert "lon" not in pole  # the circle holds the pole: every longitude


def test_position_region_is_one_frame_and_horizontal() -> None:
    region = Region("position", (10.0, -5.0), 3.0, "map")
    rows = [{"frame_id": "map", "x": 10.0 + 3.0 * math.cos(a) * f, "y": -5.0 + 3.0 * math.sin(a) * f}
            for a in np.linspace(0, 2 * math.pi, 12, endpoint=False) for f in (0.0, 0.5, 0.999, 1.001)]
    rows += [{"frame_id": "odom", "x": 10.0, "y": -5.0},  # the centre, in another frame
             {"frame_id": "map", "x": 12.9, "y": -2.1},  # a corner of the box, outside the circle
             {"frame_id": "map", "x": None, "y": None}]  # no position
    got = region.distances(rows)
    inside = [i for i, r in enumerate(rows) if r["frame_id"] == "map" and r["x"] is not None
              and math.hypot(r["x"] - 10.0, r["y"] + 5.0) <= 3.0]
    assert np.flatnonzero(np.isfinite(got)).tolist() == inside and len(inside) == 36
    assert in_box(region, rows[-2]) and not in_box(region, rows[-3])
    assert in_box(Region("position", (0.0, 0.0), 1.0, 'a "quoted" \\ frame'),
                  {"frame_id": 'a "quoted" \\ frame', "x": 0.0, "y": 0.0})
    assert Region.everything().box_filter() == "" and Region.everything().distances([{}, {}]).tolist() == [0, 0]


def test_parse_center_forms_and_errors() -> None:
    assert parse_center("1.5,-2", 4.0) == Region("position", (1.5, -2.0), 4.0, "map")
    assert parse_center(" 1,2, odom ", 4.0) == Region("position", (1.0, 2.0), 4.0, "odom")
    assert parse_center("gps:55.7,13.2", 100.0) == Region("gps", (55.7, 13.2), 100.0)
    assert parse_center("", 0.0) == Region.everything()
    for bad, words in (("1", "expected 'x,y'"), ("gps:1,2,3", "expected"), ("a,b", "could not convert"),
                       ("gps:91,0", "lat in [-90, 90]"), ("nan,1", "finite"), ("1,2,", "needs a frame")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_center(bad, 10.0)
    assert quote('a"b\\c') == '"a\\"b\\\\c"'


def test_fleet_settings_refuse_what_cannot_work() -> None:
    assert not FleetConfig().enabled and FleetConfig(uri="/tmp/fleet.db").enabled
    assert FleetConfig(uri="http://fleet:19530", index_type="GPU_CAGRA").index_type == "GPU_CAGRA"  # a GPU server
    for kwargs, name in (({"uri": "localhost:19530"}, "fleet.uri"), ({"robot": "r 1"}, "fleet.robot"),
                         ({"robot": "x" * 65}, "fleet.robot"), ({"collection": "1abc"}, "fleet.collection"),
                         ({"collection": "a-b"}, "fleet.collection"), ({"index_params": "[1]"}, "fleet.index_params"),
                         ({"index_params": "{"}, "fleet.index_params"), ({"pull_center": "1;2"}, "fleet.pull_center"),
                         ({"token_env": "A-B"}, "fleet.token_env"), ({"index_type": "LSH"}, "fleet.index_type"),
                         ({"batch_rows": 0}, "fleet.batch_rows"),
                         ({"uri": "/var/fleet.db", "index_type": "GPU_CAGRA"}, "fleet.index_type")):
        with pytest.raises(SettingError) as info:
            FleetConfig(**kwargs)
        assert info.value.name == name and "\n" not in str(info.value)
    assert robot_id(FleetConfig(robot="r2.d-2")) == "r2.d-2"
    assert all(c.isalnum() or c in "_.-" for c in robot_id(FleetConfig()))


def test_names_derive_from_the_model_and_credentials_never_show() -> None:
    fp = {"id": "dmx-0123456789abcdef"}
    assert default_collection(fp) == "dinomix_dmx_0123456789abcdef"
    assert vector_field(fp) == "descriptor_dmx_0123456789abcdef"
    assert display_uri("https://user:secret@fleet.example:19530") == "https://***@fleet.example:19530"
    assert display_uri("http://10.0.0.5:19530") == "http://10.0.0.5:19530"
