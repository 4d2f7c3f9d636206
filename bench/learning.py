"""Learning (issue 5): the tiny trainer, fed only what the pipeline made from the synthetic web, answers held-out
colour and count questions; printed against the chance levels and against the same model shown blank images.

    .venv/bin/python bench/learning.py [--urls 2000] [--steps 800] [--seed 0] [--out DIR]

Steps: a fixture web of simple scenes (1-3 shapes on white, square) served on 127.0.0.1 -> ingest, dedup, filter,
instruct(short_answer, rules backend: a colour and an all-shapes count question per image) through the runner
-> the Instruction rows, with their images, split by uid (a quarter held out) -> stage-2 training on the train split
with trainer.train (as `curate train` runs it) -> trainer.evaluate on the held-out split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_SIZE = 64  # the tiny vision tower's input side: ingest stores what the trainer will see
# The claim: held-out accuracy above max(majority-answer rate, blank-image accuracy) by at least this much (a model
# that ignores the image scores at most that bar). tests/test_learning.py asserts it; `make bench` judges by it.
MARGIN = {"colour": 0.2, "count_total": 0.1}


def pipeline(web: Path) -> dict:
    """The curation DAG that makes the training data (a parsed-YAML mapping)."""
    # one colour and one all-shapes count question per image: the tiny model learns each type from ~1000 images
    rules = {
        "backend": "rules",
        "annotations": str(web / "truth.parquet"),
        "max_turns": 2,
        "ask": ["colour", "count_total"],
    }
    return {
        "name": "learning",
        "stages": {
            "ingest": {
                "op": "ingest",
                "params": {
                    "urls": str(web / "urls.parquet"),
                    "image_size": IMAGE_SIZE,
                    "timeout": 5,
                    "allow_loopback": True,
                },
            },
            "dedup": {"op": "dedup", "after": ["ingest"], "params": {"max_distance": 6}},
            # captions do not feed short answers (the boxes do): keep every image whatever its alt-text
            "filter": {
                "op": "filter",
                "after": ["dedup"],
                "params": {
                    "min_size": 64,
                    "max_aspect": 3.0,
                    "languages": None,
                    "require_caption": False,
                    "min_caption_chars": 0,
                    "min_caption_words": 0,
                    "boilerplate": [],
                    "max_caption_chars": 100_000,
                },
            },
            "short_answer": {"op": "instruct", "after": ["filter"], "params": {**rules, "kind": "short_answer"}},
        },
    }


def held_out(uid: str, fraction_of_4: int = 1) -> bool:
    """A fixed quarter of the images by uid hash: never trained on."""
    return hashlib.blake2b(uid.encode(), digest_size=4).digest()[0] % 4 < fraction_of_4


def make_data(workdir: Path, n_urls: int, web_seed: int) -> tuple[list[dict], list[dict], Path, dict]:
    """Serve a fixture web, run the pipeline; (train rows, held-out rows, train shard dir, stage counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web
    from schemas import Instruction
    from schemas.rundir import RunDir

    web, run = workdir / "web", workdir / "run"
    make_web(web, n=n_urls, port=free_port(), seed=web_seed, scenes="simple")
    with WebServer(web):
        manifests = run_pipeline(parse_pipeline(pipeline(web), "learning"), run)
    # the Instruction rows with their images (stored once, by ingest), read by uid: the split shard holds its own
    table = RunDir(run).read("short_answer", [*Instruction.model_fields, "image"])
    mask = pa.array([held_out(u) for u in table["uid"].to_pylist()])
    train_t, test_t = table.filter(pa.compute.invert(mask)), table.filter(mask)
    shard_dir = workdir / "train_split"
    shard_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(train_t, shard_dir / "part-00000.parquet")
    return train_t.to_pylist(), test_t.to_pylist(), shard_dir, {k: m["counts"] for k, m in manifests.items()}


def stage2_config(shards: Path, parts: dict, out: Path, steps: int, seed: int, lr: float, rows_per_step: int = 4):
    """The experiments' training run: stage 2 of the tiny model (`make_tiny_all` parts) on one shard folder."""
    from trainer.config import load_config

    return load_config(
        None,
        {
            "stage": 2,
            "shards": [str(shards)],
            "vision": str(parts["vision"]),
            "lm": str(parts["lm"]),
            "out": str(out),
            "max_len": 512,
            "rows_per_step": rows_per_step,
            "max_steps": steps,
            "lr": lr,
            "warmup_steps": 10,
            "seed": seed,
            "log_every": 10,
            "checkpoint_every": steps,
        },
    )


def learn(
    workdir: str | Path,
    n_urls: int = 2000,
    steps: int = 800,
    seed: int = 0,
    web_seed: int = 7,
    lr: float = 3e-3,
    rows_per_step: int = 4,
) -> dict:
    """The whole experiment in `workdir`; returns the evaluation report plus data and training figures."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from trainer.evaluate import evaluate
    from trainer.tiny import make_tiny_all
    from trainer.train import load_trained, train

    workdir = Path(workdir)
    t0 = time.perf_counter()
    train_rows, test_rows, shards, counts = make_data(workdir, n_urls, web_seed)
    t_data = time.perf_counter() - t0
    parts = make_tiny_all(workdir / "models", seed=seed)
    cfg = stage2_config(shards, parts, workdir / "train", steps, seed, lr, rows_per_step)
    summary = train(cfg)
    t_train = time.perf_counter() - t0 - t_data
    final = workdir / "train" / "final"
    report = evaluate(
        load_trained(workdir / "train"),
        AutoTokenizer.from_pretrained(str(final / "lm")),
        AutoImageProcessor.from_pretrained(str(final / "vision")),
        train_rows,
        test_rows,
        template=cfg.template,
    )
    return {
        "questions": report,
        "images": {"train": len(train_rows), "held_out": len(test_rows)},
        "train_uids": sorted({r["uid"] for r in train_rows}),
        "held_out_uids": sorted({r["uid"] for r in test_rows}),
        "stage_counts": counts,
        "last_loss": summary["last_loss"],
        "samples": summary["packing"]["samples"],
        "seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "eval": round(time.perf_counter() - t0 - t_data - t_train, 1),
        },
    }


def table(result: dict) -> str:
    """A Markdown table of the report."""
    lines = [
        "| question | held-out n | accuracy | blank-image accuracy | majority rate (answer) | 1/#candidates |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in result["questions"].items():
        lines.append(
            f"| {kind} | {r['n']} | {r['accuracy']:.3f} | {r.get('blank_accuracy', float('nan')):.3f} | "
            f"{r['majority_rate']:.3f} ({r['majority_answer']}) | {r['uniform_chance']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0, help="model init and data order")
    ap.add_argument("--web-seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for `make bench`) instead of the table")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    out = args.out or Path(tempfile.mkdtemp(prefix="learning-"))
    res = learn(out, args.urls, args.steps, args.seed, args.web_seed)
    figures = {k: res[k] for k in ("images", "last_loss", "samples", "seconds")}
    if args.json:
        print(
            json.dumps(
                {
                    "urls": args.urls,
                    "steps": args.steps,
                    "seed": args.seed,
                    "questions": res["questions"],
                    "margin": MARGIN,
                    **figures,
                }
            )
        )
    else:
        print(table(res))
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
