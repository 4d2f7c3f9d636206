"""AnyRes vs one fixed-resolution view (issue 18) on non-square images whose only object sits near a long side.

    .venv/bin/python bench/bench_anyres.py [--train 800] [--held-out 200] [--steps 600] [--seeds 0] [--json]

Images are 64x256 or 256x64 (H x W, 4:1, wide or tall), white with light noise, one coloured square of 20 px in the
outer quarter of the long side; the question is its colour. Three arms train the tiny model (trainer.tiny: 64 px
tower, random and frozen; stage 2) on the same rows for the same steps: `crop` (one view, the processor's resize and
centre crop: the square is cut off), `pad` (one view padded to a square, LLaVA-1.5: the square shrinks 4x) and
`anyres` (LLaVA-NeXT's grids at 64 px: a base view plus 3 tiles). Reported per arm: image tokens per sample, seconds
per step (forward + backward of the same 4 packed rows, the arms interleaved in one process), held-out accuracy beside
the blank-image accuracy and the majority rate (trainer.evaluate).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
LONG, SHORT, SQUARE = 256, 64, 20
ARMS = {
    "crop": {"pad_to_square": False},
    "pad": {},
    "anyres": {"anyres": {}},
}


def image(rng: np.random.Generator) -> tuple[bytes, str, tuple[int, int]]:
    """A 4:1 image with one square near an end of its long side: PNG bytes, its colour and (H, W)."""
    from PIL import Image

    wide = bool(rng.integers(2))
    h, w = (SHORT, LONG) if wide else (LONG, SHORT)
    arr = (245 + rng.integers(0, 11, (h, w, 3))).clip(0, 255).astype(np.uint8)
    colour = str(rng.choice(list(COLOURS)))
    along = int(rng.integers(2, LONG // 4 - SQUARE))  # in the outer quarter of the long side
    along = along if rng.integers(2) else LONG - SQUARE - along
    across = int(rng.integers(2, SHORT - SQUARE - 2))
    y, x = (across, along) if wide else (along, across)
    arr[y : y + SQUARE, x : x + SQUARE] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue(), colour, (h, w)


def rows(n: int, seed: int, prefix: str) -> list[dict]:
    """ImageInstruction rows (with their images) asking the square's colour."""
    from schemas import Instruction

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        png, colour, _ = image(rng)
        conv = [
            {"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": colour.capitalize()},
        ]
        row = Instruction(
            id=f"{prefix}-{i:05d}",
            uid=f"{prefix}{i}",
            kind="short_answer",
            conversations=conv,
            model="bench",
            prompt_version="v0",
        )
        out.append({**row.model_dump(by_alias=True), "image": png})
    return out


def run_arm(arm: str, work: Path, parts: dict, shard: Path, train_rows, test_rows, steps: int, seed: int) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from trainer.config import load_config
    from trainer.evaluate import evaluate
    from trainer.train import load_trained, train

    cfg = load_config(
        None,
        {
            "stage": 2,
            "shards": [str(shard)],
            "vision": str(parts["vision"]),
            "lm": str(parts["lm"]),
            "out": str(work / f"{arm}-{seed}"),
            "max_len": 512,
            "rows_per_step": 4,
            "max_steps": steps,
            "lr": 3e-3,
            "warmup_steps": 10,
            "seed": seed,
            "log_every": 10,
            "checkpoint_every": steps,
            **ARMS[arm],
        },
    )
    summary = train(cfg)
    final = Path(cfg.out) / "final"
    model = load_trained(cfg.out)
    sizes = [Image.open(io.BytesIO(r["image"])).size[::-1] for r in train_rows]  # (H, W)
    report = evaluate(
        model,
        AutoTokenizer.from_pretrained(str(final / "lm")),
        AutoImageProcessor.from_pretrained(str(final / "vision")),
        train_rows,
        test_rows,
        template=cfg.template,
    )["colour"]
    packing = summary["packing"]
    return {
        "arm": arm,
        "seed": seed,
        "image_tokens_per_sample": float(np.mean([model.tokens_for(s) for s in sizes])),
        "tokens_per_sample": round(packing["tokens"] / packing["samples"], 1),
        "s_per_step": round(1 / summary["steps_per_s"], 4),  # its own run: noisy on a shared machine
        "accuracy": report["accuracy"],
        "blank_accuracy": report["blank_accuracy"],
        "majority_rate": report["majority_rate"],
        "n": report["n"],
        "last_loss": summary["last_loss"],
    }


def step_seconds(work: Path, parts: dict, arms: list[str], seed: int, rounds: int = 20) -> dict[str, tuple[float, int]]:
    """Per arm: median seconds of one training step (forward + backward of 4 packed rows) and the samples those rows
    hold, the arms interleaved round by round in this process so that load on the machine falls on all alike."""
    import statistics
    import time

    import torch
    from transformers import AutoImageProcessor

    from trainer.anyres import AnyRes
    from trainer.model import LlavaLite
    from trainer.packed import PackedReader, collate

    processor = AutoImageProcessor.from_pretrained(str(parts["vision"]))
    setups = {}
    for arm in arms:
        cfg = ARMS[arm]
        model = LlavaLite.from_parts(
            parts["vision"],
            parts["lm"],
            anyres=AnyRes(**cfg["anyres"]) if "anyres" in cfg else None,
            pad_to_square=cfg.get("pad_to_square", True),
        ).train()
        params = model.trainable(2)
        rows = PackedReader(work / f"{arm}-{seed}" / "packed", seed=seed).next_rows(4)
        setups[arm] = (model, params, rows, model.image_inputs(processor))
    times: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(rounds):
        for arm, (model, params, rows, inputs) in setups.items():
            t0 = time.perf_counter()
            b = collate(rows, inputs, 0)
            _, loss = model(
                b["input_ids"],
                b["pixel_values"],
                seq_lens=b["seq_lens"],
                labels=b["labels"],
                image_sizes=b["image_sizes"],
            )
            loss.backward()
            for p in params:
                p.grad = None
            times[arm].append(time.perf_counter() - t0)
    torch.set_grad_enabled(True)
    return {a: (statistics.median(t), sum(len(r["lengths"]) for r in setups[a][2])) for a, t in times.items()}


def bench(n_train: int, n_held: int, steps: int, seeds: list[int], arms: list[str], work: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import ImageInstruction, arrow_schema
    from trainer.tiny import make_tiny_all

    train_rows, test_rows = rows(n_train, 1, "train"), rows(n_held, 2, "held")
    shard = work / "data" / "part-00000.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train_rows, schema=arrow_schema(ImageInstruction)), shard)
    out = []
    for seed in seeds:
        parts = make_tiny_all(work / f"models-{seed}", seed=seed)
        for arm in arms:
            out.append(run_arm(arm, work, parts, shard.parent, train_rows, test_rows, steps, seed))
            print(json.dumps(out[-1]), file=sys.stderr)
        for arm, (secs, n) in step_seconds(work, parts, arms, seed).items():  # side by side: holds under load
            r = next(r for r in out if r["arm"] == arm and r["seed"] == seed)
            r.update(s_per_step_side_by_side=round(secs, 4), ms_per_sample_side_by_side=round(1000 * secs / n, 2))
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| arm | seed | image tokens / sample | s / step, 4 packed rows | ms / sample | held-out accuracy |"
        " blank-image accuracy | majority rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['image_tokens_per_sample']:.1f} | {r['s_per_step_side_by_side']} | "
            f"{r['ms_per_sample_side_by_side']} | {r['accuracy']:.3f} | "
            f"{r['blank_accuracy']:.3f} | {r['majority_rate']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(args.train, args.held_out, args.steps, args.seeds, args.arms, Path(tmp))
    print(json.dumps(results) if args.json else table(results))


if __name__ == "__main__":
    main()
