"""The three evaluation setups of ``dinomix map eval``, as library calls: what they share, and the run folder.

* (a) :mod:`~dinomix_ros.evaluation.runs_folders`: two geotagged image folders, a database and queries; positives
  are database images within ``radius_m`` of the query (UTM or x/y metres), or come from an index ground truth on the
  standard VPR layout (:mod:`~dinomix_ros.evaluation.groundtruth`).
* (b) :mod:`~dinomix_ros.evaluation.runs_bag`: a map's keyframes as the database, a bag's images as queries;
  positives are keyframes within ``radius_m`` of the query's interpolated pose, in the same frame.
* (c) :mod:`~dinomix_ros.evaluation.runs_loop_closure`: causal loop closure over an image sequence against RTAB-Map
  ground truth.

Each returns a :class:`~dinomix_ros.evaluation.reports.RunResult`: the setup-specific part of the report (counts,
skipped inputs, per-query detail), the precision/recall curve of each query's best match and Recall@N.
:func:`save_run` turns a result into a run folder (``report.json`` and plots, see
:mod:`~dinomix_ros.evaluation.reports`) and optionally stores the calibrated
threshold in a map (:mod:`~dinomix_ros.evaluation.calibration`). This module also holds what setups (a) and (b)
share: the scoring of a search (Recall@N and the best-match PR curve) and the verified re-run of its queries.

The ``check_*_inputs`` functions of each setup read only file listings, manifests and bag metadata, so a wrong path,
topic or ground-truth size fails before a model is loaded. The encoder is any object with the
:class:`~dinomix_ros.model.encoder.Encoder` interface (``describe``, ``prepare``, ``describe_prepared``,
``descriptor_dim``, ``fingerprint``, ``config.batch_size``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.calibration import CalibrationConfig
from dinomix_ros.evaluation.curves import PRCurve, precision_recall_curve
from dinomix_ros.evaluation.reports import REPORT_FILE, RunResult, assemble_report, write_plots, write_report
from dinomix_ros.evaluation.retrieval import DEFAULT_NS, RecallResult, ns_within, recall_at_n

__all__ = [
    "SETUPS",
    "save_run",
]

if TYPE_CHECKING:
    from dinomix_ros.localization.verification import VerificationConfig

_logger = logging.getLogger(__name__)

SETUPS = ("folders", "bag", "loop_closure")
_DETAIL_TOP = 5  # candidates listed per query in report.json


# ------------------------------------------------------------------------------------------------- shared by the setups


def _score_search(D: np.ndarray, I: np.ndarray, positives: list[np.ndarray],
                  num_database: int) -> tuple[RecallResult, PRCurve, np.ndarray]:
    """Recall@N (for the N below ``num_database``, the entries searched) and the best-match PR curve of (Q, K)
    search results (I indexes the database, -1 padding).

    Returns:
        Recall@N, the PR curve, and whether each query's best match is correct.

    Raises:
        ValueError: there is no query.
    """
    if I.shape[0] == 0:
        raise ValueError("no query could be evaluated (no query image with a position was readable)")
    recall = recall_at_n(I, positives, ns_within(num_database, DEFAULT_NS))
    has_positive = np.array([p.size > 0 for p in positives], dtype=bool)
    correct = np.array([I[q, 0] >= 0 and bool(np.isin(I[q, 0], positives[q])) for q in range(I.shape[0])], bool)
    curve = precision_recall_curve(D[:, 0].astype(np.float64), correct, has_positive)
    return recall, curve, correct


def _verify_setup(report: dict[str, Any], D: np.ndarray, I: np.ndarray, positives: list[np.ndarray],
                  check: Any, verification: VerificationConfig, min_similarity: float, estimate: Any = None
                  ) -> PRCurve:
    """Verify the same queries, put the comparison into ``report["verification"]``; the verified-score PR curve
    (``estimate``: the motion of the best candidate, see :func:`~dinomix_ros.evaluation.verified.compare_search`)."""
    from dinomix_ros.evaluation.verified import compare_search

    comparison = compare_search(D, I, positives, check, config=verification, min_similarity=min_similarity,
                                ns=tuple(n for n in DEFAULT_NS if n <= I.shape[1]), estimate=estimate)
    report["verification"] = comparison.to_dict()
    return comparison.verified_curve


# ------------------------------------------------------------------------------------------------------ run folder


def save_run(result: RunResult, out: Path, *, model: dict[str, Any], target_precision: float,
             random_weights: bool = False, calibrate: Path | None = None,
             calibration: CalibrationConfig | None = None) -> dict[str, Any]:
    """Write the run folder: plots, then (optionally) the map's calibration, then ``report.json``.

    Args:
        result: what a setup measured.
        out: the run folder (created when missing).
        model: the evaluated model's fingerprint (``encoder.fingerprint.to_dict()``).
        target_precision: the precision the calibrated ``min_similarity`` must reach, in (0, 1].
        random_weights: the model has seeded random weights (noted in the report, the plots and the calibration).
        calibrate: a map built by the same model, to store the calibrated threshold in; nothing is stored when no
            threshold reaches the target or too few correct matches support it (check with
            :func:`~dinomix_ros.evaluation.calibration.require_calibration`).
        calibration: the evidence a threshold needs (default: ``CalibrationConfig()``); below it the run warns, and
            ``calibration.warning`` in the report says why.

    Returns:
        The report as written; ``calibration.written_to`` names the map when one was calibrated.

    Raises:
        MapMismatchError: ``calibrate`` was built by another model.
    """
    from dinomix_ros.evaluation.calibration import store_calibration, weak_evidence

    calibration = calibration or CalibrationConfig()
    report = assemble_report(result, model=model, target_precision=target_precision, random_weights=random_weights)
    threshold = report["calibration"]["min_similarity"]
    report["calibration"]["min_positives"] = calibration.min_positives
    weak = weak_evidence(report, calibration)
    if weak is not None:
        report["calibration"]["warning"] = weak
        _logger.warning("%s", weak)
    report["plots"].update(write_plots(out, result, threshold, random_weights))
    report_path = out / REPORT_FILE
    if calibrate is not None and threshold is not None and weak is None:
        store_calibration(calibrate, model, report, report_path, calibration)
        report["calibration"]["written_to"] = str(calibrate)
    write_report(report_path, report)
    _logger.info("%s: %s; min_similarity %s at precision %s -> %s", result.setup, result.recall.summary(), threshold,
                 target_precision, out)
    return report
