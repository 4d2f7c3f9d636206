"""The whole demo DAG end to end on a fixture web of N URLs: per stage wall time, img/s and bytes written, the run
dir's size against ingest's output (one copy of each image), and the peak RSS of the driver and of the Ray workers.

    python bench/bench_e2e.py --n 20000 [--out bench/out/e2e] [--json]
    python bench/bench_e2e.py --series 10000,30000,100000 [--nodes 10 --cores 32 --gpus 8]

The tiny CLIP and the rules backend, as `curate demo` runs them; the web is served on 127.0.0.1. `--series` runs each
size in its own process (so each peak RSS is its own), shows how each stage's time grows with N (the exponent b of
t ~ N^b between the smallest and largest size: 1 is linear), and estimates 10M images on a cluster with the real
models (bench/cluster_estimate.py: the rates assumed and their sources).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class WorkerRSS:
    """Samples the largest resident set of any Ray worker process (`ray::` in its title) while it runs."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if b"ray::" in (proc / "cmdline").read_bytes():
                        self.peak = max(self.peak, int((proc / "statm").read_text().split()[1]) * page)
                except (OSError, ValueError, IndexError):
                    pass  # the process ended meanwhile
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(n: int, out: Path) -> dict:
    from curation.engine.config import load_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.demo import demo_overrides
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    shutil.rmtree(out, ignore_errors=True)
    web = out / "web"
    t0 = time.time()
    make_web(web, n=n, port=free_port(), seed=0)
    overrides = demo_overrides(out, web)
    web_s = time.time() - t0
    t0 = time.time()
    with WebServer(web), WorkerRSS() as workers:
        manifests = run_pipeline(load_pipeline("demo", overrides), out / "run")
    wall = time.time() - t0
    stages = {
        name: {
            "in": m["counts"]["in"],
            "out": m["counts"]["out"],
            "op": m["op"],
            "seconds": m["timings"]["total_s"],
            "aggregate_s": m["timings"].get("aggregate_s", 0.0),
            "img_per_s": round(m["counts"]["in"] / m["timings"]["total_s"], 1) if m["timings"]["total_s"] else None,
            "bytes": m["bytes_written"]["all"],
            "bytes_per_row_in": round(m["bytes_written"]["all"] / max(m["counts"]["in"], 1), 1),
        }
        for name, m in manifests.items()
    }
    ingest = manifests["ingest"]["bytes_written"]["all"]
    total = sum(s["bytes"] for s in stages.values())
    return {
        "n": n,
        "web_and_assets_s": round(web_s, 1),
        "wall_s": round(wall, 1),
        "stages": stages,
        "ingest_bytes": ingest,
        "run_dir_bytes": total,
        "run_dir_over_ingest": round(total / ingest, 3),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mib": round(workers.peak / 2**20, 1),
    }


def series(sizes: list[int], out: Path, nodes: int, cores: int, gpus: int) -> None:
    from cluster_estimate import estimate, faiss_rate

    runs = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--n", str(n), "--out", str(out / f"n{n}"), "--json"]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        shutil.rmtree(out / f"n{n}", ignore_errors=True)  # 100,000 URLs: ~1 GB of web and ~1 GB of run dir
    (out / "series.json").write_text(json.dumps(runs, indent=1))
    lo, hi = runs[0], runs[-1]
    heads = " | ".join(f"s at {r['n']:,}" for r in runs) + " | " + " | ".join(f"B/row at {r['n']:,}" for r in runs)
    print(f"| stage | {heads} | b (t ~ N^b) |\n|---|" + "---|" * (2 * len(runs) + 1))
    for name in hi["stages"]:
        t = [r["stages"][name]["seconds"] for r in runs]
        b = [r["stages"][name]["bytes_per_row_in"] for r in runs]
        exp = math.log(t[-1] / t[0]) / math.log(hi["n"] / lo["n"])
        print(f"| {name} | " + " | ".join(f"{x:,.1f}" for x in t + b) + f" | {exp:.2f} |")
    for key in ("wall_s", "run_dir_over_ingest", "driver_peak_rss_mib", "worker_peak_rss_mib"):
        print(f"| {key} | " + " | ".join(str(r[key]) for r in runs) + " |")
    match = faiss_rate()
    print(f"\n10M URLs on {nodes} nodes x {cores} cores and {gpus} A100s, real models (from the {hi['n']:,}-URL run):")
    print("| stage | items | rate assumed | per | source | serial s | hours |\n|---|---|---|---|---|---|---|")
    rows = estimate(hi, os.cpu_count() or 1, 10_000_000, nodes, cores, gpus, match)
    sources = list(dict.fromkeys(r["source"] for r in rows))
    for r in rows:
        print(
            f"| {r['stage']} | {r['items']:,} | {r['rate']:,.1f} | {r['unit']} | [{sources.index(r['source']) + 1}] | "
            f"{r['serial_s']:,.0f} | {r['hours']:,.2f} |"
        )
    print(f"| total (stages one after another) | | | | | | {sum(r['hours'] for r in rows):,.1f} |\n")
    for k, src in enumerate(sources, 1):
        print(f"[{k}] {src}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/e2e"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--series", help="comma-separated sizes, each in its own process, then the cluster estimate")
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--cores", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    if args.series:
        series([int(x) for x in args.series.split(",")], args.out, args.nodes, args.cores, args.gpus)
        return
    res = run(args.n, args.out)
    if args.json:
        print(json.dumps(res))
        return
    print(f"demo DAG, {args.n:,} URLs: {res['wall_s']} s (web + assets {res['web_and_assets_s']} s)")
    print("| stage | in | out | s | img/s | MB written | bytes per row in |\n|---|---|---|---|---|---|---|")
    for name, s in res["stages"].items():
        print(
            f"| {name} | {s['in']:,} | {s['out']:,} | {s['seconds']} | {s['img_per_s']} | "
            f"{s['bytes'] / 1e6:.2f} | {s['bytes_per_row_in']:,} |"
        )
    print(
        f"run dir {res['run_dir_bytes'] / 1e6:.1f} MB = {res['run_dir_over_ingest']}x ingest's "
        f"{res['ingest_bytes'] / 1e6:.1f} MB; peak RSS driver {res['driver_peak_rss_mib']} MiB, "
        f"largest worker {res['worker_peak_rss_mib']} MiB"
    )


if __name__ == "__main__":
    main()
