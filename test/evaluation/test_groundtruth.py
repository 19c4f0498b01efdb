"""Tests for dinomix_ros.evaluation.groundtruth: index ground truth of the VPR layout as JSON, CSV or a numeric .npy
matrix, checked against the folder sizes; a pickled array is refused, never unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dinomix_ros.evaluation.groundtruth import GroundTruthError, load_index_ground_truth
from dinomix_ros.evaluation.inputs import EvaluationError

POSITIVES = [[2], [4, 5], [], [0, 3, 1]]  # 4 queries, 6 database images


def as_lists(positives: list[np.ndarray]) -> list[list[int]]:
    return [p.tolist() for p in positives]


def write_all_formats(folder: Path) -> dict[str, Path]:
    matrix = np.zeros((4, 6), bool)
    for q, row in enumerate(POSITIVES):
        matrix[q, row] = True
    paths = {"json": folder / "gt.json", "csv": folder / "gt.csv", "npy": folder / "gt.npy",
             "npy_int": folder / "gt_int.npy", "csv_header": folder / "gt_header.csv"}
    paths["json"].write_text(json.dumps(POSITIVES))
    paths["csv"].write_text("2\n4,5\n\n0, 3 ,1\n")
    paths["csv_header"].write_text("positives\n2\n4,5\n\n0,3,1\n")
    np.save(paths["npy"], matrix)
    np.save(paths["npy_int"], matrix.astype(np.uint8))
    return paths


def test_every_format_gives_the_same_sorted_positives(tmp_path: Path) -> None:
    for kind, path in write_all_formats(tmp_path).items():
        positives = load_index_ground_truth(path, num_queries=4, num_database=6)
        assert as_lists(positives) == [[2], [4, 5], [], [0, 1, 3]], kind
        assert all(p.dtype == np.int64 for p in positives), kind


def test_counts_and_indices_must_fit_the_folders(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path)
    with pytest.raises(GroundTruthError, match=r"gt.json has 4 query rows but the query folder holds 5 images"):
        load_index_ground_truth(paths["json"], 5, 6)
    with pytest.raises(GroundTruthError, match=r"gt.csv: query 1 lists database index 5, but the database folder "
                                               r"holds 5 images \(indices 0..4\)"):
        load_index_ground_truth(paths["csv"], 4, 5)
    with pytest.raises(GroundTruthError, match=r"gt.npy is 4 x 6 but the folders hold 4 queries and 7 database "
                                               r"images; expected 4 x 7"):
        load_index_ground_truth(paths["npy"], 4, 7)
    (tmp_path / "neg.json").write_text("[[-1]]")
    with pytest.raises(GroundTruthError, match=r"query 0 lists database index -1"):
        load_index_ground_truth(tmp_path / "neg.json", 1, 3)


class Payload:
    """Unpickling an instance runs code: it sets ``Payload.ran``."""

    ran = False

    def __reduce__(self):
        return (setattr, (Payload, "ran", True))


def test_a_pickled_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "gt.npy"
    np.save(path, np.array([[Payload()]], dtype=object), allow_pickle=True)
    with pytest.raises(GroundTruthError, match=r"gt.npy is not a numeric array .*never a pickle"):
        load_index_ground_truth(path, 1, 1)
    assert not Payload.ran


@pytest.mark.parametrize(("name", "content", "message"), [
    ("gt.json", "{\"0\": [1]}", r"holds a dict of other things; expected a list with one list"),
    ("gt.json", "[[1, true]]", r"query 0 lists True; expected database indices"),
    ("gt.json", "[[1.5]]", r"query 0 lists 1.5; expected database indices"),
    ("gt.json", "[[1]", r"is not valid JSON"),
    ("gt.csv", "1,2\nx,3\n", r"gt.csv, line 2: 'x,3' is not a list of database indices"),
    ("gt.txt", "1\n", r"has the extension '.txt'; expected one of .json, .csv, .npy"),
])
def test_malformed_files_are_refused_with_what_was_found(tmp_path: Path, name: str, content: str,
                                                         message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(GroundTruthError, match=message) as exc:
        load_index_ground_truth(tmp_path / name, 2, 3)
    assert isinstance(exc.value, EvaluationError) and isinstance(exc.value, ValueError)


def test_matrix_shapes_and_values(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros(6))
    with pytest.raises(GroundTruthError, match=r"has shape \(6,\); expected a 2-D Q x R matrix \(2 x 3\)"):
        load_index_ground_truth(tmp_path / "flat.npy", 2, 3)
    nan = np.zeros((2, 3))
    nan[0, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(GroundTruthError, match=r"holds NaN or infinite values"):
        load_index_ground_truth(tmp_path / "nan.npy", 2, 3)
    np.save(tmp_path / "text.npy", np.array([["a", "b", "c"]] * 2))
    with pytest.raises(GroundTruthError, match=r"has dtype <U1; expected bool or numbers"):
        load_index_ground_truth(tmp_path / "text.npy", 2, 3)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_index_ground_truth(tmp_path / "missing.json", 2, 3)
