"""Benchmark the openai backend against the loopback fake server: throughput vs C/L and client CPU per request."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from curation.synth.openai_backend import OpenAIBackend
from curation.synth.types import Request

ROOT = Path(__file__).resolve().parents[1]
SERVER = "from curation.fixtures.llm_server import serve_forever; import sys; serve_forever(0, float(sys.argv[1]))"


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """The fake server in its own process (its CPU is not the client's); returns it and its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"fake server did not start (printed {url!r})")
    return proc, url


def requests(n: int, tag: str) -> list[Request]:
    """n distinct LLaVA-sized chat requests."""
    system = "You are an AI visual assistant that can analyze a single image. " * 8
    return [
        Request(
            key=f"{tag}-{i}",
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": f"Captions: photo {i} of a red bicycle leaning on a blue door in {tag}."},
            ],
        )
        for i in range(n)
    ]


def bench_one(url: str, latency: float, concurrency: int, n: int, transport: str = "aiohttp") -> dict:
    """One run of n requests at this concurrency: rate, its ratio to C/L, client CPU per request."""
    backend = OpenAIBackend(url, "fake-llm", concurrency=concurrency, timeout=30, max_retries=0, transport=transport)
    backend.run(requests(min(n, 2 * concurrency), f"warm{concurrency}"))  # imports, first connections
    reqs = requests(n, f"c{concurrency}")
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = backend.run(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = sum(r.ok for r in results)
    rate, ideal = n / wall, concurrency / latency
    return {
        "transport": transport,
        "latency_s": latency,
        "concurrency": concurrency,
        "n": n,
        "ok": ok,
        "wall_s": round(wall, 3),
        "req_per_s": round(rate, 1),
        "c_over_l": round(ideal, 1),
        "ratio": round(rate / ideal, 3),
        "client_cpu_ms_per_req": round(1000 * cpu / n, 3),
        "pass": ok == n and rate >= 0.9 * ideal,
    }


def main() -> None:
    """Parse arguments, run each concurrency against one server process, print a table or JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--latency", type=float, default=0.2, help="server latency L in seconds")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64], help="client concurrency C")
    ap.add_argument("--n", type=int, default=1920, help="requests per run (a multiple of C: no part-filled last round)")
    ap.add_argument(
        "--transport",
        default="aiohttp",
        choices=["httpx", "aiohttp"],
        help="the SDK's HTTP client (aiohttp needs `openai[aiohttp]`)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = ap.parse_args()
    proc, url = start_server(args.latency)
    try:
        rows = [bench_one(url, args.latency, c, args.n, args.transport) for c in args.concurrency]
    finally:
        proc.kill()
        proc.wait()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'L s':>5} {'C':>5} {'N':>6} {'req/s':>8} {'C/L':>8} {'ratio':>6} {'cpu ms/req':>11} pass")
    for r in rows:
        print(
            f"{r['latency_s']:>5} {r['concurrency']:>5} {r['n']:>6} {r['req_per_s']:>8} {r['c_over_l']:>8} "
            f"{r['ratio']:>6} {r['client_cpu_ms_per_req']:>11} {r['pass']}"
        )


if __name__ == "__main__":
    main()
