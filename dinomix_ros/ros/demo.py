"""The demo behind ``make demo``: a real corridor drive replayed as a camera into the running node.

RTAB-Map's corridor sequence (84 images, driven twice, with loop-closure ground truth) is published image by
image on ``/camera/image_raw``:

1. ``localize_node`` starts (a subprocess, as ``ros2 launch`` would start it) with an empty map;
2. the first pass (images 1-40) is recorded as keyframes through the ``~/start_recording`` / ``~/stop_recording``
   services, saved with ``~/save_map`` and reloaded with ``~/load_map``;
3. the revisits (images 41-84) are localized against that map: the script prints each match, recall@N and
   precision/recall against the ground truth, the latency from publishing an image to receiving its matches, and
   saves plots (matches, precision/recall), ``report.json`` and ``report.md`` (the same table and numbers for a
   person, with the plots embedded and explained) in the output folder. Both accept rules are shown on the same
   queries: without verification (the candidate of highest similarity, accepted at ``--min-similarity``, what the
   node does with ``verification.enabled:=false``) and with it (the node's re-ranked, geometrically verified best,
   as published in ``~/matches``: its ``accepted``, ``inliers`` and ``verified_score`` fields).

Without ``--checkpoint`` the model has seeded random weights: the pipeline runs end to end, but similarity
scores carry no place information and the numbers are meaningless. With the official DINO-Mix weights
(``--checkpoint dinov2_vitb14_mix.ckpt``) the same command gives real numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dinomix_ros.evaluation.curves import precision_recall_curve
from dinomix_ros.evaluation.loops import load_loop_closure_ground_truth
from dinomix_ros.evaluation.plots import plot_pr_curve
from dinomix_ros.util.files import atomic_path
from dinomix_ros.maps.sources.imagefolder import list_images

if TYPE_CHECKING:  # rclpy is imported after the environment is set (see main)
    from dinomix_ros.ros.session import NodeProcess, RosClient

DATA = Path(__file__).resolve().parents[2] / "test" / "data" / "rtabmap_corridor"
NODE = "/dinomix_localizer"
CAMERA = "/camera/image_raw"
FRAME_PERIOD_NS = 1_000_000_000  # the corridor images carry no time: one frame per second of synthetic time
STAMP0_NS = 1_700_000_000_000_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dinomix_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="DINO-Mix weights; default: seeded random weights")
    parser.add_argument("--variant", default="vits14", help="backbone of the random weights")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--images", type=Path, default=DATA / "samples", help="the corridor images (1.jpg ... 84.jpg)")
    parser.add_argument("--ground-truth", type=Path, default=DATA / "samples_GT.bmp", help="loop-closure ground truth")
    parser.add_argument("--first-pass", type=int, default=40, help="images recorded as the map")
    parser.add_argument("--min-similarity", type=float, default=0.5, help="the node's acceptance threshold")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo-<UTC time>)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the node at each step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("runs") / f"demo-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # this script's own participant stays local too
    images = list_images(args.images)
    gt = load_loop_closure_ground_truth(args.ground_truth)
    if gt.shape[0] != len(images):
        raise SystemExit(f"{args.ground_truth} covers {gt.shape[0]} images, {args.images} has {len(images)}")
    random_weights = args.checkpoint is None
    banner(random_weights)
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw_available(rmw):
        print(f"RMW_IMPLEMENTATION={rmw} is set, but that middleware is not installed here (the ROS 2 wheels bring "
              "rmw_fastrtps_cpp only). Run `unset RMW_IMPLEMENTATION` or `export RMW_IMPLEMENTATION=rmw_fastrtps_cpp` "
              "and start the demo again (`make demo` sets it for you).", file=sys.stderr)
        return 2

    from dinomix_ros.ros.session import NodeProcess, RosClient  # rclpy imports after the environment is set

    domain = int(os.environ.get("ROS_DOMAIN_ID") or random.Random().randrange(101, 200))
    map_path = out / "corridor.dinomap"
    params = {"map.path": str(map_path.resolve()), "map.create_if_missing": True, "model.device": args.device,
              "cameras.topics": [CAMERA], "cameras.reliability": "reliable",
              # no odometry in this data set: every recorded frame becomes a keyframe (time rule only)
              "recording.max_interval_s": 0.5, "matching.min_similarity": args.min_similarity,
              "matching.top_k": 5}
    if random_weights:
        params.update({"model.random_weights": True, "model.variant": args.variant})
    else:
        params["model.checkpoint"] = str(args.checkpoint.resolve())
    print(f"starting localize_node (ROS_DOMAIN_ID {domain}, log {out / 'localizer.log'}) ...", flush=True)
    node = NodeProcess.localizer(out, domain, params)
    client = RosClient(domain, name="dinomix_demo")
    try:
        result = run(client, node, images, gt, args, out, random_weights)
    finally:
        client.close()
        code = node.stop()
    print(f"localize_node exited with code {code} after SIGINT")
    print(f"\nreport, plots and map in {out}/")
    return 0 if result and code == 0 else 1


def run(client: RosClient, node: NodeProcess, images: list[Path], gt: np.ndarray, args: argparse.Namespace,
        out: Path, random_weights: bool) -> bool:
    from sensor_msgs.msg import Image, PointCloud2
    from std_srvs.srv import Trigger

    from dinomix_ros.ros.conversions import matches_to_array, time_to_ns

    matches = client.collect(PointCloud2, f"{NODE}/matches")
    camera = client.publisher(Image, CAMERA)
    if not node.wait_for_log("active: cameras", timeout=args.timeout):
        print(node.log[-3000:])
        raise SystemExit("localize_node did not become active; its log is above")
    client.wait_for_subscribers(camera)
    latencies: dict[int, float] = {}

    def publish(i: int) -> np.ndarray:
        stamp = STAMP0_NS + i * FRAME_PERIOD_NS
        msg = image_message(images[i], stamp)
        sent = time.monotonic()
        camera.publish(msg)

        def answer() -> tuple[float, object] | None:
            return next(((t, m) for t, m in matches if time_to_ns(m.header.stamp) == stamp), None)

        if not client.spin_until(lambda: answer() is not None, args.timeout):
            raise SystemExit(f"no matches for image {images[i].name} within {args.timeout} s")
        received, reply = answer()
        latencies[i] = received - sent
        return matches_to_array(reply)

    def call(service: str) -> str:
        response = client.call(Trigger, f"{NODE}/{service}", timeout=args.timeout)
        print(f"  ~/{service}: {response.message}")
        if not response.success:
            raise SystemExit(f"~/{service} failed: {response.message}")
        return response.message

    n_first = args.first_pass
    print(f"\n1. recording the first pass ({n_first} images) through the services")
    call("start_recording")
    for i in range(n_first):
        publish(i)
    call("stop_recording")
    call("save_map")
    call("load_map")

    print(f"\n2. localizing the revisits (images {n_first + 1}-{len(images)}) against the map")
    print(f"  {'query':>7}  {'best match':>10}  {'similarity':>10}  {'inliers':>7}  accepted  correct  "
          "| by similarity alone: match, accepted, correct  (ground-truth loops)")
    rows = []
    for i in range(n_first, len(images)):
        rows.append(query_row(publish(i), images, i, np.flatnonzero(gt[i, :n_first]), args.min_similarity))
        r = rows[-1]
        print(f"  {r['query']:>7}  {r['matches'][0] if r['matches'] else '-':>10}  "
              f"{r['similarity'][0] if r['similarity'] else float('nan'):>10.4f}  {r['inliers']:>7}  "
              f"{'yes' if r['accepted'] else 'no':>8}  {'yes' if r['correct'] else ('no' if r['has_loop'] else '-'):>7}"
              f"  | {r['best_by_similarity'] or '-':>7}  {'yes' if r['accepted_by_similarity'] else 'no':>3}  "
              f"{'yes' if r['correct_by_similarity'] else ('no' if r['has_loop'] else '-'):>3}  "
              f"({', '.join(r['truth']) or 'none'})")

    report = summarize(rows, latencies, n_first, args, random_weights)
    print(f"\n3. results{'  (RANDOM WEIGHTS: meaningless)' if random_weights else ''}")
    for line in report["summary"]:
        print(f"  {line}")
    shown = plot_matches(rows, images, out / "matches.png", random_weights)
    has_loop = np.array([r["has_loop"] for r in rows])
    curve = precision_recall_curve(np.array([max(r["similarity"], default=-1.0) for r in rows]),
                                   np.array([r["correct_by_similarity"] for r in rows]), has_loop)
    verified_curve = precision_recall_curve(np.array([r["verified_score"] for r in rows]),
                                            np.array([r["correct"] for r in rows]), has_loop)
    plot_pr_curve({"similarity of the best (no verification)": curve,
                   "verified score of the re-ranked best": verified_curve}, out / "precision_recall.png",
                  title="corridor revisits vs first-pass map" + (" - RANDOM WEIGHTS" if random_weights else ""))
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(dict(report, queries=rows, pr_curve=curve.to_dict(),
                                       verified_pr_curve=verified_curve.to_dict()), indent=2))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown_report(report, rows, shown, args))
    return True


def query_row(cands: np.ndarray, images: list[Path], i: int, truth: np.ndarray, min_similarity: float) -> dict:
    """One revisit query: the node's verified, re-ranked answer and the similarity-only answer to the same query."""
    predicted = [int((int(c["stamp_sec"]) * 10**9 + int(c["stamp_nanosec"]) - STAMP0_NS) // FRAME_PERIOD_NS)
                 for c in cands]
    by_sim = int(np.argmax(cands["similarity"])) if len(cands) else -1
    names = [images[j].name for j in predicted]
    score = float(cands[0]["verified_score"]) if len(cands) else float("nan")
    return {"query": images[i].name, "matches": names, "similarity": [float(c["similarity"]) for c in cands],
            "accepted": bool(len(cands) and cands[0]["accepted"]), "truth": [images[j].name for j in truth],
            "correct": bool(predicted and predicted[0] in truth), "has_loop": bool(truth.size),
            "inliers": int(cands[0]["inliers"]) if len(cands) else 0,
            "verified_score": score if np.isfinite(score) else 0.0,
            "best_by_similarity": names[by_sim] if by_sim >= 0 else None,
            "correct_by_similarity": bool(by_sim >= 0 and predicted[by_sim] in truth),
            "accepted_by_similarity": bool(by_sim >= 0 and cands[by_sim]["similarity"] >= min_similarity),
            "similarity_order": [names[k] for k in np.argsort(-cands["similarity"], kind="stable")]}


def _accepted(rows: list[dict], accepted: str, correct: str, with_loop: int) -> tuple[int, float, float]:
    """(accepted, precision, recall) of one accept rule."""
    taken = [r for r in rows if r[accepted]]
    precision = float(np.mean([r[correct] for r in taken])) if taken else float("nan")
    return len(taken), precision, sum(r[correct] for r in taken) / max(with_loop, 1)


def markdown_report(report: dict, rows: list[dict], shown: list[dict], args: argparse.Namespace) -> str:
    """``report.md``: the numbers, the per-query table and the two plots, each with what its colours and symbols
    mean and how many queries it shows."""
    with_loop = sum(r["has_loop"] for r in rows)
    lines = ["# dinomix demo: corridor revisits localized against the first-pass map", ""]
    if report["random_weights"]:
        lines += ["**RANDOM WEIGHTS: no checkpoint was given, so every score below is meaningless.** For real numbers: "
                  '`make demo ARGS="--checkpoint /path/to/dinov2_vitb14_mix.ckpt"`.', ""]
    lines += [f"The first {report['first_pass']} images were recorded as the map; each of the {len(rows)} later "
              f"images was published as a camera frame and matched by the node ({with_loop} of them revisit a place "
              "of the map according to the ground truth). Two accept rules on the same queries: *without "
              "verification* the candidate of highest similarity is accepted when it reaches "
              f"`matching.min_similarity` = {args.min_similarity}; *with verification* (the node's output) the "
              "candidates are re-ranked by their geometric verification and the best is accepted when it also has "
              "enough inliers. A match is *correct* when the ground truth marks the matched map image as the same "
              "place.", "", "## Numbers", ""]
    lines += [f"- {line}" for line in report["summary"]]
    lines += ["", "## Plots", "",
              "![best matches](matches.png)", "",
              f"`matches.png`: {len(shown)} of the {with_loop} queries that have a ground-truth loop, evenly spaced "
              "through the revisit (every query is in the table below). Top row: the query image; bottom row: its "
              "best match in the map with the similarity. Title colours: **green** = the best match is correct, "
              "**red** = it is not.", "",
              "![precision and recall](precision_recall.png)", "",
              f"`precision_recall.png`: all {len(rows)} queries. Each step curve is precision against recall when "
              "every query whose score reaches a threshold is accepted, over all thresholds: the similarity of the "
              "most similar candidate (no verification), and the verified score (inliers x inlier ratio) of the "
              "node's re-ranked best. AP in the legend is the area under each curve. Recall counts the queries that "
              "have a ground-truth loop.", "",
              f"## All {len(rows)} queries", "",
              "| query | best match (re-ranked) | similarity | inliers | accepted | correct | most similar | "
              "accepted without verification | ground-truth loops |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = r["matches"][0] if r["matches"] else "-"
        sim = f"{r['similarity'][0]:.4f}" if r["similarity"] else "-"
        correct = "yes" if r["correct"] else ("no" if r["has_loop"] else "- (no loop)")
        lines.append(f"| {r['query']} | {best} | {sim} | {r.get('inliers', 0)} | {'yes' if r['accepted'] else 'no'} "
                     f"| {correct} | {r.get('best_by_similarity') or '-'} | "
                     f"{'yes' if r.get('accepted_by_similarity') else 'no'} | {', '.join(r['truth']) or 'none'} |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict], latencies: dict[int, float], n_first: int, args: argparse.Namespace,
              random_weights: bool) -> dict:
    with_loop = [r for r in rows if r["has_loop"]]
    recall = {n: float(np.mean([any(m in r["truth"] for m in r["matches"][:n]) for r in with_loop]))
              for n in (1, 5)} if with_loop else {}
    recall_by_similarity = {n: float(np.mean([any(m in r["truth"] for m in r["similarity_order"][:n])
                                              for r in with_loop])) for n in (1, 5)} if with_loop else {}
    n_acc, precision, recall_at_thr = _accepted(rows, "accepted", "correct", len(with_loop))
    n_sim, precision_sim, recall_sim = _accepted(rows, "accepted_by_similarity", "correct_by_similarity",
                                                 len(with_loop))
    lat_ms = np.array(list(latencies.values())) * 1e3
    summary = [
        f"{len(rows)} revisit queries, {len(with_loop)} with a ground-truth loop into the map",
        f"recall@1 {recall_by_similarity.get(1, float('nan')):.3f} by similarity, "
        f"{recall.get(1, float('nan')):.3f} after re-ranking by verified score; "
        f"recall@5 {recall.get(5, float('nan')):.3f}",
        f"without verification (min_similarity {args.min_similarity}): {n_sim} accepted, precision "
        f"{precision_sim:.3f}, recall {recall_sim:.3f}",
        f"with verification (the node's output): {n_acc} accepted, precision {precision:.3f}, "
        f"recall {recall_at_thr:.3f}",
        f"latency publish -> matches received: p50 {np.percentile(lat_ms, 50):.1f} ms, "
        f"p95 {np.percentile(lat_ms, 95):.1f} ms over {lat_ms.size} images",
    ]
    return {"random_weights": random_weights, "note": "random weights: scores are meaningless" if random_weights
            else "", "first_pass": n_first, "recall": recall, "recall_by_similarity": recall_by_similarity,
            "accepted": n_acc, "precision": precision, "recall_at_threshold": recall_at_thr,
            "without_verification": {"accepted": n_sim, "precision": precision_sim, "recall": recall_sim},
            "min_similarity": args.min_similarity,
            "latency_ms": {"p50": float(np.percentile(lat_ms, 50)), "p95": float(np.percentile(lat_ms, 95))},
            "summary": summary}


def image_message(path: Path, stamp: int) -> Any:
    """The JPEG as a bgr8 sensor_msgs/Image, as a camera driver would publish it."""
    import cv2
    from sensor_msgs.msg import Image

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    msg = Image(height=bgr.shape[0], width=bgr.shape[1], encoding="bgr8", is_bigendian=0, step=bgr.shape[1] * 3)
    msg.data = bgr.tobytes()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    msg.header.frame_id = "camera_optical_frame"
    return msg


def plot_matches(rows: list[dict], images: list[Path], path: Path, random_weights: bool, n: int = 8) -> list[dict]:
    """Query images (top) above their best match in the map (bottom), titled green when correct, red when not.

    Returns:
        The rows shown: up to ``n`` of the queries with a ground-truth loop, evenly spaced.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image

    by_name = {p.name: p for p in images}
    looped = [r for r in rows if r["has_loop"]]
    picked = looped[:: max(1, len(looped) // n)][:n]
    if not picked:
        return []
    fig = Figure(figsize=(2.2 * max(len(picked), 4), 5.0))
    FigureCanvasAgg(fig)
    for k, r in enumerate(picked):
        top, bottom = fig.add_subplot(2, len(picked), k + 1), fig.add_subplot(2, len(picked), len(picked) + k + 1)
        top.imshow(Image.open(by_name[r["query"]]))
        top.set_title(f"query {r['query']}", fontsize=8)
        if r["matches"]:
            bottom.imshow(Image.open(by_name[r["matches"][0]]))
            bottom.set_title(f"map {r['matches'][0]}  sim {r['similarity'][0]:.3f}", fontsize=8,
                             color="green" if r["correct"] else "red")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"best match of {len(picked)} of the {len(looped)} revisit queries with a ground-truth loop "
                 "(evenly spaced)" + (" - RANDOM WEIGHTS: meaningless" if random_weights else ""), fontsize=10)
    fig.legend(handles=[Patch(color="green", label="best match correct (a ground-truth loop)"),
                        Patch(color="red", label="best match wrong")], loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return picked


def rmw_available(rmw: str) -> bool:
    """Whether the ROS middleware ``rmw`` is installed: as a Python package dir (PyPI wheels) or in the ament index."""
    import importlib.util

    if importlib.util.find_spec(rmw) is not None:
        return True
    try:
        from ament_index_python.packages import get_package_prefix

        get_package_prefix(rmw)
        return True
    except Exception:  # no ament index, or the package is not in it
        return False


def banner(random_weights: bool) -> None:
    if random_weights:
        line = "=" * 100
        print(f"{line}\nRANDOM WEIGHTS: no checkpoint given, so the model has seeded random weights. The pipeline runs "
              "end to end,\nbut similarity scores carry no place information: recall and precision below are "
              "MEANINGLESS.\nFor real numbers: make demo ARGS=\"--checkpoint /path/to/dinov2_vitb14_mix.ckpt\"\n"
              f"{line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
