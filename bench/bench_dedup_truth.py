"""Dedup judged against ground truth: the demo DAG's ingest and dedup stages on the default fixture web of N URLs,
then precision, recall per planted variant kind and distinct images lost (curation/dedup/truth.py).

    python bench/bench_dedup_truth.py --n 20000 [--out bench/out/dedup_truth] [--json]

The web is drawn as `curate demo` draws it (seed 0) and served on 127.0.0.1. Goals (issue 15): precision >= 0.99,
recall >= 0.95 on exact, re-encode and resize, crop reported, distinct images lost <= 0.5%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def run(n: int, out: Path) -> dict:
    from curation.dedup.truth import components_baseline, judge
    from curation.engine.config import load_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    shutil.rmtree(out, ignore_errors=True)
    web = out / "web"
    make_web(web, n=n, port=free_port(), seed=0)
    overrides = [f"ingest.urls={web / 'urls.parquet'}", "ingest.allow_loopback=true"]
    t0 = time.time()
    with WebServer(web):
        manifests = run_pipeline(load_pipeline("demo", overrides), out / "run", only=["ingest", "dedup"])
    res = judge(out / "run", web / "truth.parquet")
    d = manifests["dedup"]["params"]["max_distance"]
    base = judge(out / "run", web / "truth.parquet", groups=components_baseline(out / "run", d))
    return {"n": n, "seconds": round(time.time() - t0, 1), "max_distance": d, **res, "components": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/dedup_truth"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.n, args.out)
    if args.json:
        print(json.dumps(res))
        return
    print(f"dedup on {args.n:,} URLs (max_distance {res['max_distance']}): {res['rows']:,} rows in, ", end="")
    print(f"{res['rejects']:,} duplicate rejects, {res['wrong_rejects']:,} wrong")
    print(f"precision {res['precision']:.3f}; recall {res['recall_all']:.3f} of planted variants:")
    for kind, r in res["recall"].items():
        print(f"  {kind}: {r:.3f} of {res['planted'][kind]:,}")
    print(
        f"distinct images lost: {res['distinct_lost']:,} of {res['distinct']:,} ({res['distinct_lost_fraction']:.1%})"
    )
    b = res["components"]
    print(
        f"baseline, connected components of pHash distance <= {res['max_distance']} on the same hashes: "
        f"precision {b['precision']:.3f}, recall {b['recall_all']:.3f}, distinct lost {b['distinct_lost']:,}"
    )


if __name__ == "__main__":
    main()
