"""PNG plots of evaluation results: Recall@N curves, precision/recall curves, similarity matrices, trajectories.

matplotlib is imported inside the functions, on its Agg canvas (no pyplot, no global backend switch), so importing
this module (or any metric) does not load it. Files are written atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dinomix_ros.evaluation.curves import PRCurve
from dinomix_ros.evaluation.inputs import EvaluationError, PathLike, as_bool_matrix, as_similarity
from dinomix_ros.evaluation.retrieval import RecallResult

__all__ = ["plot_recall_at_n", "plot_pr_curve", "plot_similarity_matrix", "plot_trajectories"]

_logger = logging.getLogger(__name__)


def _new_figure(width: float = 6.0, height: float = 4.5) -> Any:
    # The Agg canvas directly, not pyplot: no global backend switch and nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: PathLike) -> Path:
    """Write the figure as PNG through a temporary file in the same folder, then os.replace (atomic)."""
    from dinomix_ros.util.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _logger.debug("wrote %s", path)
    return path


def plot_recall_at_n(
    results: Mapping[str, RecallResult | Mapping[str, Any]], path: PathLike, *, title: str = "Recall@N"
) -> Path:
    """Recall@N curves, one line per method/map.

    Args:
        results: label -> :class:`RecallResult`, its ``to_dict()``, or a plain ``{N: recall}`` dict.
        path: PNG file to write (folders are created).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: if ``results`` is empty or an entry cannot be read.
    """
    if not results:
        raise EvaluationError("results is empty; expected label -> RecallResult")
    curves: dict[str, dict[int, float]] = {}
    for label, res in results.items():
        if isinstance(res, Mapping) and "recalls" in res:
            res = RecallResult.from_dict(res)
        if isinstance(res, RecallResult):  # the legend says how many queries each curve is over
            curves[f"{label} ({res.num_queries} queries with a true match)"] = res.recalls
        elif isinstance(res, Mapping):
            try:
                curves[label] = {int(n): math.nan if r is None else float(r) for n, r in res.items()}
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"results[{label!r}] is not an {{N: recall}} dict: {exc}") from exc
        else:
            raise EvaluationError(f"results[{label!r}] is a {type(res).__name__}; expected a RecallResult or dict")

    fig = _new_figure()
    ax = fig.add_subplot()
    all_ns = sorted({n for c in curves.values() for n in c})
    for label, rec in curves.items():
        xs = sorted(rec)
        ax.plot(xs, [100.0 * rec[n] for n in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(all_ns)
    ax.set_xticklabels([str(n) for n in all_ns])
    ax.minorticks_off()
    ax.set_xlabel("N (top-N predictions)")
    ax.set_ylabel("Recall@N (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save_png(fig, path)


def plot_pr_curve(
    curves: Mapping[str, PRCurve],
    path: PathLike,
    *,
    mark_threshold: float | None = None,
    title: str = "Precision / recall over the similarity threshold",
) -> Path:
    """Precision-recall curves, one per method/map (the legend gives AP and the number of queries), optionally
    marking one threshold on each.

    Args:
        curves: label -> :class:`PRCurve`.
        path: PNG file to write (folders are created).
        mark_threshold: a ``min_similarity`` to mark (with its precision and recall) on every curve; the legend
            names it and says how many queries it accepts.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: if ``curves`` is empty or holds something other than PRCurve.
    """
    if not curves:
        raise EvaluationError("curves is empty; expected label -> PRCurve")
    for label, curve in curves.items():
        if not isinstance(curve, PRCurve):
            raise EvaluationError(f"curves[{label!r}] is a {type(curve).__name__}; expected a PRCurve")

    fig = _new_figure()
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ap = curve.average_precision
        ap_txt = "n/a" if math.isnan(ap) else f"{ap:.3f}"
        (line,) = ax.step(
            np.concatenate(([0.0], curve.recall)),
            np.concatenate(([1.0], curve.precision)),
            where="post",
            label=f"{label} (AP {ap_txt}, {curve.num_queries} queries, {curve.num_positives} with a true match)",
        )
        if mark_threshold is not None:
            pt = curve.operating_point(mark_threshold)
            ax.plot([pt.recall], [pt.precision], marker="o", linestyle="none", color=line.get_color(),
                    label=f"min_similarity {mark_threshold:.3f}: {pt.accepted} accepted, precision "
                          f"{pt.precision:.2f}, recall {pt.recall:.2f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save_png(fig, path)


def plot_similarity_matrix(
    similarity: npt.ArrayLike,
    ground_truth: npt.ArrayLike | None,
    path: PathLike,
    *,
    title: str = "Frame similarity (circles: ground-truth loops)",
) -> Path:
    """Heat map of a similarity matrix with the ground-truth loop cells circled.

    Args:
        similarity: (N, M) similarity (frame-vs-frame or query-vs-map).
        ground_truth: (N, M) bool loops to overlay, or None.
        path: PNG file to write (folders are created).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: on a non-2-D or non-finite similarity, or a ground truth of another shape.
    """
    sim = as_similarity(similarity, square=False)
    gt = None if ground_truth is None else as_bool_matrix(ground_truth, "ground_truth", sim.shape)

    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", interpolation="nearest", origin="upper")
    fig.colorbar(image, ax=ax, label="similarity")
    if gt is not None and gt.any():
        rows, cols = np.nonzero(gt)
        size = float(np.clip(2000.0 / max(sim.shape), 1.0, 30.0))
        ax.scatter(cols, rows, s=size, facecolors="none", edgecolors="red", linewidths=0.6, label="GT loop")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("frame j (map)")
    ax.set_ylabel("frame i (query)")
    ax.set_title(title)
    return _save_png(fig, path)


def plot_trajectories(
    trajectories: Mapping[str, npt.ArrayLike],
    path: PathLike,
    *,
    edges: Sequence[tuple[int, int]] = (),
    edges_on: str | None = None,
    rejected: Sequence[tuple[int, int]] = (),
    title: str = "Trajectories (top view)",
) -> Path:
    """Top view (x, y) of trajectories, one line per label, with loop-closure edges drawn between frames.

    Args:
        trajectories: label -> (N, 2+) positions or (N, 4, 4) poses, in one frame (metres); the first is the
            reference (drawn black, e.g. the ground truth), the fourth and later are dashed.
        path: PNG file to write (folders are created).
        edges: (i, j) frame pairs to join (loop closures), drawn on the ``edges_on`` trajectory.
        edges_on: the label the edges are drawn on (default: the first).
        rejected: (i, j) pairs drawn dashed in red (e.g. a closure the robust kernel rejected).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        EvaluationError: if ``trajectories`` is empty, a trajectory is not (N, 2+) / (N, 4, 4), or an edge names a
            frame that does not exist.
    """
    if not trajectories:
        raise EvaluationError("trajectories is empty; expected label -> positions")
    xy: dict[str, np.ndarray] = {}
    for label, traj in trajectories.items():
        arr = np.asarray(traj, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[1:] == (4, 4):
            arr = arr[:, :3, 3]
        if arr.ndim != 2 or arr.shape[1] < 2 or not np.isfinite(arr[:, :2]).all():
            raise EvaluationError(f"trajectories[{label!r}] has shape {arr.shape}; expected finite (N, 2+) "
                                  "positions or (N, 4, 4) poses")
        xy[label] = arr[:, :2]
    base = xy[edges_on if edges_on is not None else next(iter(xy))]
    for i, j in list(edges) + list(rejected):
        if not (0 <= i < len(base) and 0 <= j < len(base)):
            raise EvaluationError(f"edge ({i}, {j}) names a frame outside 0..{len(base) - 1}")

    fig = _new_figure(7.0, 5.0)
    ax = fig.add_subplot()
    for k, (i, j) in enumerate(edges):
        ax.plot(base[[i, j], 0], base[[i, j], 1], color="0.6", linewidth=0.8,
                label=f"loop closures ({len(edges)})" if k == 0 else None)
    for k, (i, j) in enumerate(rejected):
        ax.plot(base[[i, j], 0], base[[i, j], 1], color="red", linestyle="--", linewidth=1.2,
                label="rejected by the robust kernel" if k == 0 else None)
    styles = ["-", "-", "-", "--", ":", "-."]  # the first is the reference (black); later ones dashed: overlaps show
    for k, (label, points) in enumerate(xy.items()):
        (line,) = ax.plot(points[:, 0], points[:, 1], label=label, linewidth=2.4 if k == 0 else 1.4,
                          linestyle=styles[k % len(styles)], color="black" if k == 0 else f"C{k - 1}")
        ax.plot(points[:1, 0], points[:1, 1], marker="o", color=line.get_color(), linestyle="none")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save_png(fig, path)
