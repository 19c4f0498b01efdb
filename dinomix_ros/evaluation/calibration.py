"""Storing a calibrated similarity threshold in a map, for the live node.

An evaluation (:mod:`~dinomix_ros.evaluation.runs`) finds the lowest ``min_similarity`` reaching a target
precision; :func:`store_calibration` writes it with the target, the recall there and the evaluation summary into
the map's ``metadata["calibration"]`` (an atomic save that keeps the stored index). The node uses it when
``matching.use_map_calibration`` is on, and ``dinomix map info`` shows it.

A threshold means something only for the model that produced the scores, so the map must have been built by the
evaluated model (:func:`check_same_model`). And it means something only when enough correct matches were accepted at
it: a precision of 1.0 measured on one accepted match is no evidence. :class:`CalibrationConfig` declares that
minimum (``--min-positives``); below it :func:`weak_evidence` says how many there were, the run warns, and the
map is not calibrated (:func:`require_calibration`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dinomix_ros.evaluation.reports import json_ready
from dinomix_ros.settings import check, setting

__all__ = [
    "CalibrationConfig",
    "CalibrationError",
    "weak_evidence",
    "check_calibration_target",
    "check_same_model",
    "store_calibration",
    "require_calibration",
]

_logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """No similarity threshold reaches the target precision, or too few matches support it: the map was not
    calibrated."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How much evidence a calibrated threshold needs (``dinomix map eval --min-positives``)."""

    SETTINGS_GROUP: ClassVar[str] = "calibration"

    min_positives: int = setting(20, "a threshold is stored in a map only when at least this many correct matches "
                                     "are accepted at it (fewer: its precision rests on too little evidence)",
                                 min=1, max=1_000_000)

    def __post_init__(self) -> None:
        check(self)


def weak_evidence(report: dict[str, Any], config: CalibrationConfig | None = None) -> str | None:
    """Why the report's calibrated threshold rests on too few correct matches; None when it has enough (or none).

    Args:
        report: a run's report (:func:`~dinomix_ros.evaluation.reports.assemble_report`).
        config: the minimum (default: :class:`CalibrationConfig`'s).

    Returns:
        One sentence naming the threshold, how many correct matches it accepted out of how many accepted and
        evaluated queries, and the minimum; None when the threshold is None or well supported.
    """
    config = config or CalibrationConfig()
    cal = report["calibration"]
    point = cal.get("operating_point")
    if cal["min_similarity"] is None or point is None or point["true_positives"] >= config.min_positives:
        return None
    return (f"the calibrated min_similarity {cal['min_similarity']:.6f} rests on {point['true_positives']} correct "
            f"match(es) ({point['accepted']} accepted of {report['pr_curve']['num_queries']} queries); at least "
            f"{config.min_positives} are needed before its precision of {point['precision']:.3f} means anything")


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
                      report_path: Path, config: CalibrationConfig | None = None) -> dict[str, Any]:
    """Store the calibrated threshold and the evaluation summary in the map's ``metadata["calibration"]``.

    Args:
        path: the map (built by the model of ``fingerprint``).
        fingerprint: the evaluated model's fingerprint.
        report: the run's report (:func:`~dinomix_ros.evaluation.reports.assemble_report`) with a threshold.
        report_path: where the full report is (recorded in the calibration).
        config: the evidence the threshold needs (default: :class:`CalibrationConfig`'s).

    Returns:
        The calibration record written.

    Raises:
        CalibrationError: the report has no threshold, or too few correct matches support it (see
            :func:`require_calibration`).
        MapMismatchError: the map was built by another model.
    """
    from dinomix_ros.maps.keyframes import utc_now_iso
    from dinomix_ros.maps.loading import load_map
    from dinomix_ros.maps.storage import save_map

    require_calibration(report, path, config)
    kmap = load_map(path, expected_fingerprint=fingerprint, load_index=False)
    cal = report["calibration"]
    record = json_ready({
        "min_similarity": cal["min_similarity"],
        "target_precision": cal["target_precision"],
        "recall_at_target": cal["recall_at_target"],
        "correct_matches": cal["operating_point"]["true_positives"],
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
    save_map(kmap, path)
    _logger.info("calibrated %s: min_similarity %.6f for precision %s", path, cal["min_similarity"],
                 cal["target_precision"])
    return record


def require_calibration(report: dict[str, Any], path: Path, config: CalibrationConfig | None = None) -> None:
    """Raise when the run gives no threshold to store in the map at ``path`` (which then stays unchanged).

    Args:
        report: the run's report.
        path: the map that was to be calibrated (named in the message).
        config: the evidence a threshold needs (default: :class:`CalibrationConfig`'s).

    Raises:
        CalibrationError: no threshold reaches the target precision (the message says the best precision reached),
            or fewer correct matches than ``config.min_positives`` support it (the message says how many).
    """
    cal = report["calibration"]
    weak = weak_evidence(report, config)
    if weak is not None:
        raise CalibrationError(f"{weak}; {path} was not changed. Evaluate on more queries, or lower --min-positives "
                               "if you accept a threshold on this little evidence")
    if cal["min_similarity"] is not None:
        return
    precisions = [p for p in report["pr_curve"]["precision"] if p is not None]
    best = max(precisions, default=float("nan"))
    raise CalibrationError(f"no similarity threshold reaches precision {cal['target_precision']} (best: "
                           f"{best:.3f}); {path} was not changed. Lower --target-precision, or evaluate on more data")
