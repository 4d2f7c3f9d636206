"""Benchmark data-parallel training: 2 CPU ranks (torchrun, gloo on 127.0.0.1) vs 1 rank on the same global batch.

Data and model: bench_train.py's LLaVA-like length mix (`--n` samples, max_len `--max-len`, packed) and the tiny CLIP
tower with a random Llama LM of `--hidden` x `--layers`, stage 2. Every run is `jobs/train.py` on the same config
(`--rows-per-step` packed rows per optimizer step, `--steps` steps, same seed), so each trains on the same global
batches; they differ only in how a step is computed:

    1 rank, 1 thread     python jobs/train.py            OMP_NUM_THREADS=1
    1 rank, 2 threads    python jobs/train.py            OMP_NUM_THREADS=2 (torch's intra-op threads)
    2 ranks              torchrun --nproc_per_node 2     1 thread each (torchrun's default), rows rank::2 each

Throughput from each run's log.jsonl (one line a step): useful (non-pad) tokens and samples over the summed step
times, the first `--warmup` steps left out. The runs go one after another, `--rounds` times in turn (the order
rotating), so load from other processes on the machine falls on all of them; the best round of each is reported.
The 2-rank losses are checked against the 1-rank ones (same global batches: same losses within float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import make_models, make_shard  # noqa: E402
from curation.fixtures.serve import free_port  # noqa: E402

RUNS = {  # name: (processes, threads per process)
    "1 rank, 1 thread": (1, 1),
    "1 rank, 2 threads": (1, 2),
    "2 ranks": (2, 1),
}


def run(name: str, cfg: dict, out: Path) -> dict:
    """One jobs/train.py run of `cfg` into `out`; its log lines and wall time."""
    procs, threads = RUNS[name]
    path = out.with_suffix(".json")
    path.write_text(json.dumps({**cfg, "out": str(out)}))
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), str(path)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={free_port()}", str(ROOT / "jobs" / "train.py"), str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return {
        "log": [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()],
        "wall_s": time.perf_counter() - t0,
    }


def throughput(log: list[dict], warmup: int) -> dict:
    """Useful tokens/s and samples/s over the steps after `warmup` (log_every 1: steps_per_s = 1 / step time)."""
    recs = log[warmup:]
    secs = sum(1 / r["steps_per_s"] for r in recs)
    return {
        "useful_tokens_per_s": sum(r["useful_tokens_per_s"] / r["steps_per_s"] for r in recs) / secs,
        "samples_per_s": sum(r["samples_per_s"] / r["steps_per_s"] for r in recs) / secs,
        "step_s": secs / len(recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="samples")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rows-per-step", type=int, default=8, help="global packed rows per optimizer step")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the throughput")
    ap.add_argument("--hidden", type=int, default=128, help="LM hidden size")
    ap.add_argument("--layers", type=int, default=4, help="LM layers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print compact JSON on one line")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_models(root / "models", args.hidden, args.layers)
        shard = make_shard(root / "data" / "part-00000.parquet", args.n)
        cfg = {
            "stage": 2,
            "shards": [str(shard)],
            "vision": str(dirs["vision"]),
            "lm": str(dirs["lm"]),
            "max_len": args.max_len,
            "rows_per_step": args.rows_per_step,
            "max_steps": args.steps,
            "log_every": 1,
            "checkpoint_every": 10**6,
            "lr": 1e-4,
            "seed": 0,
        }
        names = list(RUNS)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for k in range(args.rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                got = run(name, cfg, root / f"r{k}-{name.replace(' ', '').replace(',', '-')}")
                results[name].append(
                    {**throughput(got["log"], args.warmup), "wall_s": got["wall_s"], "log": got["log"]}
                )
    best = {n: max(rs, key=lambda r: r["useful_tokens_per_s"]) for n, rs in results.items()}
    ref, two = best["1 rank, 1 thread"]["log"], best["2 ranks"]["log"]
    loss_rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, two))
    report = {
        "cpu_count": os.cpu_count(),
        "settings": {k: getattr(args, k) for k in ("n", "max_len", "rows_per_step", "steps", "hidden", "layers")},
        "runs": {
            n: {k: round(v, 2) for k, v in r.items() if k != "log"}
            | {"rounds": [round(x["useful_tokens_per_s"], 1) for x in results[n]]}
            for n, r in best.items()
        },
        "ratio_2ranks_vs_1rank_1thread": round(
            best["2 ranks"]["useful_tokens_per_s"] / best["1 rank, 1 thread"]["useful_tokens_per_s"], 3
        ),
        "ratio_2ranks_vs_1rank_2threads": round(
            best["2 ranks"]["useful_tokens_per_s"] / best["1 rank, 2 threads"]["useful_tokens_per_s"], 3
        ),
        "max_loss_rel_diff_2ranks_vs_1rank": loss_rel,
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
