"""The evaluation setups (a) folders and (b) map against a bag, with geometric verification of the same queries."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
from bagfactory import write_camera_bag

from dinomix_ros.evaluation.runs import save_run
from dinomix_ros.evaluation.runs_bag import evaluate_map_against_bag
from dinomix_ros.evaluation.runs_folders import evaluate_folders
from dinomix_ros.imaging.features import FeatureConfig
from dinomix_ros.localization.verification import VerificationConfig
from dinomix_ros.maps.build_bag import BagMapConfig, build_map_from_bag
from dinomix_ros.maps.sources.poses import KeyframeGateConfig
from dinomix_ros.model.encoder import Encoder, EncoderConfig
from dinomix_ros.maps.storage import save_map

CAMERA = "/camera/image_raw/compressed"


def test_folders_with_verification_of_the_same_queries(tmp_path: Path, data_dir: Path, thumbnail_encoder) -> None:
    """Database: the first corridor pass; queries: revisits (positions: the frame number of the place, 1 m apart)."""
    samples = data_dir / "rtabmap_corridor" / "samples"
    database, queries = tmp_path / "database", tmp_path / "queries"
    database.mkdir()
    queries.mkdir()
    db_lines, q_lines = ["image,x,y"], ["image,x,y"]
    for i in range(1, 41, 2):
        shutil.copy(samples / f"{i}.jpg", database / f"{i}.jpg")
        db_lines.append(f"{i}.jpg,{i},0")
    for i in range(42, 79, 4):  # revisit i shows about the place of frame i - 40
        shutil.copy(samples / f"{i}.jpg", queries / f"{i}.jpg")
        q_lines.append(f"{i}.jpg,{i - 40},0")
    (tmp_path / "db.csv").write_text("\n".join(db_lines) + "\n")
    (tmp_path / "q.csv").write_text("\n".join(q_lines) + "\n")
    result = evaluate_folders(thumbnail_encoder, database, queries, geotags="csv", database_csv=tmp_path / "db.csv",
                              queries_csv=tmp_path / "q.csv", radius_m=3.0, search_device="cpu",
                              verification=VerificationConfig(), min_similarity=-1.0)
    v = result.report["verification"]
    assert v["recall_before"]["num_queries"] == v["recall_after"]["num_queries"] == 10
    assert v["without_verification"]["accepted"] == 10  # min_similarity off: every best is accepted
    assert v["with_verification"]["accepted"] >= 5 and v["with_verification"]["precision"] == 1.0
    assert v["with_verification"]["precision"] > v["without_verification"]["precision"]
    assert result.verified_curve is not None
    report = save_run(result, tmp_path / "run", model=thumbnail_encoder.fingerprint.to_dict(), target_precision=0.9)
    assert (tmp_path / "run" / "pr_verified.png").stat().st_size > 1000 and "pr_verified" in report["plots"]
    # without verification: the report has none
    plain = evaluate_folders(thumbnail_encoder, database, queries, geotags="csv", database_csv=tmp_path / "db.csv",
                             queries_csv=tmp_path / "q.csv", radius_m=3.0, search_device="cpu")
    assert "verification" not in plain.report and plain.verified_curve is None


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_random("vits14", 0, EncoderConfig(device="cpu", dtype="float32", batch_size=4))


def test_map_against_bag_verifies_with_the_maps_features(tmp_path: Path, data_dir: Path, encoder) -> None:
    samples = data_dir / "rtabmap_corridor" / "samples"
    frames = [cv2.cvtColor(cv2.imread(str(samples / f"{i}.jpg")), cv2.COLOR_BGR2RGB) for i in range(1, 9)]
    bag = write_camera_bag(tmp_path / "bag", frames=frames, image_topics=(CAMERA,), image_format="jpeg")
    config = BagMapConfig(image_topics=(CAMERA,), pose_topic="/odom",
                          gate=KeyframeGateConfig(min_distance_m=0.3, min_rotation_deg=0.0))
    kmap, _ = build_map_from_bag(bag.path, encoder, config, progress=False, features=FeatureConfig())
    with_features = save_map(kmap, tmp_path / "with.dinomap")
    result = evaluate_map_against_bag(encoder, with_features, bag.path, config, radius_m=0.1,
                                      verification=VerificationConfig(), min_similarity=0.5)
    v = result.report["verification"]
    assert v["recall_before"]["num_queries"] == len(kmap) == 4  # frames with a keyframe within 0.1 m: the keyframes
    # a keyframe is its own query frame (same image): verified with every feature, and correct
    assert v["with_verification"]["accepted"] >= len(kmap) and v["with_verification"]["precision"] == 1.0
    assert v["recall_after"]["recalls"]["1"] >= v["recall_before"]["recalls"]["1"]
    # a map without local features: no verification, and the run still works
    plain, _ = build_map_from_bag(bag.path, encoder, config, progress=False)
    result = evaluate_map_against_bag(encoder, save_map(plain, tmp_path / "plain.dinomap"), bag.path, config,
                                      radius_m=0.1, verification=VerificationConfig())
    assert "verification" not in result.report and result.recall.num_queries > 0
