"""Hostile local features and cameras in a map, for the fault suite: each kind edits a copy of a good corridor map
(real ORB features, intrinsics and a camera record) in one way and makes the manifest agree again: chunk sha256,
size and the manifest seal recomputed with the package's own :func:`~dinomix_ros.maps.manifest.manifest_bytes`, so
only the checks behind the checksums can catch it (what someone who knows the format would do).

A kind is (name, damage, refusal): ``refusal`` is a regex of the one-line error load must raise, or None when the map
must load and geometric verification must reject what the hostile keyframes claim (e.g. random descriptors).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from dinomix_ros.imaging.camera import CameraModel
from dinomix_ros.imaging.features import FeatureExtractor
from dinomix_ros.localization.camera_pose import CameraMountConfig
from dinomix_ros.maps.keyframes import KeyframeMap
from dinomix_ros.maps.local_features import EMPTY, KEYPOINT_SCALE, CameraRecord, slot_dtype
from dinomix_ros.maps.manifest import MANIFEST, manifest_bytes
from dinomix_ros.maps.storage import save_map

__all__ = ["ROWS", "CAMERA", "CORRIDOR", "FeatureKind", "corridor_image", "feature_kinds", "make_feature_map"]

FeatureKind = tuple[str, Callable[[Path], None], "str | None"]

ROWS = 12
CAMERA = "/camera/image_raw/compressed"
CORRIDOR = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"
INTRINSICS = CameraModel(512, 384, np.array([[420.0, 0, 256], [0, 420.0, 192], [0, 0, 1]]))  # assumed (as elsewhere)


def corridor_image(i: int) -> np.ndarray:
    """Corridor photo ``i`` (1-based, 512x384), RGB."""
    return cv2.cvtColor(cv2.imread(str(CORRIDOR / f"{i}.jpg")), cv2.COLOR_BGR2RGB)


def make_feature_map(path: Path, fingerprint: dict) -> Path:
    """A 12-keyframe map of corridor photos 1..12: real ORB features, the camera's intrinsics and record, random
    unit descriptors (search order does not matter here: the fault tests verify every candidate)."""
    rng = np.random.default_rng(15)
    ex = FeatureExtractor()
    m = KeyframeMap.empty(fingerprint, metadata={"name": "hostile features"})
    store = m.enable_local_features("orb", 400)
    store.intrinsics[CAMERA] = INTRINSICS
    store.cameras[CAMERA] = CameraRecord("camera_optical_frame", CameraMountConfig().matrix(), 512, 384)
    x = rng.standard_normal((ROWS, fingerprint["descriptor_dim"])).astype(np.float32)
    feats = [ex.extract(cv2.cvtColor(corridor_image(i), cv2.COLOR_RGB2GRAY)) for i in range(1, ROWS + 1)]
    m.add(x / np.linalg.norm(x, axis=1, keepdims=True), stamps_ns=np.arange(1, ROWS + 1, dtype=np.int64) * 10**9,
          cameras=CAMERA, frame_ids="map", positions=np.c_[np.arange(ROWS, dtype=float), np.zeros((ROWS, 2))],
          orientations=np.tile([0.0, 0.0, 0.0, 1.0], (ROWS, 1)), features=feats)
    return save_map(m, path)


# ---------------------------------------------------------------------- helpers


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text("utf-8"))


def _sealed(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit the manifest and reseal it as a save would."""
    def damage(path: Path) -> None:
        m = _manifest(path)
        edit(m)
        (path / MANIFEST).write_bytes(manifest_bytes(m))
    return damage


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _chunk(rewrite: Callable[[np.ndarray], np.ndarray], edit: Callable[[dict], None] | None = None
           ) -> Callable[[Path], None]:
    """Replace the feature chunk by ``rewrite(records)`` and make the manifest agree (size, sha256, seal)."""
    def damage(path: Path) -> None:
        m = _manifest(path)
        rec = m["files"]["features"][0]
        records = np.load(path / rec["file"], allow_pickle=False)
        data = _npy(rewrite(records.copy()))
        (path / rec["file"]).write_bytes(data)
        rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        if edit is not None:
            edit(m)
        (path / MANIFEST).write_bytes(manifest_bytes(m))
    return damage


def _raw_manifest(old: str, new: str) -> Callable[[Path], None]:
    """A text edit of the manifest: how a value no JSON writer writes (1e400, read back as inf) gets there. No seal
    can be computed over it; load refuses the value before it compares the seal."""
    def damage(path: Path) -> None:
        text = (path / MANIFEST).read_text("utf-8")
        assert old in text, old
        (path / MANIFEST).write_text(text.replace(old, new, 1), "utf-8")
    return damage


def _keypoints(x: float | None, y: float | None) -> Callable[[np.ndarray], np.ndarray]:
    def rewrite(records: np.ndarray) -> np.ndarray:
        used = records["x"] != EMPTY
        if x is not None:
            records["x"][used] = round(x * KEYPOINT_SCALE)
        if y is not None:
            records["y"][used] = round(y * KEYPOINT_SCALE)
        return records
    return rewrite


def _on_a_line(records: np.ndarray) -> np.ndarray:
    used = records["x"] != EMPTY
    records["y"][used] = 200 * KEYPOINT_SCALE
    return records


def _random_descriptors(records: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(99)
    records["descriptor"] = rng.integers(0, 256, records["descriptor"].shape, dtype=np.uint8)
    records["x"][:, 1::3] = EMPTY  # and empty slots in between (a writer keeps them at the end)
    return records


def _all_empty(records: np.ndarray) -> np.ndarray:
    records["x"] = EMPTY
    return records


def _rows(n: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda records: np.concatenate([records] * 2)[:n]


def _as_dtype(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    def rewrite(records: np.ndarray) -> np.ndarray:
        out = np.zeros(records.shape, slot_dtype(kind))
        out["x"], out["y"] = records["x"], records["y"]
        return out
    return rewrite


def _intrinsics(**values: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["local_features"]["intrinsics"][CAMERA].update(values)
    return edit


def _record(**values: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["local_features"]["cameras"][CAMERA].update(values)
    return edit


def _set(*keys: object, value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _drop_records(then: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["local_features"].pop("cameras")
        then(m)
    return edit


_K = [420.0, 0.0, 256.0, 0.0, 420.0, 192.0, 0.0, 0.0, 1.0]
_NOT_A_ROTATION = [1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def feature_kinds() -> list[FeatureKind]:
    """Every hostile feature-chunk and camera kind."""
    return [
        # keypoints: what load can know
        ("every keypoint at (100, 100)", _chunk(_keypoints(100.0, 100.0)), "all at one point or on one line"),
        ("keypoints at (16383, 16383) outside the 512x384 image", _chunk(_keypoints(16383.0, 16383.0)),
         r"keypoint at \(16383, 16383\), outside its camera's 512x384 image"),
        ("keypoints x beyond the width", _chunk(_keypoints(600.0, None)), "outside its camera's 512x384 image"),
        ("keypoints all on one line", _chunk(_on_a_line), "all at one point or on one line"),
        ("keypoints outside, map without camera records (intrinsics' size)",
         _chunk(_keypoints(None, 390.0), _drop_records(lambda m: None)), "outside its camera's 512x384 image"),
        # what only verification can reject: the map loads, its claims are not verified
        ("random descriptors with empty slots", _chunk(_random_descriptors), None),
        ("every slot empty", _chunk(_all_empty), None),
        # the chunk's shape and type against the manifest
        ("slot count 0 in the chunk record", _sealed(_set("files", "features", 0, "slots", value=0)),
         r"files.features\[0\].slots is 0"),
        ("slot count 300 for a 400-slot chunk", _sealed(_set("files", "features", 0, "slots", value=300)),
         r"shape \(12, 400\), expected .* \(12, 300\)"),
        ("slot count 10**9 in local_features", _sealed(_set("local_features", "slots", value=10**9)),
         r"local_features.slots is 1000000000, expected an integer in 1..4000"),
        ("feature type sift for orb chunks", _sealed(_set("local_features", "type", value="sift")),
         "holds a .* array of shape"),
        ("feature type surf", _sealed(_set("local_features", "type", value="surf")), "local_features.type is 'surf'"),
        ("keypoint scale 8", _sealed(_set("local_features", "keypoint_scale", value=8)), "keypoint_scale is 8"),
        ("chunk rows 11 of 12", _sealed(_set("files", "features", 0, "rows", value=11)),
         "local-feature chunks hold 11 rows but count is 12"),
        ("chunk of 13 rows for 12", _chunk(_rows(13)), r"shape \(13, 400\), expected .* \(12, 400\)"),
        ("chunk of sift records for orb", _chunk(_as_dtype("sift")), "holds a .* array"),
        # intrinsics
        ("K = 1e308 with equidistant, D = 1e308",
         _sealed(_intrinsics(K=[1e308, 0, 256, 0, 1e308, 192, 0, 0, 1], distortion_model="equidistant",
                             D=[1e308] * 4)), "focal lengths"),
        ("D = 1e308 (equidistant)", _sealed(_intrinsics(distortion_model="equidistant", D=[1e308, 0, 0, 0])),
         "coefficient 0 of the equidistant model is 1e\\+308"),
        ("K all zero", _sealed(_intrinsics(K=[0.0] * 9)), r"fx, fy > 0"),
        ("K non-finite (1e400)", _raw_manifest('"K": [\n          420.0', '"K": [\n          1e400'),
         "not plain JSON|Out of range float"),
        ("negative focal length", _sealed(_intrinsics(K=[-420.0] + _K[1:])), r"fx, fy > 0"),
        ("focal length 1 px", _sealed(_intrinsics(K=[1.0, 0, 256, 0, 1.0, 192, 0, 0, 1])), "focal lengths"),
        ("principal point outside", _sealed(_intrinsics(K=_K[:2] + [9000.0] + _K[3:])), "principal point"),
        ("absurd distortion k1 = 1e6", _sealed(_intrinsics(distortion_model="plumb_bob", D=[1e6, 0, 0, 0, 0])),
         "coefficient 0 of the plumb_bob model is 1e\\+06"),
        ("K with a non-zero bottom row", _sealed(_intrinsics(K=_K[:6] + [0.5, 0.0, 1.0])), r"must be \[\[fx"),
        # the camera record
        ("extrinsic not a rotation", _sealed(_record(T_base_cam=_NOT_A_ROTATION)), "not a rotation matrix"),
        ("extrinsic a reflection", _sealed(_record(T_base_cam=[-1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])),
         "not a rotation matrix"),
        ("extrinsic non-finite (1e400)", _raw_manifest('"T_base_cam": [\n', '"T_base_cam": [\n 1e400, '),
         "not plain JSON|Out of range float"),
        ("extrinsic 1e6 m away", _sealed(_record(T_base_cam=[1.0, 0, 0, 1e6, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])),
         "more than 100 m"),
        ("record size differs from the intrinsics", _sealed(_record(width=640, height=480)),
         "intrinsics are for 512x384 images, its record says 640x480"),
        ("record image size 0", _sealed(_record(width=0)), "width is 0"),
        ("cameras not an object", _sealed(_set("local_features", "cameras", value=[1, 2])),
         "local_features.cameras is"),
    ]
