#!/usr/bin/env python3
"""City-scale maps on one robot: build, ready time, RAM, query latency and recall of ``ivfpq_mmap`` against exact.

Prints ONE JSON object on stdout (progress on stderr). Steps (each measured in a fresh process where it matters):

1. ``data``: a synthetic city of N 4096-d descriptors written as a float16 ``.npy`` in blocks, with a geotag CSV, plus
   query descriptors. Clustered like place descriptors, not uniform noise: streets of 10 places (a random walk in a
   384-d latent space embedded in 4096-d with a decaying spectrum and a shared mean, so neighbouring places along a
   street look alike: the hard negatives), each place seen 4 times with noise; N / 40 streets (25,000 at 1M). Queries
   are fresh views of random places (so each has ground-truth place and its exact nearest neighbours). The RTAB-Map
   corridor's real images are described by the package's Encoder (ViT-S, seeded random weights): images 1-40 are map
   rows, the 44 revisits (41-84) are queries.
2. ``build``: ``dinomix map import`` through its API (the .npy streamed in blocks, index ``auto``): time, peak RSS.
3. ``ready``: a fresh process (page cache dropped first with ``--drop-caches``, root only) loads the map (content
   check in the background), opens its stored index and answers the first query: process start -> first answer;
   then every query (p50/p95), the background check's duration, and a sweep of search parameters.
4. ``exact``: the exact index where it fits in RAM (else the refusal, with its estimate), its ready time and query
   p50/p95; exact top-5 of every query (streamed from the map in blocks when the index does not fit) as the reference
   for recall@1 (approximate top-1 == exact top-1) and recall@5 (overlap of the top-5 sets).

Peak RSS "beyond the page cache" is the peak of RssAnon (sampled every 20 ms from /proc/self/status); VmHWM, which
also counts the memory-mapped map's resident pages, is reported beside it.

Example::

    .venv/bin/python bench/bench_scale.py --n 100000 --work /work/bench_data/scale > runs/scale_100k.json
    .venv/bin/python bench/bench_scale.py --n 1000000 --work /work/bench_data/scale --drop-caches > runs/scale_1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 4096
LATENT = 384
PLACES_PER_STREET, VIEWS = 10, 4
CORRIDOR = REPO / "test" / "data" / "rtabmap_corridor"


def log(msg: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- RSS sampling


class RssSampler:
    """Peak RssAnon / RssFile / VmHWM of this process, sampled in a thread."""

    def __init__(self, period_s: float = 0.02) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(period_s)

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {f"peak_{k}_gb": round(v / 1e9, 3) for k, v in self.peak.items()}


# ---------------------------------------------------------------------------------------------------- data


def _basis(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    spectrum = (np.arange(LATENT) + 1.0) ** -0.5
    basis = rng.standard_normal((LATENT, DIM), dtype=np.float32) / np.sqrt(DIM)
    basis *= (spectrum / np.sqrt((spectrum ** 2).sum()) * np.sqrt(LATENT)).astype(np.float32)[:, None]
    mean = rng.standard_normal(DIM).astype(np.float32)
    return basis, mean / np.linalg.norm(mean)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _views(z: np.ndarray, rng: np.random.Generator, basis: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Unit 4096-d views of latent places ``z`` (one row per row of z)."""
    x = _unit((z + rng.standard_normal(z.shape) * 0.8).astype(np.float32) @ basis)
    x += 0.3 * mean + 0.4 * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(DIM)
    return _unit(x)


def make_data(work: Path, n: int, nq: int, seed: int) -> dict[str, Any]:
    """Write desc.npy (float16), geo.csv, queries.npy, queries_place.npy, place.npy under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    if (work / "meta.json").is_file():
        return json.loads((work / "meta.json").read_text())
    t0 = time.perf_counter()
    corridor, corridor_q = _corridor_descriptors()
    n_synth = n - corridor.shape[0]
    per_street = PLACES_PER_STREET * VIEWS
    streets = -(-n_synth // per_street)
    basis, mean = _basis(seed)
    desc = np.lib.format.open_memmap(work / "desc.npy.tmp", mode="w+", dtype=np.float16, shape=(n, DIM))
    place = np.empty(n, dtype=np.int64)
    rng_q = np.random.default_rng([seed, 1])
    q_places = np.sort(rng_q.choice(n_synth // VIEWS, size=nq, replace=False))
    queries = np.empty((nq + corridor_q.shape[0], DIM), dtype=np.float32)
    q_place = np.full(nq + corridor_q.shape[0], -1, dtype=np.int64)
    rng_geo = np.random.default_rng([seed, 2])
    origin = rng_geo.uniform(0, 20000, (streets, 2))
    heading = rng_geo.uniform(0, 2 * np.pi, streets)
    csv = open(work / "geo.csv.tmp", "w")
    csv.write("image,lat,lon\n")
    row, qi, block_streets = 0, 0, 500
    for s0 in range(0, streets, block_streets):
        rng = np.random.default_rng([seed, 3, s0])
        s1 = min(streets, s0 + block_streets)
        z0 = rng.standard_normal((s1 - s0, 1, LATENT))
        steps = rng.standard_normal((s1 - s0, PLACES_PER_STREET, LATENT)) * 0.8
        steps[:, 0] = 0
        z = (z0 + np.cumsum(steps, axis=1)).reshape(-1, LATENT).astype(np.float32)  # places of these streets
        x = _views(np.repeat(z, VIEWS, axis=0), rng, basis, mean)
        take = min(x.shape[0], n_synth - row)
        desc[row:row + take] = x[:take]
        first_place = s0 * PLACES_PER_STREET
        place[row:row + take] = first_place + np.arange(take) // VIEWS
        in_block = q_places[(q_places >= first_place) & (q_places < s1 * PLACES_PER_STREET)]
        if in_block.size:
            queries[qi:qi + in_block.size] = _views(z[in_block - first_place], rng, basis, mean)
            q_place[qi:qi + in_block.size] = in_block
            qi += in_block.size
        p = first_place + np.arange(take) // VIEWS
        street = p // PLACES_PER_STREET
        along = (p % PLACES_PER_STREET) * 10.0 + rng.uniform(-2, 2, take)
        xy = origin[street] + along[:, None] * np.stack([np.cos(heading[street]), np.sin(heading[street])], axis=1)
        lat = 55.6 + xy[:, 1] / 111320.0
        lon = 13.0 + xy[:, 0] / (111320.0 * np.cos(np.radians(55.7)))
        csv.write("".join(f"s{pp // PLACES_PER_STREET}_p{pp % PLACES_PER_STREET}_v{(row + i) % VIEWS}_{row + i}.jpg,"
                          f"{a:.7f},{b:.7f}\n" for i, (pp, a, b) in enumerate(zip(p, lat, lon))))
        row += take
        if s0 % (block_streets * 10) == 0:
            log(f"data: {row} / {n_synth} synthetic rows")
    desc[row:] = corridor
    place[row:] = -1
    for i in range(corridor.shape[0]):
        csv.write(f"corridor_{i + 1}.jpg,{55.58 - i * 1e-5:.7f},{12.99:.7f}\n")
    csv.close()
    queries[qi:qi + corridor_q.shape[0]] = corridor_q
    queries, q_place = queries[:qi + corridor_q.shape[0]], q_place[:qi + corridor_q.shape[0]]
    desc.flush()
    del desc
    os.replace(work / "desc.npy.tmp", work / "desc.npy")
    os.replace(work / "geo.csv.tmp", work / "geo.csv")
    np.save(work / "queries.npy", queries)
    np.save(work / "queries_place.npy", q_place)
    np.save(work / "place.npy", place)
    fp = _fingerprint()
    (work / "fingerprint.json").write_text(json.dumps(fp))
    meta = {"n": n, "synthetic_rows": n_synth, "corridor_rows": int(corridor.shape[0]), "streets": int(streets),
            "queries": int(queries.shape[0]), "corridor_queries": int(corridor_q.shape[0]),
            "seconds": round(time.perf_counter() - t0, 1), "fingerprint": fp["id"]}
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


def _encoder() -> Any:
    from dinomix_ros.model import random_model
    from dinomix_ros.model.encoder import Encoder, EncoderConfig

    return Encoder(random_model("vits14", seed=0), EncoderConfig(device="cpu", dtype="float32"))


def _fingerprint() -> dict[str, Any]:
    from dinomix_ros.model import random_model

    return random_model("vits14", seed=0).fingerprint.to_dict()


def _corridor_descriptors() -> tuple[np.ndarray, np.ndarray]:
    """Corridor images 1-40 (map rows) and 41-84 (queries), described with random ViT-S weights."""
    paths = [CORRIDOR / "samples" / f"{i}.jpg" for i in range(1, 85)]
    desc = _encoder().describe(paths, progress=False).astype(np.float32)
    return desc[:40], desc[40:]


# ---------------------------------------------------------------------------------------------------- phases (children)


def phase_build(work: Path, index: str) -> dict[str, Any]:
    from dinomix_ros.maps.build_import import import_descriptors
    from dinomix_ros.maps.index import index_for_map, save_map_with_index

    sampler = RssSampler()
    out = work / f"map-{index}.dinomap"
    t0 = time.perf_counter()
    fp = json.loads((work / "fingerprint.json").read_text())
    kmap, report = import_descriptors(out, work / "desc.npy", work / "geo.csv", fp, metadata={"name": "bench"})
    t1 = time.perf_counter()
    built = index_for_map(kmap, index, "cpu", memory_limit_bytes=8 * 10**9)
    t2 = time.perf_counter()
    save_map_with_index(kmap, out, built)
    t3 = time.perf_counter()
    return {"import_s": round(t1 - t0, 1), "import_report": report.to_dict(), "index_s": round(t2 - t1, 1),
            "index_save_s": round(t3 - t2, 1), "build_total_s": round(t3 - t0, 1), "index": built.kind,
            "index_describe": built.describe(), **sampler.stop(), "map": str(out)}


def phase_query(work: Path, map_path: Path, index: str, spawn_time: float, sweep: bool,
                limit: int) -> dict[str, Any]:
    """Fresh process: load, first answer, all queries, background check; writes top-5 rows to <map>.top5.npy."""
    t_import = time.time()
    sampler = RssSampler()
    from dinomix_ros.maps.index import index_for_map
    from dinomix_ros.maps.loading import load_map

    queries = np.load(work / "queries.npy", mmap_mode="r")
    t0 = time.time()
    verify = "background"
    try:
        kmap = load_map(map_path, verify=verify)
        t_loaded = time.time()
        built = index_for_map(kmap, index, "cpu", memory_limit_bytes=limit)
    except Exception as exc:  # the RAM check refusing an exact index that does not fit
        return {"refused": f"{type(exc).__name__}: {exc}", **sampler.stop()}
    t_index = time.time()
    q0 = np.asarray(queries[0], dtype=np.float32)
    built.search(q0, 5)
    t_first = time.time()
    top5 = np.full((queries.shape[0], 5), -1, np.int64)
    ms = []
    for i in range(queries.shape[0]):
        q = np.asarray(queries[i], dtype=np.float32)
        t = time.perf_counter()
        _, rows = built.search(q, 5)
        ms.append((time.perf_counter() - t) * 1e3)
        top5[i] = rows[0]
    np.save(str(map_path) + f".{index}.top5.npy", top5)
    out = {"index": built.kind, "process_start_to_first_answer_s": round(t_first - spawn_time, 2),
           "imports_s": round(t0 - t_import, 2), "load_s": round(t_loaded - t0, 2),
           "index_open_s": round(t_index - t_loaded, 2), "first_query_ms": round((t_first - t_index) * 1e3, 1),
           "query_p50_ms": round(float(np.percentile(ms, 50)), 2),
           "query_p95_ms": round(float(np.percentile(ms, 95)), 2), "queries": len(ms),
           "index_describe": built.describe()}
    if kmap.integrity is not None:
        kmap.integrity.wait()
        out["background_check"] = kmap.integrity.describe()
        out["background_check_done_after_s"] = round(time.time() - spawn_time, 1)
    if sweep and hasattr(built, "params"):
        out["sweep"] = _sweep(built, queries, work, map_path)
    out.update(sampler.stop())
    return out


def _sweep(built: Any, queries: np.ndarray, work: Path, map_path: Path) -> list[dict[str, Any]]:
    """Search parameters against the exact top-5 (when already computed): p50 and recall per setting."""
    from dataclasses import replace

    exact_file = Path(str(map_path) + ".reference.top5.npy")
    ref = np.load(exact_file) if exact_file.is_file() else None
    rows = []
    base = built.params
    nlist = int(built.describe()["params"]["nlist"])
    for share in (0.02, 0.04, 0.08, 0.1, 0.15):
        nprobe = max(1, round(share * nlist))
        for shortlist in (64, 128):
            built.params = replace(base, nprobe=nprobe, shortlist=shortlist)
            top, ms = [], []
            for i in range(min(queries.shape[0], 400)):
                t = time.perf_counter()
                _, r = built.search(np.asarray(queries[i], dtype=np.float32), 5)
                ms.append((time.perf_counter() - t) * 1e3)
                top.append(r[0])
            top = np.array(top)
            entry = {"nprobe": nprobe, "lists_share": share, "shortlist": shortlist,
                     "p50_ms": round(float(np.percentile(ms, 50)), 2)}
            if ref is not None:
                entry.update(_recall(top, ref[:len(top)]))
            rows.append(entry)
    built.params = base
    return rows


def _recall(top: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    r1 = float(np.mean(top[:, 0] == ref[:, 0]))
    r5 = float(np.mean([len(set(a[:5]) & set(b[:5])) / 5 for a, b in zip(top, ref)]))
    return {"recall1_vs_exact": round(r1, 4), "recall5_vs_exact": round(r5, 4)}


def phase_exact_reference(work: Path, map_path: Path) -> dict[str, Any]:
    """Exact top-5 of every query by a streamed scan of the map (float32 of the stored float16), in blocks."""
    from dinomix_ros.maps.loading import load_map

    sampler = RssSampler()
    kmap = load_map(map_path, verify=False)
    queries = np.ascontiguousarray(np.load(work / "queries.npy"), dtype=np.float32)
    best_s = np.full((queries.shape[0], 5), -np.inf, np.float32)
    best_r = np.full((queries.shape[0], 5), -1, np.int64)
    t0 = time.perf_counter()
    block = 65536
    for start in range(0, len(kmap), block):
        rows = np.arange(start, min(start + block, len(kmap)))
        s = queries @ kmap.descriptor_rows(rows).astype(np.float32).T
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_r = np.concatenate([best_r, np.broadcast_to(rows, s.shape)], axis=1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :5]
        best_s, best_r = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_r, top, 1)
    np.save(str(map_path) + ".reference.top5.npy", best_r)
    return {"streamed_exact_scan_s": round(time.perf_counter() - t0, 1), "queries": int(queries.shape[0]),
            **sampler.stop()}


# ---------------------------------------------------------------------------------------------------- driver


def child(args: list[str], timeout: float = 7200) -> dict[str, Any]:
    spawn = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.run([sys.executable, __file__, "--phase", *args, "--spawn-time", repr(spawn)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError as exc:
        log(f"page cache not dropped ({exc})")
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100000, help="map keyframes")
    p.add_argument("--queries", type=int, default=500, help="synthetic queries (plus the 44 corridor revisits)")
    p.add_argument("--work", type=Path, default=Path("/work/bench_data/scale"), help="data folder (not the repo)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each ready measurement")
    p.add_argument("--no-sweep", action="store_true", help="skip the search-parameter sweep")
    p.add_argument("--memory-limit-gb", type=float, default=8.0,
                   help="RAM an index may take (index_for_map's check; other people share this machine)")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--spawn-time", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        name, rest = args.phase[0], args.phase[1:]
        work = Path(rest[0])
        if name == "build":
            result = phase_build(work, rest[1])
        elif name == "query":
            result = phase_query(work, Path(rest[1]), rest[2], args.spawn_time, rest[3] == "sweep",
                                 int(float(rest[4]) * 1e9))
        else:
            result = phase_exact_reference(work, Path(rest[1]))
        print(json.dumps(result))
        return 0

    work = args.work / str(args.n)
    result: dict[str, Any] = {"benchmark": "dinomix_ros city-scale map", "n": args.n, "dim": DIM,
                              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    log(f"data ({args.n} rows) in {work}")
    result["data"] = make_data(work, args.n, args.queries, args.seed)
    log("build: import + ivfpq_mmap index")
    built = work / "build.json"
    if built.is_file() and (Path(json.loads(built.read_text())["map"]) / "manifest.json").is_file():
        result["build"] = {**json.loads(built.read_text()), "reused": True}  # measured by an earlier run
    else:
        result["build"] = child(["build", str(work), "auto"])
        built.write_text(json.dumps(result["build"]))
    map_path = Path(result["build"]["map"])
    log("exact reference (streamed)")
    if Path(str(map_path) + ".reference.top5.npy").is_file() and (work / "reference.json").is_file():
        result["exact_reference"] = {**json.loads((work / "reference.json").read_text()), "reused": True}
    else:
        result["exact_reference"] = child(["exact_ref", str(work), str(map_path)])
        (work / "reference.json").write_text(json.dumps(result["exact_reference"]))
    ref = np.load(str(map_path) + ".reference.top5.npy")
    q_place = np.load(work / "queries_place.npy")
    place = np.load(work / "place.npy")
    synthetic = q_place >= 0
    result["exact_place_recall1"] = round(float(np.mean(place[ref[synthetic, 0]] == q_place[synthetic])), 4)
    for index in ("ivfpq_mmap", "exact"):
        result["page_cache_dropped"] = drop_caches() if args.drop_caches else False
        log(f"ready + queries: {index}")
        r = child(["query", str(work), str(map_path), index, "nosweep" if args.no_sweep or index == "exact" else
                   "sweep", str(args.memory_limit_gb)])
        top_file = Path(str(map_path) + f".{index}.top5.npy")
        if top_file.is_file() and "refused" not in r:
            top = np.load(top_file)
            r.update(_recall(top, ref))
            r["corridor_" + "recall1_vs_exact"] = round(float(np.mean(top[~synthetic, 0] == ref[~synthetic, 0])), 4)
            r["place_recall1"] = round(float(np.mean(place[top[synthetic, 0]] == q_place[synthetic])), 4)
        result[index] = r
    result["load_average_end"] = os.getloadavg()
    result["disk_bytes"] = sum(f.stat().st_size for f in map_path.iterdir() if f.is_file())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
