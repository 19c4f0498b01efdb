"""Tests for dinomix_ros.evaluation.plots: PNG files written atomically, bad input refused, matplotlib loaded lazily."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinomix_ros.evaluation.inputs import EvaluationError
from dinomix_ros.evaluation.loops import evaluate_loop_closures, evaluate_relocalization
from dinomix_ros.evaluation.plots import plot_pr_curve, plot_recall_at_n, plot_similarity_matrix, plot_trajectories

REPO = Path(__file__).resolve().parents[2]


def _assert_png(path: Path, min_size: tuple[int, int]) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        img.verify()


def test_plots_are_written(tmp_path: Path, corridor_thumbnails: np.ndarray, corridor_gt: np.ndarray) -> None:
    x = corridor_thumbnails
    sim = x @ x.T
    rep = evaluate_loop_closures(sim, corridor_gt)
    reloc = evaluate_relocalization(sim[40:, :40], corridor_gt[40:, :40])

    out = plot_recall_at_n(
        {"loop closure": rep.recall, "relocalization": reloc.recall.to_dict(), "plain": {1: 0.2, 5: 0.5, 10: 0.6}},
        tmp_path / "plots" / "recall.png",
    )
    assert out == tmp_path / "plots" / "recall.png"
    _assert_png(out, (400, 300))
    _assert_png(plot_pr_curve({"thumbnails": rep.pr_curve}, tmp_path / "pr.png", mark_threshold=0.8), (400, 300))
    _assert_png(plot_similarity_matrix(sim, corridor_gt, tmp_path / "sim.png"), (400, 300))
    _assert_png(plot_similarity_matrix(sim[40:, :40], None, tmp_path / "sim_q.png"), (400, 300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "pr.png", "sim.png", "sim_q.png"]  # no temp files


def test_trajectories_are_plotted_with_their_loop_closures(tmp_path: Path) -> None:
    t = np.linspace(0, 2 * np.pi, 50)
    truth = np.c_[5 * np.cos(t), 3 * np.sin(t), np.zeros_like(t)]
    poses = np.repeat(np.eye(4)[None], 50, axis=0)
    poses[:, :3, 3] = truth * 1.1
    out = plot_trajectories({"ground truth": truth, "odometry": poses, "graph": truth[:, :2] + 0.05},
                            tmp_path / "traj.png", edges=[(0, 49), (1, 48)], rejected=[(10, 35)])
    _assert_png(out, (500, 350))
    assert [p.name for p in tmp_path.iterdir()] == ["traj.png"]
    with pytest.raises(EvaluationError, match="trajectories is empty"):
        plot_trajectories({}, tmp_path / "t.png")
    with pytest.raises(EvaluationError, match=r"trajectories\['x'\] has shape \(3,\)"):
        plot_trajectories({"x": np.zeros(3)}, tmp_path / "t.png")
    with pytest.raises(EvaluationError, match=r"edge \(0, 50\) names a frame outside 0..49"):
        plot_trajectories({"gt": truth}, tmp_path / "t.png", edges=[(0, 50)])
    assert [p.name for p in tmp_path.iterdir()] == ["traj.png"]


def test_plots_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="results is empty"):
        plot_recall_at_n({}, tmp_path / "r.png")
    with pytest.raises(EvaluationError, match="expected a PRCurve"):
        plot_pr_curve({"x": {"thresholds": []}}, tmp_path / "p.png")
    with pytest.raises(EvaluationError, match=r"ground_truth has shape \(2, 2\)"):
        plot_similarity_matrix(np.zeros((3, 3)), np.zeros((2, 2), bool), tmp_path / "s.png")
    assert not list(tmp_path.iterdir())


def test_import_does_not_load_matplotlib_torch_or_ros() -> None:
    names = ("inputs", "retrieval", "curves", "loops", "plots", "reports", "calibration", "runs")
    modules = ", ".join(f"dinomix_ros.evaluation.{m}" for m in names)
    code = (
        f"import sys, {modules}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'rclpy', 'torch'}))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
