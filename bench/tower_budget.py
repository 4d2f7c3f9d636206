"""The demo tower's training budget (issue 16, item 2): zero-shot accuracy against steps, on the demo's own tower web.

    .venv/bin/python bench/tower_budget.py 300:256:50 400:256:70 600:256:100 [--urls 12000] [--keep DIR] [--json]

Each STEPS:BATCH[:WARMUP] trains `curation-tiny-clip-rn` from the same seed on the pairs `trained_tower` uses
(the 12,000-URL long-tailed web, seed 1, filter's default rules; read from its files; warmup 1/6 of the steps
unless given), then reports the training seconds and zero-shot accuracy (72 compounds, shape, colour) on the
one-object images of a held-out 1,000-URL web (seed 2). Nothing is served or fetched.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from bench_concepts import zero_shot_figures

    from curation.concepts.clip import TRAINABLE_MODEL
    from curation.concepts.train_clip import TrainClipParams, train_clip
    from curation.fixtures.demo import TOWER_WEB, web_pairs
    from curation.fixtures.web import make_web

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("budgets", nargs="+", help="STEPS:BATCH[:WARMUP]")
    ap.add_argument("--urls", type=int, default=TOWER_WEB["n"], help="the tower web's size (the demo's: 12,000)")
    ap.add_argument("--keep", type=Path, help="keep the checkpoints here (e.g. for bench_concepts.py --tower)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tower-budget-") as tmp:
        web, held = Path(tmp) / "web", Path(tmp) / "held"
        make_web(web, port=1, **(TOWER_WEB | {"n": args.urls}))
        make_web(held, n=1000, port=1, seed=2, scenes="longtail")
        images, captions = web_pairs(web)
        for spec in args.budgets:
            steps, batch, *warmup = (int(v) for v in spec.split(":"))
            params = TrainClipParams(steps=steps, batch_size=batch, warmup=warmup[0] if warmup else steps // 6)
            ckpt = (args.keep or Path(tmp)) / f"tower-{args.urls}-{steps}-{batch}.pt"
            summary = train_clip(images, captions, ckpt, params)
            z = zero_shot_figures(held, TRAINABLE_MODEL, ckpt)
            rows.append(
                {
                    "urls": args.urls,
                    "steps": steps,
                    "batch": batch,
                    "pairs": len(images),
                    "train_s": summary["train_s"],
                    **z,
                }
            )
            print(json.dumps(rows[-1]) if args.json else
                  f"{steps} steps x {batch}: {summary['train_s']:.0f} s, zero-shot compound {z['compound']:.3f} "
                  f"shape {z['shape']:.3f} colour {z['colour']:.3f} ({z['images']} images)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
