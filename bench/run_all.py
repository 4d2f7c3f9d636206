"""`make bench`: every benchmark in bench/ at a size that fits in ~15 minutes on 2 cores, printed as one table.

    python bench/run_all.py [--write] [--only ingest,pack,...]

Each script runs in its own process with `--json`; every row is a figure of ours next to the baseline run
side by side in that script, the ratio, and the goal of the issue that set it. `--write` puts the table,
with the date and the machine, at the top of bench/RESULTS.md (between the two marker comments).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# bench/ is on sys.path when this script runs
from figures import (
    Row,
    anyres,
    balance,
    build_packed,
    ddp,
    e2e,
    embed,
    ingest,
    match,
    near_dup,
    openai,
    pack,
    sources,
    train,
)
from figures_quality import concepts, decontaminate, dedup_truth, learning, learning_balance, semdedup

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


@dataclass
class Bench:
    name: str
    args: list[str]
    rows: Callable[[list[dict]], list[Row]]
    smoke: list[str]  # tiny sizes: checks the wiring in a test, figures meaningless
    script: str = ""

    def path(self) -> Path:
        return ROOT / "bench" / (self.script or f"bench_{self.name}.py")


BENCHES = [
    Bench(
        "ingest",
        ["--n", "2000", "--rounds", "1", "--shard", "250"],
        ingest,
        ["--n", "100", "--rounds", "1", "--shard", "50"],
    ),
    Bench("near_dup", ["--n", "1000000", "--sample", "20000"], near_dup, ["--n", "20000", "--sample", "2000"]),
    Bench("balance", [], balance, ["--n", "100000", "--sample", "10000", "--concepts", "10000"]),
    Bench(
        "match",
        ["--rounds", "1", "--nprobe", "8"],
        match,
        ["--concepts", "5000", "--dim", "64", "--queries", "200", "--clusters", "50", "--nlist", "16", "--rounds", "1"],
    ),
    Bench("embed", ["--n", "256", "--rounds", "2"], embed, ["--n", "8", "--rounds", "1", "--batch-size", "8"]),
    Bench("openai", ["--n", "1920", "--concurrency", "32", "64"], openai, ["--n", "100", "--concurrency", "16"]),
    Bench("pack", [], pack, ["--n", "20000", "--sample", "2000"]),
    Bench("train", [], train, ["--n", "32", "--max-len", "512"]),
    Bench("build_packed", [], build_packed, ["--n", "400", "--image-kb", "4", "--file-mib", "1"]),
    Bench("e2e", ["--n", "2000"], e2e, ["--n", "60"]),
    Bench("dedup_truth", ["--n", "20000"], dedup_truth, ["--n", "60"]),
    Bench(
        "semdedup",
        ["--n", "1000000", "--dim", "512"],
        semdedup,
        ["--n", "20000", "--dim", "64", "--sample", "2000", "--rows-per-cluster", "500", "--kmeans-sample", "10000"]
        + ["--spread-bucket-mib", "1"],
    ),
    Bench("decontaminate", ["--n", "2000", "--held-out", "100"], decontaminate, ["--n", "300", "--sizes", "100"]),
    Bench(
        "sources",
        ["--files", "100", "--rows", "10000", "--tars", "4", "--per-tar", "500", "--rounds", "3"],
        sources,
        ["--files", "3", "--rows", "200", "--tars", "1", "--per-tar", "20", "--rounds", "1"],
    ),
    Bench("learning", [], learning, ["--urls", "100", "--steps", "5"], script="learning.py"),
    Bench("anyres", ["--seeds", "0", "1"], anyres, ["--train", "24", "--held-out", "12", "--steps", "2"]),
    Bench("ddp", [], ddp, ["--n", "32", "--steps", "3", "--warmup", "1", "--rounds", "1"]),
    Bench("concepts", ["--n", "6000", "--steps", "600"], concepts, ["--n", "60", "--steps", "2"]),
    Bench(
        "learning_balance",
        [],
        learning_balance,
        ["--urls", "300", "--steps", "5", "--seeds", "0"],
        script="learning_balance.py",
    ),
]


def parse_json(out: str) -> list[dict]:
    """One JSON document, or one JSON object per line."""
    try:
        doc = json.loads(out)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def run(b: Bench, args: list[str]) -> tuple[list[Row], float, str | None]:
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(b.path()), *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    secs = time.perf_counter() - start
    if p.returncode != 0:
        return [], secs, (p.stderr.strip().splitlines() or ["no output"])[-1]
    try:
        return b.rows(parse_json(p.stdout)), secs, None
    except (KeyError, ValueError, IndexError) as e:
        return [], secs, f"could not read its JSON: {e!r}"


def machine() -> str:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU" if cpu else f"{os.cpu_count()} cores, {mem:.0f} GiB"


def table(rows: list[Row]) -> str:
    mark = {True: "met", False: "**not met**", None: ""}
    lines = ["| issue | figure | ours | baseline (same run) | ratio | goal | |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.issue} | {r.figure} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {mark[r.met]} |" for r in rows
    ]
    return "\n".join(lines)


def write_results(text: str) -> None:
    old = RESULTS.read_text()
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        head, _, rest = old.partition("\n\n")
        new = f"{head}\n\n{text}\n\n{rest}"
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="also put the table at the top of bench/RESULTS.md")
    ap.add_argument("--only", default="", help="comma-separated bench names")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes (what the test runs): the table's wiring, not figures"
    )
    args = ap.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    rows, notes, total, load = [], [], 0.0, os.getloadavg()[0]
    for b in chosen:
        cmd = " ".join([b.path().name, *(b.smoke if args.smoke else b.args)])
        print(f"running {cmd} ...", file=sys.stderr, flush=True)
        got, secs, err = run(b, b.smoke if args.smoke else b.args)
        total += secs
        rows += got
        notes.append(f"`{cmd}` {secs:.0f} s" + (f" FAILED: {err}" if err else ""))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"{BEGIN}\n## Latest `make bench` ({when})\n\nMachine: {machine()}. Command: `make bench` "
        f"(`python bench/run_all.py --write`), {total / 60:.1f} min in all, load average (1 min) {load:.1f} at "
        f"the start and "
        f"{os.getloadavg()[0]:.1f} at the end. Ratios are against the baseline "
        f"each script runs side by side; sizes are `make bench`'s (the sections below have the full-size runs).\n\n"
        f"{table(rows)}\n\nRuns: " + "; ".join(notes) + f"\n{END}"
    )
    print(text)
    if args.write and not args.smoke:
        write_results(text)
    if any(n.find("FAILED") >= 0 for n in notes):
        sys.exit(1)


if __name__ == "__main__":
    main()
