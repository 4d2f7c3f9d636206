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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


@dataclass
class Row:
    issue: int
    figure: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: a figure without a goal


def _f(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def ingest(d: list[dict]) -> list[Row]:
    r = d[-1]
    return [Row(2, f"ingest {r['n']:,} URLs, img/s, wall incl. start-up", _f(r["dag_img_per_s"], 1),
                f"{_f(r['img2dataset_img_per_s'], 1)} (img2dataset CLI)", f"{r['ratio']:.2f}x", ">= 0.9x", r["ratio"] >= 0.9),
            Row(2, "same, first shard start to last shard end", "", "", f"{r['steady_ratio']:.2f}x", ">= 0.9x",
                r["steady_ratio"] >= 0.9)]


def near_dup(d: list[dict]) -> list[Row]:
    r = d[-1]
    brute = r["sample_brute_s"] * (r["n"] / r["sample_n"]) ** 2  # all pairs: quadratic in n
    return [Row(2, f"near-dup grouping of {r['n']:,} pHashes (d <= {r['max_distance']}), s", _f(r["seconds"]),
                f"~{brute:,.0f} (brute force, extrapolated from {r['sample_n']:,})", f"~{brute / r['seconds']:,.0f}x",
                "< 60 s", r["seconds"] < 60),
            Row(2, "same, peak RSS of the grouping, MiB", _f(r["peak_rss_mb"], 0), "", "", "< 4 GB", r["peak_rss_mb"] < 4096),
            Row(2, f"same on a {r['sample_n']:,} sample (same groups: {r['agree']}), s", _f(r["sample_fast_s"], 3),
                f"{_f(r['sample_brute_s'], 3)} (brute force)", f"{r['speedup']}x", "same groups", r["agree"])]


def balance(d: list[dict]) -> list[Row]:
    r = d[-1]
    p = r["pandas_vs_numpy_sample"]
    return [Row(3, f"balance {r['n_images']:,} images x {r['k']} concepts, s", _f(r["pipeline_total_s"]), "", "",
                "< 60 s", r["pipeline_total_s"] < 60),
            Row(3, "same, peak RSS GiB (incl. the input)", _f(r["peak_rss_gib"]), "", "", "< 6 GB", r["peak_rss_gib"] < 6),
            Row(3, f"counts + MetaCLIP probs + weights on {p['images']:,} images, s (same: {p['same_results']})",
                _f(p["numpy_s"], 3), f"{_f(p['pandas_s'], 3)} (pandas explode + groupby)", f"{p['speedup']}x", "", None)]


def match(d: list[dict]) -> list[Row]:
    r = d[-1]
    s = r["stage_vs_raw"]
    rows = [Row(3, f"match_concepts stage, {r['queries']:,} x top-{r['k']} over {r['concepts']:,} x {r['dim']}, s",
                _f(s["stage_s"]), f"{_f(s['raw_s'])} (raw faiss IndexFlatIP)", f"{s['stage_s'] / s['raw_s']:.2f}x",
                "<= 1.25x (overhead <= 25%)", s["stage_s"] / s["raw_s"] <= 1.25)]
    for v in r.get("ivf_vs_flat", {}).get("ivf", []):
        rows.append(Row(3, f"IVF nprobe {v['nprobe']}, q/s (recall@{r['k']} {v['recall_at_k']})", _f(v["q_s"], 0),
                        f"{_f(r['ivf_vs_flat']['flat_q_s'], 0)} (flat)", f"{v['speedup']}x", "", None))
    return rows


def embed(d: list[dict]) -> list[Row]:
    r = d[-1]
    return [Row(3, f"embed stage on JPEG bytes, img/s ({r['model']})", _f(r["stage_img_s"], 1),
                f"{_f(r['baseline_img_s'], 1)} (bare forward on tensors)", f"{r['ratio']:.3f}x", ">= 0.9x", r["ratio"] >= 0.9)]


def openai(d: list[dict]) -> list[Row]:
    return [Row(4, f"openai backend, L = {r['latency_s']} s, C = {r['concurrency']}, req/s "
                   f"(client CPU {r['client_cpu_ms_per_req']} ms/req)", _f(r["req_per_s"], 1), f"{_f(r['c_over_l'], 0)} (C / L)",
                f"{r['ratio']:.3f}", ">= 0.9", r["ratio"] >= 0.9) for r in d]


def pack(d: list[dict]) -> list[Row]:
    rows = []
    for mix, r in d[-1]["mixes"].items():
        rows.append(Row(5, f"packing fill at {r['max_len']}, {mix} mix, gap-aware (best possible <= "
                           f"{r['best_possible_fill']:.4f})", f"{r['fill_ratio']:.4f}",
                        f"{r['bfd_fill_ratio']:.4f} (plain BFD); {r['padded_fill_ratio']:.4f} (one sample per row)",
                        f"{r['fill_vs_padded']}x vs padded", ">= 0.97", r["fill_ratio"] >= 0.97))
        rows.append(Row(5, f"packing {r['n_samples']:,} samples ({mix}), s", _f(r["pack_s"]), f"{_f(r['bfd_s'])} (BFD)",
                        "", "< 30 s", r["pack_s"] < 30))
    return rows


def train(d: list[dict]) -> list[Row]:
    r = d[-1]
    s, base = r["setting"], r["padded"]["useful_tokens_per_s"]
    return [Row(5, f"useful tokens/s, {side.replace('_', ' ')} vs padded (tiny LM hidden {s['hidden']} x {s['layers']}, "
                   f"max_len {s['max_len']}, {s['threads']} thread(s))", _f(r[side]["useful_tokens_per_s"], 0),
                f"{_f(base, 0)} (padded batches)", f"{ratio:.2f}x", ">= 1.5x" if side == "packed_varlen" else "",
                ratio >= 1.5 if side == "packed_varlen" else None)
            for side, ratio in r["ratio_vs_padded"].items() if side != "padded"]


def build_packed(d: list[dict]) -> list[Row]:
    r = d[-1]
    small, big = r["runs"]
    g = r["peak_growth_mib"]
    return [Row(5, f"build_packed peak RSS growth, {small['n']:,} -> {big['n']:,} samples (+{r['image_growth_mib']:,.0f} MiB "
                   f"of images; files of {r['file_mib']} MiB), MiB", _f(g["stream"], 0),
                f"{_f(g['memory'], 0)} (every sample in memory)", f"{g['stream'] / max(g['memory'], 1e-9):.2f}x",
                "", None),
            Row(5, f"same, peak RSS at {big['n']:,} samples, MiB", _f(big["stream"]["peak_above_start_mib"], 0),
                _f(big["memory"]["peak_above_start_mib"], 0), f"{r['ratio_at_n']:.2f}x", "", None)]


def learning(d: list[dict]) -> list[Row]:
    r = d[-1]
    rows = []
    for kind, q in r["questions"].items():
        bar, need = max(q["majority_rate"], q["blank_accuracy"]), r["margin"].get(kind)
        rows.append(Row(5, f"held-out {kind} accuracy, tiny model trained on pipeline data ({r['urls']:,} URLs, "
                           f"{r['steps']} steps, n = {q['n']})", f"{q['accuracy']:.3f}",
                        f"{q['majority_rate']:.3f} majority; {q['blank_accuracy']:.3f} blank images",
                        f"{q['accuracy'] - bar:+.3f}", f">= +{need} over both" if need else "",
                        q["accuracy"] >= bar + need if need else None))
    return rows


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
    Bench("ingest", ["--n", "2000", "--rounds", "1", "--shard", "250"], ingest, ["--n", "100", "--rounds", "1", "--shard", "50"]),
    Bench("near_dup", ["--n", "1000000", "--sample", "20000"], near_dup, ["--n", "20000", "--sample", "2000"]),
    Bench("balance", [], balance, ["--n", "100000", "--sample", "10000", "--concepts", "10000"]),
    Bench("match", ["--rounds", "1", "--nprobe", "8"], match,
          ["--concepts", "5000", "--dim", "64", "--queries", "200", "--clusters", "50", "--nlist", "16", "--rounds", "1"]),
    Bench("embed", ["--n", "256", "--rounds", "2"], embed, ["--n", "8", "--rounds", "1", "--batch-size", "8"]),
    Bench("openai", ["--n", "1920", "--concurrency", "32", "64"], openai, ["--n", "100", "--concurrency", "16"]),
    Bench("pack", [], pack, ["--n", "20000", "--sample", "2000"]),
    Bench("train", [], train, ["--n", "32", "--max-len", "512"]),
    Bench("build_packed", [], build_packed, ["--n", "400", "--image-kb", "4", "--file-mib", "1"]),
    Bench("learning", [], learning, ["--urls", "100", "--steps", "5"], script="learning.py"),
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
    p = subprocess.run([sys.executable, str(b.path()), *args, "--json"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    secs = time.perf_counter() - start
    if p.returncode != 0:
        return [], secs, (p.stderr.strip().splitlines() or ["no output"])[-1]
    try:
        return b.rows(parse_json(p.stdout)), secs, None
    except (KeyError, ValueError, IndexError) as e:
        return [], secs, f"could not read its JSON: {e!r}"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU" if cpu else f"{os.cpu_count()} cores, {mem:.0f} GiB"


def table(rows: list[Row]) -> str:
    mark = {True: "met", False: "**not met**", None: ""}
    lines = ["| issue | figure | ours | baseline (same run) | ratio | goal | |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.issue} | {r.figure} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {mark[r.met]} |" for r in rows]
    return "\n".join(lines)


def write_results(text: str) -> None:
    old = RESULTS.read_text()
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        head, _, rest = old.partition("\n\n")
        new = f"{head}\n\n{text}\n\n{rest}"
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="also put the table at the top of bench/RESULTS.md")
    ap.add_argument("--only", default="", help="comma-separated bench names")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (what the test runs): the table's wiring, not figures")
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
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"{BEGIN}\n## Latest `make bench` ({when})\n\nMachine: {machine()}. Command: `make bench` "
            f"(`python bench/run_all.py --write`), {total / 60:.1f} min in all, load average (1 min) {load:.1f} at the start and "
            f"{os.getloadavg()[0]:.1f} at the end. Ratios are against the baseline "
            f"each script runs side by side; sizes are `make bench`'s (the sections below have the full-size runs).\n\n"
            f"{table(rows)}\n\nRuns: " + "; ".join(notes) + f"\n{END}")
    print(text)
    if args.write and not args.smoke:
        write_results(text)
    if any(n.find("FAILED") >= 0 for n in notes):
        sys.exit(1)


if __name__ == "__main__":
    main()
