"""Loop closure with and without verification on the same queries (thumbnail descriptors: fast, ROS-free)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from dinomix_ros.evaluation.inputs import EvaluationError
from dinomix_ros.evaluation.verified import compare_loop_closures
from dinomix_ros.imaging.features import FeatureExtractor
from dinomix_ros.localization.verification import VerificationConfig


@pytest.fixture(scope="module")
def corridor_features():
    folder = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"
    ex = FeatureExtractor()
    return [ex.extract(cv2.imread(str(folder / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE)) for i in range(1, 85)]


def test_verification_raises_precision_and_reranking_raises_recall(
        corridor_thumbnails, corridor_gt, corridor_features) -> None:
    sim = corridor_thumbnails @ corridor_thumbnails.T
    result = compare_loop_closures(sim, corridor_gt, corridor_features, min_similarity=-1.0)
    d = result.to_dict()
    assert d["with_verification"]["precision"] >= 0.95
    assert d["without_verification"]["accepted"] == 73  # every frame with a candidate (84 - 11), min_similarity off
    assert d["without_verification"]["precision"] < d["with_verification"]["precision"]
    assert result.recall_after.recalls[1] >= result.recall_before.recalls[1]
    assert result.recall_after.recalls[5] == result.recall_before.recalls[5]
    assert result.verified.sum() == d["with_verification"]["accepted"]
    # re-ranking off: the order (and so Recall@N) stays the similarity order
    same = compare_loop_closures(sim, corridor_gt, corridor_features, min_similarity=-1.0,
                                 config=VerificationConfig(rerank=False))
    assert same.recall_after.to_dict() == same.recall_before.to_dict()


def test_inputs_are_checked(corridor_thumbnails, corridor_gt, corridor_features) -> None:
    sim = corridor_thumbnails @ corridor_thumbnails.T
    with pytest.raises(EvaluationError, match="83 feature sets for 84 frames"):
        compare_loop_closures(sim, corridor_gt, corridor_features[:83])
    with pytest.raises(EvaluationError, match="no frame has a candidate"):
        compare_loop_closures(sim[:5, :5], corridor_gt[:5, :5], corridor_features[:5], exclude_recent=10)
