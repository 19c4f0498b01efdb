"""PNG plots of evaluation results: Recall@N curves, precision/recall curves and similarity matrices.

matplotlib is imported inside the functions, on its Agg canvas (no pyplot, no global backend switch), so importing
this module (or any metric) does not load it. Files are written atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dinomix_ros.evaluation.curves import PRCurve
from dinomix_ros.evaluation.inputs import EvaluationError, PathLike, as_bool_matrix, as_similarity
from dinomix_ros.evaluation.retrieval import RecallResult

__all__ = ["plot_recall_at_n", "plot_pr_curve", "plot_similarity_matrix"]

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
