"""Storing a calibrated similarity threshold in a map, for the live node.

An evaluation (:mod:`~dinomix_ros.evaluation.runs`) finds the lowest ``min_similarity`` reaching a target
precision; :func:`store_calibration` writes it with the target, the recall there and the evaluation summary into
the map's ``metadata["calibration"]`` (an atomic save that keeps the stored index). The node uses it when
``matching.use_map_calibration`` is on, and ``dinomix map info`` shows it.

A threshold means something only for the model that produced the scores, so the map must have been built by the
evaluated model (:func:`check_same_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dinomix_ros.evaluation.reports import json_ready

__all__ = [
    "CalibrationError",
    "check_calibration_target",
    "check_same_model",
    "store_calibration",
    "require_calibration",
]

_logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """No similarity threshold reaches the target precision, so the map was not calibrated."""


def check_calibration_target(path: Path) -> dict[str, Any]:
    """Read the manifest of the map to calibrate (before a model loads: a wrong path fails at once).

    Returns:
        The manifest.

    Raises:
        MapNotFoundError / MapFormatError: no readable map at ``path``.
    """
    from dinomix_ros.maps.manifest import read_manifest

    return read_manifest(path)


def check_same_model(path: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to calibrate a map built by another model than the one evaluated.

    Args:
        path: the map to calibrate.
        fingerprint: the evaluated model's fingerprint (``encoder.fingerprint.to_dict()``).

    Raises:
        MapMismatchError: the map's model differs.
    """
    from dinomix_ros.maps.keyframes import MapMismatchError
    from dinomix_ros.maps.manifest import read_manifest

    map_model = read_manifest(path)["fingerprint"]
    if map_model["id"] != fingerprint["id"]:
        raise MapMismatchError(f"--calibrate {path} was built with model {map_model['id']} "
                               f"({map_model.get('architecture')}), but the model in use is {fingerprint['id']} "
                               f"({fingerprint.get('architecture')}): a threshold of one model means nothing "
                               "for another. Evaluate with the model that built the map")


def store_calibration(path: Path, fingerprint: dict[str, Any], report: dict[str, Any],
                      report_path: Path) -> dict[str, Any]:
    """Store the calibrated threshold and the evaluation summary in the map's ``metadata["calibration"]``.

    Args:
        path: the map (built by the model of ``fingerprint``).
        fingerprint: the evaluated model's fingerprint.
        report: the run's report (:func:`~dinomix_ros.evaluation.reports.assemble_report`) with a threshold.
        report_path: where the full report is (recorded in the calibration).

    Returns:
        The calibration record written.

    Raises:
        CalibrationError: the report has no threshold (call :func:`require_calibration` for the message).
        MapMismatchError: the map was built by another model.
    """
    from dinomix_ros.maps.keyframes import KeyframeMap, utc_now_iso

    require_calibration(report, path)
    kmap = KeyframeMap.load(path, expected_fingerprint=fingerprint, load_index=False)
    cal = report["calibration"]
    record = json_ready({
        "min_similarity": cal["min_similarity"],
        "target_precision": cal["target_precision"],
        "recall_at_target": cal["recall_at_target"],
        "setup": report["setup"],
        "radius_m": report.get("radius_m"),
        "evaluated": utc_now_iso(),
        "model": fingerprint["id"],
        "report": str(report_path),
        "summary": {"recall": report["recall"], "average_precision": report["average_precision"],
                    "num_queries": report.get("num_queries"), "operating_point": cal["operating_point"]},
        **({"note": report["note"]} if "note" in report else {}),
    })
    kmap.metadata["calibration"] = record
    kmap.save(path)
    _logger.info("calibrated %s: min_similarity %.6f for precision %s", path, cal["min_similarity"],
                 cal["target_precision"])
    return record


def require_calibration(report: dict[str, Any], path: Path) -> None:
    """Raise when the run found no threshold reaching its target precision (the map at ``path`` stays unchanged).

    Raises:
        CalibrationError: ``report["calibration"]["min_similarity"]`` is None; says the best precision reached.
    """
    cal = report["calibration"]
    if cal["min_similarity"] is not None:
        return
    precisions = [p for p in report["pr_curve"]["precision"] if p is not None]
    best = max(precisions, default=float("nan"))
    raise CalibrationError(f"no similarity threshold reaches precision {cal['target_precision']} (best: "
                           f"{best:.3f}); {path} was not changed. Lower --target-precision, or evaluate on more data")
