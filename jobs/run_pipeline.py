"""Entrypoint that `ray job submit` runs: the same DAG, on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/run_pipeline.py pipelines/demo.yaml --run-dir /shared/runs/demo --set ingest.urls=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from curation.engine.config import ConfigError, load_pipeline
from curation.engine.driver import StageFailed, run_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("--run-dir", required=True, help="a path every node of the cluster can read and write")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="STAGE.PARAM=VALUE")
    ap.add_argument("--retry-failed", action="store_true")
    args = ap.parse_args(argv)
    try:
        pipeline = load_pipeline(args.pipeline, args.overrides)
        manifests = run_pipeline(
            pipeline,
            args.run_dir,
            address=os.environ.get("RAY_ADDRESS", "auto"),
            retry_failed=args.retry_failed,
            progress=lambda s, d, t, p: print(f"{s} [{p}] {d}/{t}", flush=True),
        )
    except (ConfigError, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({name: m["counts"] for name, m in manifests.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
