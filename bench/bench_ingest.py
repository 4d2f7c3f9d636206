"""Ingest through the DAG vs. the img2dataset CLI alone, on the same loopback corpus, side by side.

python bench/bench_ingest.py [--n 5000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback only
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMON = {"image_size": 256, "resize_mode": "keep_ratio_largest", "thread_count": 64, "shard": 1000}


def img2dataset_cli(urls: Path, out: Path) -> tuple[float, int, float]:
    """The baseline: img2dataset's own CLI with its multiprocessing distributor on both cores."""
    cmd = [
        str(BIN / "img2dataset"),
        "--url_list",
        str(urls),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "parquet",
        "--output_folder",
        str(out),
        "--processes_count",
        "2",
        "--thread_count",
        str(COMMON["thread_count"]),
        "--image_size",
        str(COMMON["image_size"]),
        "--resize_mode",
        COMMON["resize_mode"],
        "--resize_only_if_bigger",
        "True",
        "--number_sample_per_shard",
        str(COMMON["shard"]),
        "--timeout",
        "10",
        "--enable_wandb",
        "False",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out.parent)
    secs = time.perf_counter() - t
    ok = sum(
        pq.read_table(f, columns=["status"]).column("status").to_pylist().count("success")
        for f in out.glob("*.parquet")
    )
    stats = [json.loads(f.read_text()) for f in out.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)  # its shards' download span
    return secs, ok, span


def dag_ingest(urls: Path, out: Path) -> tuple[float, int, float]:
    """Ours: `curate run` of a one-stage DAG (Ray start-up included), a fixed pool of Ray actors, one part per call."""
    pipe = out.parent / f"{out.name}.yaml"
    pipe.write_text(
        json.dumps(
            {
                "name": "bench",
                "stages": {
                    "ingest": {
                        "op": "ingest",
                        "params": {
                            "urls": str(urls),
                            "shard_size": COMMON["shard"],
                            "image_size": COMMON["image_size"],
                            "resize_mode": COMMON["resize_mode"],
                            "thread_count": COMMON["thread_count"],
                            "allow_loopback": True,
                        },
                    }
                },
            }
        )
    )
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-b-")}
    t = time.perf_counter()
    subprocess.run(
        [str(BIN / "curate"), "run", str(pipe), "--run-dir", str(out)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    secs = time.perf_counter() - t
    m = json.loads((out / "ingest" / "_manifest.json").read_text())
    from curation.engine.store import StageDir

    parts = [StageDir(out, "ingest").done(p) for p in m["parts"]]
    span = max(p["started"] + p["seconds"] for p in parts) - min(
        p["started"] for p in parts
    )  # first part start to last end
    return secs, m["counts"]["out"], span


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shard", type=int, default=COMMON["shard"], help="URLs per shard, the same for both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    COMMON["shard"] = args.shard
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    make_web(work / "web", n=args.n, port=free_port(), seed=7)
    urls = work / "web" / "urls.parquet"
    base, ours, span, stage = [], [], [], []
    with WebServer(work / "web"):
        img2dataset_cli(urls, work / "warmup")  # spends the flaky URL's 503 and warms the page cache
        for r in range(args.rounds):  # alternate, so drift in the machine hits both alike
            s, ok_b, sp = img2dataset_cli(urls, work / f"i2d-{r}")
            base.append(s)
            span.append(sp)
            s, ok_o, st = dag_ingest(urls, work / f"dag-{r}")
            ours.append(s)
            stage.append(st)
    shutil.rmtree(work, ignore_errors=True)
    res = {
        "n": args.n,
        "rounds": args.rounds,
        "img2dataset_s": round(min(base), 2),
        "img2dataset_img_per_s": round(ok_b / min(base), 1),
        "dag_s": round(min(ours), 2),
        "dag_img_per_s": round(ok_o / min(ours), 1),
        "dag_span_s": round(min(stage), 2),
        "img2dataset_span_s": round(min(span), 2),
        "steady_ratio": round((ok_o / min(stage)) / (ok_b / min(span)), 3),
        "ok_img2dataset": ok_b,
        "ok_dag": ok_o,
        "ratio": round((ok_o / min(ours)) / (ok_b / min(base)), 3),
    }
    res["shard"] = args.shard
    if args.json:
        print(json.dumps(res))
    else:
        print("| figure | ours (DAG) | img2dataset CLI | ratio | goal |\n|---|---|---|---|---|")
        print(
            f"| ingest {args.n} URLs, img/s (wall, incl. start-up) | {res['dag_img_per_s']} | "
            f"{res['img2dataset_img_per_s']} "
            f"| {res['ratio']}x | >= 0.9x |"
        )
        print(
            f"| same, once running (first shard start to last shard end, both) | {round(ok_o / min(stage), 1)} "
            f"| {round(ok_b / min(span), 1)} | {res['steady_ratio']}x | >= 0.9x |"
        )
        print(f"\nsuccesses {ok_o} vs {ok_b}; best of {args.rounds} alternating rounds")


if __name__ == "__main__":
    main()
