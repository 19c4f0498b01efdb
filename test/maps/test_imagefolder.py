"""Tests for dinomix_ros.maps.sources.imagefolder: listing, '@' file names, geotag CSVs, EXIF on real photos."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.maps.sources.geo import UTMCoord, latlon_to_utm
from dinomix_ros.maps.sources.imagefolder import (
    IMAGE_EXTENSIONS,
    GeotagCSVError,
    GeotagFormatError,
    ImageFolderError,
    ImageGeotag,
    geotag_images,
    list_images,
    parse_utm_filename,
    read_geotag_csv,
)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path, format="PNG")
    return path


def _utm_name(lat: float, lon: float, with_latlon: bool = True, tail: str = "@@@@@@@@@.png") -> str:
    """A VPR-datasets name as gmberton's tools write it: zero-padded UTM, 2-digit zone, 5-decimal lat/lon."""
    u = latlon_to_utm(lat, lon)
    latlon = f"@{lat:09.5f}@{lon:010.5f}" if with_latlon else "@@"
    return f"@{u.easting:09.2f}@{u.northing:010.2f}@{u.zone:02d}@{u.band}{latlon}{tail}"


# --- listing -------------------------------------------------------------------------------------------------------


def test_list_images_natural_order_and_filters(tmp_path):
    for name in ["10.png", "2.PNG", "1.jpg", "a10.webp", "a2.tif", "B1.jpeg", "._3.png", "notes.txt", "x.bmp"]:
        _png(tmp_path / name) if name != "notes.txt" else (tmp_path / name).write_text("x")
    _png(tmp_path / "sub" / "3.png")
    _png(tmp_path / ".thumbnails" / "4.png")  # hidden folders are skipped too
    (tmp_path / "dir.png").mkdir()  # a folder with an image-like name is not an image
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["1.jpg", "2.PNG", "10.png", "a2.tif", "a10.webp", "B1.jpeg", "x.bmp"]
    rec = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert rec == ["1.jpg", "2.PNG", "10.png", "a2.tif", "a10.webp", "B1.jpeg", "sub/3.png", "x.bmp"]
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} == set(IMAGE_EXTENSIONS)


def test_list_images_errors(tmp_path):
    with pytest.raises(ImageFolderError, match=r"does not exist; expected a folder of images"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ImageFolderError, match=r"is a file, not a folder"):
        list_images(tmp_path / "file.txt")
    _png(tmp_path / "sub" / "1.png")
    with pytest.raises(ImageFolderError, match=r"no images found in .*\.webp; sub-folders are not searched, and "
                                               r".*sub holds images: pass it") as exc:
        list_images(tmp_path)
    assert "recursive" not in str(exc.value)  # a Python argument the command line does not have
    (tmp_path / "sub" / "1.png").unlink()
    with pytest.raises(ImageFolderError, match=r"\.webp$"):  # no hint when no sub-folder holds images either
        list_images(tmp_path)
    _png(tmp_path / "sub" / "1.png")
    assert len(list_images(tmp_path, recursive=True)) == 1
    assert issubclass(ImageFolderError, FileNotFoundError)


def test_metric_xy_precedence():
    p = Path("a.png")
    utm = UTMCoord(1.0, 2.0, 33, "U")
    assert ImageGeotag(p).metric_xy is None and not ImageGeotag(p).has_position
    assert ImageGeotag(p, utm=utm).metric_xy == (1.0, 2.0)
    assert ImageGeotag(p, utm=utm, x=5.0, y=6.0).metric_xy == (5.0, 6.0)
    assert ImageGeotag(p, lat=1.0, lon=2.0).has_position


# --- '@' file names ------------------------------------------------------------------------------------------------


def test_parse_utm_filename_with_and_without_latlon(rng):
    for lat, lon in zip(rng.uniform(-79, 83, 20), rng.uniform(-179, 179, 20)):
        lat, lon = round(lat, 5), round(lon, 5)
        tag = parse_utm_filename(Path("/db") / _utm_name(lat, lon))
        assert (tag.lat, tag.lon) == (lat, lon)
        u = latlon_to_utm(lat, lon)
        assert (tag.utm.zone, tag.utm.band) == (u.zone, u.band)
        assert tag.utm.easting == pytest.approx(u.easting, abs=0.005)
        assert tag.path == Path("/db") / _utm_name(lat, lon)
        # lat/lon missing: computed from UTM (the name keeps 1 cm, i.e. ~1e-7 degrees)
        tag = parse_utm_filename(_utm_name(lat, lon, with_latlon=False))
        assert tag.lat == pytest.approx(lat, abs=2e-7)
        assert tag.lon == pytest.approx(lon, abs=2e-7 / max(math.cos(math.radians(lat)), 0.1))


def test_parse_utm_filename_field_variants():
    # Pitts30k-style, all trailing fields filled
    tag = parse_utm_filename("@0584361.11@4477064.21@17@T@040.44133@-079.99673@000000@00@090@00@@@@pitch1_yaw1@.jpg")
    assert tag.utm == UTMCoord(584361.11, 4477064.21, 17, "T")
    assert (tag.lat, tag.lon) == (40.44133, -79.99673)
    # only the four UTM fields, extension directly after the band letter; lower-case band
    tag = parse_utm_filename("@0584361.11@4477064.21@17@t.JPG")
    assert tag.utm.band == "T" and tag.lat == pytest.approx(40.44, abs=0.01)  # the pair above is illustrative
    assert tag.x is None and tag.yaw is None


@pytest.mark.parametrize(
    "name, why",
    [
        ("0584361.11@4477064.21@17@T@@@.jpg", r"does not start with '@'"),
        ("@0584361.11@4477064.21@17.jpg", r"east, north, zone number and zone letter are required"),
        ("@0584361.11@@17@T@@.jpg", r"east, north, zone number and zone letter are required"),
        ("@east@4477064.21@17@T@@.jpg", r"UTM_east 'east' is not a number"),
        ("@0584361.11@4477064.21@61@T@@.jpg", r"UTM_zone_number '61' is not an integer in 1..60"),
        ("@0584361.11@4477064.21@17@O@@.jpg", r"UTM_zone_letter 'O' is not a latitude band letter"),
        ("@0584361.11@4477064.21@17@T@40.4@@.jpg", r"latitude and longitude must both be given"),
        ("@0584361.11@4477064.21@17@T@95.0@-79.9@.jpg", r"out of range"),
        ("@0584361.11@-4477064.21@17@T@@.jpg", r"northing .* is outside"),
    ],
)
def test_parse_utm_filename_errors(name, why):
    with pytest.raises(GeotagFormatError, match=why) as info:
        parse_utm_filename(name)
    msg = str(info.value)
    assert repr(name) in msg and "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude" in msg


def test_geotag_images_filename_source(tmp_path):
    names = [_utm_name(55.7, 13.19 + 0.001 * i, with_latlon=i % 2 == 0) for i in range(4)]
    for n in names:
        _png(tmp_path / n)
    tags = geotag_images(tmp_path)  # auto: every name starts with '@'
    assert [t.path.name for t in tags] == sorted(names, key=lambda n: float(n.split("@")[1]))
    assert all(t.path.parent == tmp_path and t.utm.zone == 33 for t in tags)
    xy = np.array([t.metric_xy for t in tags])
    np.testing.assert_allclose(np.diff(xy[:, 0]), 0.001 * 111320 * math.cos(math.radians(55.7)), rtol=2e-3)
    _png(tmp_path / "plain.png")
    assert geotag_images(tmp_path)[0].utm is None  # auto: not all '@' -> EXIF (none here)
    with pytest.raises(GeotagFormatError, match=r"'plain.png'"):
        geotag_images(tmp_path, source="filename")


def test_zone_unified_across_a_boundary(tmp_path, caplog):
    lons = [11.998, 11.999, 12.001]  # 32U, 32U, 33U
    for lon in lons:
        _png(tmp_path / _utm_name(55.0, lon))
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.sources.imagefolder"):
        tags = geotag_images(tmp_path, source="filename")
    assert "span UTM zones [32, 33]" in caplog.text
    assert [t.utm.zone for t in tags] == [32, 32, 32]
    tags.sort(key=lambda t: t.lon)
    d = np.diff(np.array([t.metric_xy for t in tags])[:, 0])
    np.testing.assert_allclose(d, np.array([0.001, 0.002]) * 111320 * math.cos(math.radians(55)), rtol=5e-3)
    assert [t.utm.zone for t in geotag_images(tmp_path, source="filename", utm_zone=33)] == [33, 33, 33]
    with pytest.raises(ValueError, match=r"utm_zone is 0; expected an integer zone 1..60"):
        geotag_images(tmp_path, utm_zone=0)


# --- CSV -----------------------------------------------------------------------------------------------------------


def test_read_csv_latlon_xy_utm_variants(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("\ufeffName;LAT;Lon;alt\nimg/1.png;55.7;13.19;12.5\n2.png;;;\n", encoding="utf-8")  # BOM, ';'
    tags = read_geotag_csv(f)
    assert list(tags) == ["1.png", "2.png"]
    t = tags["1.png"]
    assert (t.lat, t.lon, t.alt) == (55.7, 13.19, 12.5) and t.utm == latlon_to_utm(55.7, 13.19)
    assert t.path == tmp_path / "img" / "1.png"
    assert tags["2.png"].metric_xy is None and tags["2.png"].alt is None
    f.write_text("file,x,y,yaw\n1.png,1.5,-2.0,0.25\n2.png,3,4,\n")
    tags = read_geotag_csv(f)
    assert (tags["1.png"].x, tags["1.png"].y, tags["1.png"].yaw) == (1.5, -2.0, 0.25)
    assert tags["2.png"].metric_xy == (3.0, 4.0) and tags["2.png"].yaw is None and tags["2.png"].lat is None
    f.write_text("filename\teasting\tnorthing\tzone\tband\n1.png\t386581.59\t6173962.88\t33\tU\n")
    t = read_geotag_csv(f)["1.png"]
    assert t.utm == UTMCoord(386581.59, 6173962.88, 33, "U")
    assert t.lat == pytest.approx(55.6981667, abs=1e-7) and t.lon == pytest.approx(13.1953889, abs=1e-7)


@pytest.mark.parametrize(
    "text, match",
    [
        ("01.jpg,55.7,13.1\n", r"has no image column; a header row is required"),
        ("image,score\n1.png,3\n", r"hold no position column set; expected .*lat, lon"),
        ("image,lat,alt\n1.png,55,3\n", r"incomplete lat/lon column set"),
        ("image,utm_east,utm_north,zone\n1.png,1,2,33\n", r"incomplete utm column set"),
        ("image,lat,lon\n1.png,55.1,13\n2.png,north,13\n", r":3: column 'lat' has 'north'; expected a finite number"),
        ("image,lat,lon\n1.png,55.1,\n", r":2: only one of lat/lon is filled"),
        ("image,lat,lon\n1.png,55,13\nsub/1.png,55,13\n", r":3: image '1.png' is listed again \(first on line 2\)"),
        ("image,lat,lon\n,55,13\n", r":2: column 'image' is empty"),
        ("image,lat,lon\n1.png,88,13\n", r":2: latitude 88.0 is outside UTM"),
        ("image,easting,northing,zone,band\n1.png,1,2,33,\n", r":2: the UTM cells are partly empty"),
        ("image,easting,northing,zone,band\n1.png,1,2,33.5,U\n", r":2: UTM zone '33.5' / band 'U' are invalid"),
        ("image,easting,northing,zone,band\n1.png,1,2,33,I\n", r":2: UTM zone '33' / band 'I' are invalid"),
    ],
)
def test_read_csv_errors(tmp_path, text, match):
    f = tmp_path / "g.csv"
    f.write_text(text)
    with pytest.raises(GeotagCSVError, match=match):
        read_geotag_csv(f)


def test_read_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"geotag CSV .* does not exist"):
        read_geotag_csv(tmp_path / "none.csv")


def test_geotag_images_csv_source_and_missing_rows(tmp_path, caplog):
    for i in range(12):
        _png(tmp_path / f"{i}.png")
    rows = "".join(f"{i}.png,{i},0\n" for i in range(2, 12))
    (tmp_path / "tags.csv").write_text("image,x,y\n0.png,0,0\n1.png,,\n" + rows)
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.sources.imagefolder"):
        tags = geotag_images(tmp_path)  # auto: the one CSV in the folder
    assert [t.path.name for t in tags] == [f"{i}.png" for i in range(12)]
    assert tags[5].metric_xy == (5.0, 0.0) and tags[1].metric_xy is None and tags[5].path == tmp_path / "5.png"
    assert "1 of 12 images" in caplog.text
    (tmp_path / "tags.csv").write_text("image,x,y\n0.png,0,0\n")
    with pytest.raises(GeotagCSVError, match=r"11 of 12 images .* not in .*tags.csv: \['1.png', .*'10.png'\] \.\.\."):
        geotag_images(tmp_path, source="csv")
    (tmp_path / "other.csv").write_text("image,x,y\n")
    with pytest.raises(GeotagCSVError, match=r"holds 2 CSV files \['other.csv', 'tags.csv'\]; expected exactly one"):
        geotag_images(tmp_path, source="csv")
    assert geotag_images(tmp_path)[0].metric_xy is None  # auto with two CSVs: EXIF
    _png(tmp_path / "sub" / "0.png")
    with pytest.raises(GeotagCSVError, match=r"file names occur in several sub-folders .*\['0.png'\]"):
        geotag_images(tmp_path, source="csv", csv_path=tmp_path / "tags.csv", recursive=True)


def test_geotag_images_exif_with_untagged_images(tmp_path, caplog):
    exif = Image.Exif()
    exif[0x8825] = {1: "S", 2: (33.0, 30.0, 0.0), 3: "E", 4: (151.0, 12.0, 0.0)}
    Image.new("RGB", (8, 6)).save(tmp_path / "1.jpg", exif=exif)
    Image.new("RGB", (8, 6)).save(tmp_path / "2.jpg")
    with caplog.at_level(logging.WARNING, logger="dinomix_ros.maps.sources.imagefolder"):
        tags = geotag_images(tmp_path, source="exif")
    assert (tags[0].lat, tags[0].lon) == (-33.5, 151.2) and tags[0].utm.band == "H" and not tags[0].utm.northern
    assert tags[1] == ImageGeotag(path=tmp_path / "2.jpg")
    assert "1 of 2 images" in caplog.text and "source=exif" in caplog.text


def test_geotag_images_none_and_bad_source(tmp_path):
    _png(tmp_path / _utm_name(10.0, 10.0))
    assert geotag_images(tmp_path, source="none") == [ImageGeotag(path=list_images(tmp_path)[0])]
    with pytest.raises(ValueError, match=r"geotag source 'gps' is unknown; expected one of auto, filename"):
        geotag_images(tmp_path, source="gps")


# --- real photos ---------------------------------------------------------------------------------------------------


def test_lund_exif_and_csv_agree(data_dir):
    folder = data_dir / "lund_gps" / "images"
    exif = geotag_images(folder, source="exif")
    auto = geotag_images(folder)  # no CSV inside images/: EXIF
    csv = geotag_images(folder, source="csv", csv_path=data_dir / "lund_gps" / "gps_from_exif.csv")
    assert len(exif) == len(csv) == 29 and exif == auto
    assert [t.path for t in exif] == [t.path for t in csv] == list_images(folder)
    for a, b in zip(exif, csv):
        assert a.utm.zone == b.utm.zone == 33 and a.utm.band == b.utm.band == "U"
        assert math.dist(a.metric_xy, b.metric_xy) < 0.5
        assert a.lat == pytest.approx(b.lat, abs=1e-7) and a.alt == b.alt
    # the walk is ~198 m long with steps of 0-16 m
    xy = np.array([t.metric_xy for t in exif])
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    assert 150 < steps.sum() < 250 and steps.max() < 20


def test_lund_csv_found_in_folder(tmp_path, data_dir):
    src = data_dir / "lund_gps"
    for name in ("01.jpg", "02.jpg", "10.jpg"):
        shutil.copy(src / "images" / name, tmp_path / name)
    shutil.copy(src / "gps_from_exif.csv", tmp_path)
    tags = geotag_images(tmp_path)  # auto: the CSV
    assert [t.path.name for t in tags] == ["01.jpg", "02.jpg", "10.jpg"]
    assert tags[0].utm == UTMCoord(386581.59, 6173962.88, 33, "U")  # the CSV's own UTM, not recomputed
    exif = geotag_images(tmp_path, source="exif")
    assert all(math.dist(a.metric_xy, b.metric_xy) < 0.5 for a, b in zip(tags, exif))
