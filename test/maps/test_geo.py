"""Tests for dinomix_ros.maps.sources.geo: UTM projection against published values, zone rules, EXIF GPS on real
photos."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from dinomix_ros.maps.sources.geo import (
    ExifGPSError,
    GeoFix,
    UTMCoord,
    central_meridian,
    latlon_to_utm,
    latlon_to_utm_arrays,
    read_exif_gps,
    utm_band,
    utm_to_latlon,
    utm_to_latlon_arrays,
    utm_zone,
)

# Forward references from GeographicLib's GeoConvert (`echo LAT LON | GeoConvert -u -s -p 9`, Karney's reference
# implementation), as quoted in the GeographicLib Swift port's UTMTests.swift (YPPH = Perth airport,
# ZMCK = Ulaanbaatar).
GEOCONVERT_FORWARD = [
    # lat, lon, zone, band, easting, northing
    (-31.93980, 115.96650, 50, "J", 402314.322464520, 6465770.872261507),
    (47.6514, 106.8216, 48, "T", 636793.955125689, 5279163.338930206),
]
# Inverse references, same source (`echo 38n 444140.54 3684706.36 | GeoConvert -p 9`); the first point is the
# example of the GeoConvert manual page (33.3N 44.4E <-> 38n 444140.54 3684706.36, rounded to 1 cm).
GEOCONVERT_INVERSE = [
    # easting, northing, zone, northern, lat, lon
    (444140.54, 3684706.36, 38, True, 33.30000003988349, 44.39999994689769),
    (402357.0, 6465717.0, 50, False, -31.94028962404897, 115.96694602276638),
]


@pytest.mark.parametrize("lat, lon, zone, band, easting, northing", GEOCONVERT_FORWARD)
def test_forward_matches_geographiclib(lat, lon, zone, band, easting, northing):
    utm = latlon_to_utm(lat, lon)
    assert (utm.zone, utm.band) == (zone, band)
    assert utm.northern == (lat >= 0)
    assert utm.easting == pytest.approx(easting, abs=1e-6)  # 1 micrometre
    assert utm.northing == pytest.approx(northing, abs=1e-6)


@pytest.mark.parametrize("easting, northing, zone, northern, lat, lon", GEOCONVERT_INVERSE)
def test_inverse_matches_geographiclib(easting, northing, zone, northern, lat, lon):
    got_lat, got_lon = utm_to_latlon(easting, northing, zone, northern)
    assert got_lat == pytest.approx(lat, abs=1e-11)  # ~1 micrometre
    assert got_lon == pytest.approx(lon, abs=1e-11)


def test_geoconvert_manual_example_and_other_published_points():
    # GeoConvert manual: 33.3 44.4 -> 38n 444140.54 3684706.36 (printed to 1 cm).
    utm = latlon_to_utm(33.3, 44.4)
    assert (utm.zone, utm.band) == (38, "S")
    assert utm.easting == pytest.approx(444140.54, abs=0.005)
    assert utm.northing == pytest.approx(3684706.36, abs=0.005)
    # Wikipedia, "Universal Transverse Mercator coordinate system": the CN Tower at 43°38'33.24"N 79°23'13.7"W is
    # 17T 630084 m E 4833438 m N (printed to 1 m).
    utm = latlon_to_utm(43 + 38 / 60 + 33.24 / 3600, -(79 + 23 / 60 + 13.7 / 3600))
    assert (utm.zone, utm.band) == (17, "T")
    assert utm.easting == pytest.approx(630084, abs=0.5)
    assert utm.northing == pytest.approx(4833438, abs=0.6)
    # README of the Python `utm` package (Turbo87/utm): from_latlon(51.2, 7.5) -> (395201.3103811303,
    # 5673135.241182375, 32, 'U'); that package uses a shorter series, good to about a millimetre.
    utm = latlon_to_utm(51.2, 7.5)
    assert (utm.zone, utm.band) == (32, "U")
    assert utm.easting == pytest.approx(395201.3103811303, abs=2e-3)
    assert utm.northing == pytest.approx(5673135.241182375, abs=2e-3)


def test_central_meridian_maps_to_false_easting_and_equator_to_zero():
    for zone in (1, 31, 60):
        e, n = latlon_to_utm_arrays(np.array([0.0]), np.array([central_meridian(zone)]), zone)
        assert e[0] == pytest.approx(500000.0, abs=1e-9)
        assert n[0] == pytest.approx(0.0, abs=1e-9)
    # Meridian arc: 1 degree of latitude on the central meridian at 45N is about 111.13 km (times k0 = 0.9996).
    _, n = latlon_to_utm_arrays(np.array([44.5, 45.5]), np.array([9.0, 9.0]), 32)
    assert n[1] - n[0] == pytest.approx(111132.0 * 0.9996, rel=1e-4)


def test_round_trip_every_zone_both_hemispheres(rng):
    n = 200
    for zone in range(1, 61):
        lat = rng.uniform(-80.0, 84.0, n)
        lon = central_meridian(zone) + rng.uniform(-3.0, 3.0, n)
        lon = (lon + 180.0) % 360.0 - 180.0
        e, nn = latlon_to_utm_arrays(lat, lon, zone)
        south = lat < 0
        lat_n, lon_n = utm_to_latlon_arrays(e[~south], nn[~south], zone, northern=True)
        lat_s, lon_s = utm_to_latlon_arrays(e[south], nn[south], zone, northern=False)
        np.testing.assert_allclose(lat_n, lat[~south], rtol=0, atol=1e-9)
        np.testing.assert_allclose(lat_s, lat[south], rtol=0, atol=1e-9)
        # compare longitudes modulo 360 (zones 1 and 60 touch the antimeridian)
        d_lon = (np.concatenate([lon_n - lon[~south], lon_s - lon[south]]) + 180.0) % 360.0 - 180.0
        assert np.max(np.abs(d_lon)) < 1e-9


def test_round_trip_scalar_and_continuous_northing(rng):
    for lat, lon in zip(rng.uniform(-80, 84, 50), rng.uniform(-180, 180, 50)):
        utm = latlon_to_utm(lat, lon)
        back = utm_to_latlon(utm.easting, utm.northing, utm.zone, utm.northern)
        assert back[0] == pytest.approx(lat, abs=1e-9)
        assert back[1] == pytest.approx(lon, abs=1e-9)
        # the scalar and the vectorised forms agree exactly
        e, n = latlon_to_utm_arrays(np.array([lat]), np.array([lon]), utm.zone)
        assert (e[0], n[0]) == (utm.easting, utm.northing)
    # northern=True keeps one continuous northing across the equator (negative south of it)
    e, n = latlon_to_utm_arrays(np.array([-0.001, 0.001]), np.array([15.0, 15.0]), 33, northern=True)
    assert n[0] < 0 < n[1]
    assert n[1] - n[0] == pytest.approx(2 * 110.574 * 0.9996, rel=1e-3)
    lat, _ = utm_to_latlon_arrays(e, n, 33, northern=True)
    np.testing.assert_allclose(lat, [-0.001, 0.001], atol=1e-12)


def test_forced_zone_is_consistent_across_a_boundary():
    # 12E is the 32/33 boundary: the same two points projected into one zone are 1.2 km apart either way.
    a, b = (55.0, 11.99), (55.0, 12.01)
    ea, na = latlon_to_utm_arrays(np.array([a[0], b[0]]), np.array([a[1], b[1]]), 32)
    eb, nb = latlon_to_utm_arrays(np.array([a[0], b[0]]), np.array([a[1], b[1]]), 33)
    d32 = math.hypot(ea[1] - ea[0], na[1] - na[0])
    d33 = math.hypot(eb[1] - eb[0], nb[1] - nb[0])
    assert d32 == pytest.approx(d33, rel=1e-3)
    assert d32 == pytest.approx(0.02 * 111320 * math.cos(math.radians(55)), rel=5e-3)
    assert latlon_to_utm(*a).zone == 32 and latlon_to_utm(*b).zone == 33
    forced = latlon_to_utm(*b, zone=32)
    assert (forced.zone, forced.band) == (32, "U")
    assert forced.easting == pytest.approx(ea[1])


@pytest.mark.parametrize(
    "lat, lon, zone",
    [
        (60.0, 2.99, 31),  # west of the Norway exception
        (60.0, 3.0, 32),  # band V, 3..12E -> 32 (instead of 31)
        (63.99, 5.0, 32),
        (64.0, 5.0, 31),  # band W: standard again
        (55.99, 5.0, 31),  # band U: standard
        (60.0, 12.0, 33),
        (78.0, 8.99, 31),  # Svalbard: 0..9E -> 31
        (78.0, 9.0, 33),  # 9..21E -> 33 (32X does not exist)
        (78.0, 20.99, 33),
        (78.0, 21.0, 35),  # 21..33E -> 35
        (78.0, 33.0, 37),  # 33..42E -> 37
        (84.0, 41.99, 37),
        (78.0, 42.0, 38),  # east of the exception
        (71.99, 10.0, 32),  # band W: standard
        (78.0, -0.01, 30),
        (0.0, -180.0, 1),
        (0.0, 180.0, 1),  # 180E == 180W
        (0.0, 179.99, 60),
        (-45.0, 170.0, 59),
    ],
)
def test_zone_rules_including_norway_and_svalbard(lat, lon, zone):
    assert utm_zone(lat, lon) == zone
    assert latlon_to_utm(lat, lon).zone == zone


def test_bands_and_southern_hemisphere():
    assert [utm_band(x) for x in (-80.0, -72.01, -0.01, 0.0, 55.7, 71.99, 72.0, 84.0)] == list("CCMNUWXX")
    utm = latlon_to_utm(-33.92487, 18.42406)  # Cape Town: 34H (Turbo87/utm known values, 1 m)
    assert (utm.zone, utm.band, utm.northern) == (34, "H", False)
    assert utm.easting == pytest.approx(261878, abs=1.0)
    assert utm.northing == pytest.approx(6243186, abs=1.0)


def test_range_and_input_errors():
    with pytest.raises(ValueError, match=r"latitude 84.1 is outside UTM"):
        latlon_to_utm(84.1, 0.0)
    with pytest.raises(ValueError, match=r"latitude -80.5 is outside UTM.*UPS"):
        latlon_to_utm(-80.5, 0.0)
    with pytest.raises(ValueError, match=r"longitude 181.0 is outside -180..180"):
        latlon_to_utm(10.0, 181.0)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        latlon_to_utm(float("nan"), 0.0)
    with pytest.raises(ValueError, match=r"UTM zone 61 is invalid; expected an integer in 1..60"):
        latlon_to_utm(10.0, 10.0, zone=61)
    with pytest.raises(ValueError, match=r"UTM zone 0 is invalid"):
        utm_to_latlon(500000.0, 0.0, 0, True)
    with pytest.raises(ValueError, match=r"degrees from the central meridian of UTM zone 1"):
        latlon_to_utm(10.0, 100.0, zone=1)
    with pytest.raises(ValueError, match=r"northing -5.0 is outside 0..10,000,000 m"):
        utm_to_latlon(500000.0, -5.0, 33, True)
    with pytest.raises(ValueError, match=r"shape \(2,\) but lon has shape \(3,\)"):
        latlon_to_utm_arrays(np.zeros(2), np.zeros(3), 31)
    with pytest.raises(ValueError, match=r"band 'I' is not a latitude band letter"):
        UTMCoord(500000.0, 0.0, 31, "I")
    with pytest.raises(ValueError, match=r"must be finite"):
        UTMCoord(float("inf"), 0.0, 31, "N")
    assert UTMCoord(1.0, 2.0, 33, "u").band == "U"


def _lund_rows(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "lund_gps" / "gps_from_exif.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_exif_gps_of_real_photos_matches_csv_and_utm(data_dir):
    rows = _lund_rows(data_dir)
    assert len(rows) == 29
    for row in rows:
        fix = read_exif_gps(data_dir / "lund_gps" / "images" / row["image"])
        assert isinstance(fix, GeoFix)
        assert fix.lat == pytest.approx(float(row["lat"]), abs=1e-7)  # the CSV is rounded to 7 decimals
        assert fix.lon == pytest.approx(float(row["lon"]), abs=1e-7)
        assert fix.alt == pytest.approx(float(row["alt_m"]))
        utm = latlon_to_utm(fix.lat, fix.lon)
        assert (utm.zone, utm.band) == (int(row["utm_zone"]), row["utm_letter"]) == (33, "U")
        assert utm.easting == pytest.approx(float(row["utm_east"]), abs=0.5)
        assert utm.northing == pytest.approx(float(row["utm_north"]), abs=0.5)


def _write_gps_image(path: Path, gps: dict) -> Path:
    exif = Image.Exif()
    if gps:
        exif[0x8825] = gps
    Image.new("RGB", (16, 12), (90, 120, 30)).save(path, exif=exif)
    return path


def test_exif_southern_western_below_sea_level(tmp_path):
    dms_lat = (IFDRational(33, 1), IFDRational(51, 1), IFDRational(3542, 100))
    path = _write_gps_image(
        tmp_path / "dead_sea.jpg",
        {1: "S", 2: dms_lat, 3: "W", 4: (70.0, 3.0, 12.5), 5: b"\x01", 6: IFDRational(4305, 10)},
    )
    fix = read_exif_gps(path)
    assert fix.lat == pytest.approx(-(33 + 51 / 60 + 35.42 / 3600), abs=1e-12)
    assert fix.lon == pytest.approx(-(70 + 3 / 60 + 12.5 / 3600), abs=1e-12)
    assert fix.alt == pytest.approx(-430.5)
    # PNG with an eXIf chunk, decimal degrees in one rational, no altitude
    path = _write_gps_image(tmp_path / "deg.png", {1: "N", 2: (IFDRational(55698167, 1000000),), 3: "E", 4: (13.2,)})
    assert read_exif_gps(path) == GeoFix(55.698167, 13.2, None)


def test_exif_without_gps_is_none(tmp_path, data_dir):
    assert read_exif_gps(_write_gps_image(tmp_path / "plain.jpg", {})) is None
    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    assert read_exif_gps(tmp_path / "plain.png") is None
    # GPS IFD with only a version/time tag
    path = _write_gps_image(tmp_path / "time_only.jpg", {0: b"\x02\x03\x00\x00", 29: "2024:01:01"})
    assert read_exif_gps(path) is None
    # the rtabmap corridor images carry no GPS
    corridor = sorted((data_dir / "rtabmap_corridor").rglob("*.jpg"))[:3]
    assert corridor and all(read_exif_gps(p) is None for p in corridor)


def test_exif_altitude_zero_denominator_is_ignored(tmp_path, caplog):
    gps = {1: "N", 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0), 6: IFDRational(0, 0)}
    path = _write_gps_image(tmp_path / "a.jpg", gps)
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.sources.geo"):
        fix = read_exif_gps(path)
    assert fix.alt is None and fix.lat == pytest.approx(1 + 2 / 60 + 3 / 3600)
    assert "altitude ignored" in caplog.text


@pytest.mark.parametrize(
    "gps, match",
    [
        ({1: "N", 2: (1.0, 2.0, 3.0)}, r"GPSLatitude but no GPSLongitude"),
        ({3: "E", 4: (1.0, 2.0, 3.0)}, r"GPSLongitude but no GPSLatitude"),
        ({1: "Q", 2: (1.0, 2.0, 3.0), 3: "E", 4: (1.0, 2.0, 3.0)}, r"GPSLatitudeRef is 'Q'; expected one of N, S"),
        ({2: (1.0, 2.0, 3.0), 3: "E", 4: (1.0, 2.0, 3.0)}, r"GPSLatitudeRef is None"),
        ({1: "N", 2: (IFDRational(1, 0), 2.0, 3.0), 3: "E", 4: (1.0, 2.0, 3.0)}, r"GPSLatitude is .*non-negative"),
        ({1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (1.0, 2.0, 3.0)}, r"GPSLatitude is 91.0 degrees; expected at most"),
        ({1: "N", 2: (1.0, 2.0, 3.0), 3: "W", 4: (1.0, 2.0, 3.0, 4.0)}, r"GPSLongitude is .*1-3"),
        ({1: "N", 2: (1.0, 2.0, 3.0), 3: "E", 4: (1.0, 2.0, 3.0), 5: 7, 6: 10.0}, r"GPSAltitudeRef is 7"),
    ],
)
def test_exif_malformed_gps_raises(tmp_path, gps, match):
    path = _write_gps_image(tmp_path / "bad.jpg", gps)
    with pytest.raises(ExifGPSError, match=match):
        read_exif_gps(path)


def test_exif_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        read_exif_gps(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ExifGPSError, match=r"is not an image Pillow can read"):
        read_exif_gps(tmp_path / "notes.jpg")
    assert issubclass(ExifGPSError, ValueError)
