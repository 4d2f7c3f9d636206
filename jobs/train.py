"""Entrypoint for training: one process, torchrun's data-parallel ranks, or Ray Train workers on a Ray cluster.

    python jobs/train.py configs/stage2.yaml --set max_steps=1000           # one process (CPU)
    torchrun --nproc_per_node 2 jobs/train.py configs/stage2.yaml           # N ranks on this machine (gloo / nccl)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py configs/stage2.yaml --ray-workers 4 --use-gpu  # N Ray Train workers, a GPU each

Every way trains the same global batch of `rows_per_step` rows per step (trainer/distributed.py). Running it again
on the same `out` resumes from out/checkpoints/latest, with any number of ranks. With Ray, `out` must be on storage
every node sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when run as a script

from trainer import distributed
from trainer.config import ConfigError, load_config
from trainer.train import train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="training YAML (trainer.config.TrainConfig)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (value parsed as YAML)")
    ap.add_argument("--ray-workers", type=int, default=0, help="train on N Ray Train workers (TorchTrainer)")
    ap.add_argument("--use-gpu", action="store_true", help="with --ray-workers: one GPU per worker (nccl)")
    ap.add_argument("--stop-after", type=int, help="stop after this step without saving (a simulated kill; tests)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.ray_workers:
        summary = distributed.ray_train(cfg, args.ray_workers, use_gpu=args.use_gpu, stop_after=args.stop_after)
    else:
        with distributed.process_group():  # started when torchrun launched this process
            summary = train(cfg, stop_after=args.stop_after)
            main_rank = distributed.is_main()
        if not main_rank:
            return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "init_loaded"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
