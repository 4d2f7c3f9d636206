"""Entrypoint that `ray job submit` runs for training (plain torch on the node the job lands on).

    ray job submit --address http://HEAD:8265 -- python jobs/train.py configs/stage2.yaml --set max_steps=1000

Running it again on the same `out` resumes from out/checkpoints/latest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when run as a script

from trainer.config import ConfigError, load_config
from trainer.train import train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="training YAML (trainer.config.TrainConfig)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (value parsed as YAML)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "init_loaded"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
