"""Soak (issue 19): a fixture web whose servers fail transiently, rerun with --retry-failed until stable.

    .venv/bin/python bench/soak.py [--n 50000] [--web-faults 0.1] [--llm-faults 0.1] [--rounds 4] [--json]

The web (curation.fixtures.web, served on 127.0.0.1) answers the first request for `--web-faults` of its images
with a 503, a connection reset or a stall past ingest's timeout; the fake LLM server (curation.fixtures.llm_server)
fails `--llm-faults` of its requests (429, 500, 503, a stall past the client's timeout), each at most twice.
The DAG: ingest (img2dataset retries off, so faults surface as rejects) -> dedup -> filter -> conversation
(openai backend). Round 1 runs it; later rounds rerun with --retry-failed until ingest's transient rejects stop
changing. The same DAG runs first on the same web and LLM with no faults: the reference.

Checked (and printed): in = out + rejected at every stage of every round; the final rows and rejects equal the
reference's (so every faulted image was recovered, and the transient rejects left are the web's own broken items,
as in the reference); no image answered 200 twice and no LLM request answered twice (counted at the servers); the
driver's RSS (sampled every 0.2 s) per round, whose peak must not grow from round to round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRANSIENT_LLM = {"429": 0.25, "500": 0.25, "503": 0.25, "timeout": 0.25}  # shares of the LLM's fault rate


def dag(web: Path, llm_url: str, cache: Path, shard_size: int) -> dict:
    """The soak's DAG (a parsed-YAML mapping)."""
    return {
        "name": "soak",
        "stages": {
            "ingest": {
                "op": "ingest",
                "params": {
                    "urls": str(web / "urls.parquet"),
                    "image_size": 64,
                    "timeout": 2,  # the web's stall is longer; a loaded box's normal answer is shorter
                    "retries": 0,
                    "thread_count": 32,
                    "shard_size": shard_size,
                    "allow_loopback": True,
                },
            },
            "dedup": {"op": "dedup", "after": ["ingest"], "params": {"max_distance": 6}},
            "filter": {"op": "filter", "after": ["dedup"], "params": {"min_size": 32}},
            "conversation": {
                "op": "instruct",
                "after": ["filter"],
                "params": {
                    "kind": "conversation",
                    "backend": "openai",
                    "base_url": llm_url,
                    "model": "fake-llm",
                    "api_key_env": "UNSET_SOAK_KEY",
                    "concurrency": 16,
                    "timeout": 3.0,  # the LLM's stall is 6 s; shorter, a slow answer would be asked twice
                    "cache": str(cache),
                },
            },
        },
    }


class RssSampler:
    """The peak resident set size of this process (the Ray driver) while the block runs, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:  # Linux: size, resident, ... in pages
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rows_of(run: Path) -> dict:
    """Every stage's row uids and reject (uid, reason), sorted."""
    import polars as pl

    out = {}
    for stage in ("ingest", "dedup", "filter", "conversation"):
        parts = sorted((run / stage).glob("part-*.parquet"))
        rej = sorted((run / stage / "rejects").glob("part-*.parquet"))
        got = pl.concat([pl.read_parquet(f, columns=["uid"]) for f in parts]) if parts else pl.DataFrame()
        bad = pl.concat([pl.read_parquet(f, columns=["uid", "reason"]) for f in rej]) if rej else pl.DataFrame()
        out[stage] = (
            sorted(got["uid"].to_list()) if got.height else [],
            sorted(map(tuple, bad.rows())) if bad.height else [],
        )
    return out


def run_rounds(raw: dict, run: Path, rounds: int) -> list[dict]:
    """Round 1, then --retry-failed rounds until ingest's transient rejects stop changing (the web's own broken
    items stay: an unreachable host is unreachable every time); per round the manifests' counts, the transient
    rejects left and the driver's peak RSS."""
    from curation.download.reasons import TRANSIENT
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline

    log = []
    for r in range(rounds):
        with RssSampler() as rss:
            t0 = time.perf_counter()
            manifests = run_pipeline(parse_pipeline(raw, "soak.yaml"), run, retry_failed=r > 0)
        rejects = rows_of(run)["ingest"][1]
        left = Counter(reason for _, reason in rejects if reason in TRANSIENT)
        log.append(
            {
                "round": r + 1,
                "seconds": round(time.perf_counter() - t0, 1),
                "counts": {s: m["counts"] for s, m in manifests.items()},
                "transient_left": dict(left),
                "driver_peak_rss_mib": round(rss.peak / 2**20, 1),
            }
        )
        if len(log) > 1 and left == Counter(log[-2]["transient_left"]):
            break
    return log


def soak(n: int, web_faults: float, llm_faults: float, rounds: int, workdir: Path, shard_size: int = 250) -> dict:
    from curation.fixtures.llm_server import LLMServer
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    web = workdir / "web"
    make_web(web, n=n, port=free_port(), seed=11)
    with WebServer(web, stall=5.0) as server, LLMServer() as llm:
        ref_log = run_rounds(dag(web, llm.url, workdir / "ref.sqlite", shard_size), workdir / "ref", rounds)
        reference = rows_of(workdir / "ref")
        ref_twice = sum(v > 1 for v in llm.answered.values())  # without faults: 0 unless the cache double-asks
        server.requests.clear()  # each path's next request is its first again: the faulty server's
        server.answered.clear()
        server.faults = web_faults
        llm.requests.clear()
        llm.answered.clear()
        llm.served.clear()
        llm.faults = {k: v * llm_faults for k, v in TRANSIENT_LLM.items()}
        llm.stall = 6.0
        log = run_rounds(dag(web, llm.url, workdir / "soak.sqlite", shard_size), workdir / "run", rounds)
        final = rows_of(workdir / "run")
        faulted = dict(server.faulted)
        answered_twice = sum(v > 1 for v in server.answered.values())
        llm_twice = sum(v > 1 for v in llm.answered.values())
        llm_served = dict(llm.served)
    return {
        "n": n,
        "web_faults": web_faults,
        "llm_faults": llm_faults,
        "rounds": log,
        "reference_rounds": ref_log,
        "balanced": all(c["in"] == c["out"] + c["rejected"] for r in log for c in r["counts"].values()),
        "same_as_reference": final == reference,
        "transient_left": log[-1]["transient_left"],
        "reference_transient_left": ref_log[-1]["transient_left"],
        "faulted_images": len(faulted),
        "faulted_by_kind": dict(Counter(faulted.values())),
        "images_answered_twice": answered_twice,
        "llm_requests_answered_twice": llm_twice,
        "reference_llm_requests_answered_twice": ref_twice,
        "llm_served": llm_served,
        "driver_peak_rss_mib": [r["driver_peak_rss_mib"] for r in log],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--web-faults", type=float, default=0.1)
    ap.add_argument("--llm-faults", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5, help="at most")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import ray

    from curation.engine.workers import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=f"{tmp}/ray")
        init_ray(None, Path(tmp) / "ray")
        try:
            res = soak(args.n, args.web_faults, args.llm_faults, args.rounds, Path(tmp), args.shard_size)
        finally:
            ray.shutdown()
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
