"""The demo's human-readable outputs (dinomix_ros.ros.demo), without a node: report.md holds the numbers, the table
of every query and both plots, and says what each colour and symbol means and how many queries each plot shows."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image

from dinomix_ros.ros.demo import markdown_report, plot_matches, summarize

DATA = Path(__file__).resolve().parents[1] / "data" / "rtabmap_corridor" / "samples"


def _rows() -> list[dict]:
    """Twelve revisit queries (41..52.jpg): every second one has a loop into the map, half of those correct."""
    rows = []
    for k in range(12):
        query, best = f"{41 + k}.jpg", f"{1 + k}.jpg"
        loop = k % 2 == 0
        correct = loop and k % 4 == 0
        rows.append({"query": query, "matches": [best, f"{2 + k}.jpg"], "similarity": [0.9 - 0.01 * k, 0.5],
                     "accepted": k < 8, "truth": [best] if correct else ([f"{20 + k}.jpg"] if loop else []),
                     "correct": correct, "has_loop": loop, "inliers": 40 - k, "verified_score": 30.0 - k,
                     # the fields query_row() gives: the similarity-only answer to the same query
                     "best_by_similarity": best, "correct_by_similarity": correct, "accepted_by_similarity": k < 6,
                     "similarity_order": [best, f"{2 + k}.jpg"]})
    return rows


def test_report_md_has_the_numbers_the_table_and_explained_plots(tmp_path: Path) -> None:
    rows = _rows()
    images = [DATA / f"{i}.jpg" for i in range(1, 60)]
    shown = plot_matches(rows, images, tmp_path / "matches.png", random_weights=True, n=4)
    assert [r["query"] for r in shown] == ["41.jpg", "43.jpg", "45.jpg", "47.jpg"]  # 4 of the 6 with a loop
    with Image.open(tmp_path / "matches.png") as img:
        assert img.size[0] > 500
    args = argparse.Namespace(min_similarity=0.5)
    report = summarize(rows, {i: 0.1 for i in range(12)}, 40, args, random_weights=True)
    text = markdown_report(report, rows, shown, args)

    assert text.startswith("# dinomix demo") and "**RANDOM WEIGHTS" in text
    for line in report["summary"]:
        assert f"- {line}" in text
    assert "![best matches](matches.png)" in text and "![precision and recall](precision_recall.png)" in text
    assert "`matches.png`: 4 of the 6 queries that have a ground-truth loop" in text
    assert "**green** = the best match is correct" in text and "**red** = it is not" in text
    assert "`precision_recall.png`: all 12 queries" in text and "`matching.min_similarity` = 0.5" in text
    table = [line for line in text.splitlines() if re.match(r"\| \d+\.jpg", line)]
    assert len(table) == 12 and table[0] == "| 41.jpg | 1.jpg | 0.9000 | 40 | yes | yes | 1.jpg | yes | 1.jpg |"
    assert table[1] == "| 42.jpg | 2.jpg | 0.8900 | 39 | yes | - (no loop) | 2.jpg | yes | none |"
    assert table[7] == "| 48.jpg | 8.jpg | 0.8300 | 33 | yes | - (no loop) | 8.jpg | no | none |"
