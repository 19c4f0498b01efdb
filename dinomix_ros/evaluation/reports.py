"""The run folder of an evaluation: ``report.json``, its PNG plots and the short summary printed for it.

An evaluation setup (:mod:`~dinomix_ros.evaluation.runs`) measures; this module turns what it measured into the
report: model, setup-specific counts and per-query detail, Recall@N, average precision, the calibration (the lowest
threshold reaching the target precision, its operating point, the max-F1 point) and the full PR curve. Reports are
plain JSON (:func:`json_ready`: numpy values to Python, non-finite floats to null).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinomix_ros.evaluation.curves import PRCurve
from dinomix_ros.evaluation.plots import plot_pr_curve, plot_recall_at_n, plot_similarity_matrix
from dinomix_ros.evaluation.retrieval import RecallResult

__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "REPORT_FILE",
    "RunResult",
    "json_ready",
    "assemble_report",
    "write_plots",
    "write_report",
    "summarize",
]

_logger = logging.getLogger(__name__)

#: Said by every output made with seeded random weights (maps, query results, reports, calibrations).
RANDOM_WEIGHTS_NOTE = "random weights: scores are meaningless"
#: The report's file name in the run folder.
REPORT_FILE = "report.json"
#: Report keys repeated in the summary (those a setup does not report are left out).
_SUMMARY_KEYS = ("setup", "note", "num_queries", "num_database", "radius_m", "recall", "average_precision",
                 "calibration", "verification", "seconds")


@dataclass(frozen=True, eq=False)
class RunResult:
    """What one evaluation setup measured.

    Attributes:
        setup: ``folders``, ``bag`` or ``loop_closure`` (:data:`~dinomix_ros.evaluation.runs.SETUPS`).
        report: the setup-specific part of ``report.json`` (inputs, counts, ``skipped``, per-query detail).
        pr_curve: precision/recall of accepting each query's best match.
        recall: Recall@N (N = :data:`~dinomix_ros.evaluation.retrieval.DEFAULT_NS`, or
            :data:`~dinomix_ros.evaluation.loops.LOOP_NS` for loop closure).
        seconds: wall time of the run (describing, searching, scoring).
        similarity: loop closure: the (N, N) frame similarity, for ``similarity.png``; None otherwise.
        ground_truth: loop closure: the (N, N) ground truth as read; None otherwise.
        verified_curve: with verification, the PR curve of the verified score (``pr_verified.png``); else None.
    """

    setup: str
    report: dict[str, Any]
    pr_curve: PRCurve
    recall: RecallResult
    seconds: float
    similarity: np.ndarray | None = None
    ground_truth: np.ndarray | None = None
    verified_curve: PRCurve | None = None


def json_ready(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, non-finite floats to None, paths to str, tuples to lists.

    Args:
        value: a dict, list, tuple, numpy value, path or plain value (nested freely).

    Returns:
        A value ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def assemble_report(result: RunResult, *, model: dict[str, Any], target_precision: float,
                    random_weights: bool = False) -> dict[str, Any]:
    """The report of one run, with the threshold calibrated for ``target_precision``; ``plots`` is still empty.

    Args:
        result: what the setup measured.
        model: the model fingerprint (``encoder.fingerprint.to_dict()``).
        target_precision: the precision the calibrated ``min_similarity`` must reach, in (0, 1].
        random_weights: the model has seeded random weights (the report says its scores are meaningless).

    Returns:
        The report dict; ``calibration.min_similarity`` is None when no threshold reaches the target.
    """
    curve = result.pr_curve
    threshold = curve.threshold_for_precision(target_precision)
    calibration = {
        "target_precision": target_precision,
        "min_similarity": threshold,
        "recall_at_target": curve.recall_at_precision(target_precision),
        "operating_point": None if threshold is None else curve.operating_point(threshold).to_dict(),
        "max_f1": curve.max_f1().to_dict(),
    }
    return {
        "setup": result.setup,
        "model": model,
        **({"note": RANDOM_WEIGHTS_NOTE} if random_weights else {}),
        **result.report,
        "recall": result.recall.to_dict(),
        "average_precision": curve.average_precision,
        "calibration": calibration,
        "pr_curve": curve.to_dict(),
        "seconds": round(result.seconds, 3),
        "plots": {},
    }


def write_plots(out: Path, result: RunResult, threshold: float | None, random_weights: bool = False) -> dict[str, str]:
    """``recall.png`` and ``pr.png`` (threshold marked), plus ``similarity.png`` for loop closure, into ``out``.

    Args:
        out: the run folder (created when missing).
        result: what the setup measured.
        threshold: the calibrated ``min_similarity`` to mark on the PR curve, or None.
        random_weights: label the curves as made with random weights.

    Returns:
        Plot name (``recall``, ``pr``, ``similarity``) -> file path, for the report's ``plots``.
    """
    label = f"DINO-Mix ({result.setup})" + (" [random weights]" if random_weights else "")
    plots = {"recall": out / "recall.png", "pr": out / "pr.png"}
    plot_recall_at_n({label: result.recall}, plots["recall"])
    plot_pr_curve({label: result.pr_curve}, plots["pr"], mark_threshold=threshold)
    if result.similarity is not None:
        plots["similarity"] = out / "similarity.png"
        ground_truth = None if result.ground_truth is None else result.ground_truth | result.ground_truth.T
        plot_similarity_matrix(result.similarity, ground_truth, plots["similarity"])
    if result.verified_curve is not None:  # both accept rules on the same queries, side by side
        plots["pr_verified"] = out / "pr_verified.png"
        plot_pr_curve({label + ": similarity of the best": result.pr_curve,
                       label + ": verified score of the re-ranked best": result.verified_curve},
                      plots["pr_verified"])
    return {name: str(path) for name, path in plots.items()}


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as indented JSON, atomically (a temporary file, then a rename).

    Returns:
        ``path``.
    """
    from dinomix_ros.util.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _logger.debug("wrote %s", path)
    return path


def summarize(report: dict[str, Any], report_path: Path) -> dict[str, Any]:
    """The headline of a report (setup, counts, Recall@N, AP, calibration, time) and where the full report is."""
    summary = {k: report[k] for k in _SUMMARY_KEYS if k in report}
    if "verification" in summary:  # the headline numbers; the curve stays in the report
        summary["verification"] = {k: v for k, v in summary["verification"].items() if k != "verified_score_pr_curve"}
    summary["report"] = str(report_path)
    return json_ready(summary)
