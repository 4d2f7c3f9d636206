"""Benchmark the training loop: useful tokens/s of packed vs padded batches on the same tiny model and data.

Data: Instruction rows with a LLaVA-like length mix scaled to the tiny model (16 image tokens per `<image>`,
text lengths a quarter of bench_pack.py's LLaVA-1.5 mix, max length 1024):

    kind            share   text words (uniform)   image
    short VQA        35%        15 - 50              1
    captions         20%        25 - 75              1
    conversations    20%        75 - 375             1
    detail           10%        50 - 150             1
    text only        15%        12 - 875             0

Both runs train one epoch over the same samples with the same model and seed, stage 2 (projector + LM).
Padded: one sample per row, `--padded-rows` rows per step, padded to the longest row of the step.
Packed: best-fit-decreasing rows of max_len, `--packed-rows` rows per step (about the same useful tokens per step).
Useful tokens = non-pad tokens; tokens/s counts the time of the optimizer steps (collate + forward + backward).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import Instruction, arrow_schema  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.tiny import default_corpus, make_tiny_all  # noqa: E402
from trainer.train import train  # noqa: E402

MIX = [("short_vqa", 0.35, 15, 50, 1), ("caption", 0.20, 25, 75, 1), ("conversation", 0.20, 75, 375, 1),
       ("detail", 0.10, 50, 150, 1), ("text_only", 0.15, 12, 875, 0)]


def make_shard(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = " ".join(default_corpus()).split()
    kinds = rng.choice(len(MIX), size=n, p=[m[1] for m in MIX])
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    rows = []
    for i, k in enumerate(kinds):
        name, _, lo, hi, n_img = MIX[k]
        n_words = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - n_words))
        text = words[start:start + n_words]
        q, a = " ".join(text[: max(1, n_words // 3)]), " ".join(text[max(1, n_words // 3):]) or "Yes."
        conv = [{"from": "human", "value": ("<image>\n" if n_img else "") + q}, {"from": "gpt", "value": a}]
        rows.append(Instruction(id=f"s{i:06d}", uid=f"u{i}", kind=name, conversations=conv, model="bench",
                                prompt_version="v0", image=buf.getvalue()).model_dump(by_alias=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Instruction)), path)
    return path


def run(root: Path, dirs: dict, shard: Path, packing: bool, rows: int, max_len: int) -> dict:
    out = root / ("packed" if packing else "padded")
    cfg = load_config(None, {"stage": 2, "shards": [str(shard)], "vision": str(dirs["vision"]), "lm": str(dirs["lm"]),
                             "out": str(out), "max_len": max_len, "packing": packing, "rows_per_step": rows,
                             "epochs": 1, "log_every": 1, "checkpoint_every": 10**6, "lr": 1e-4, "seed": 0})
    t0 = time.perf_counter()
    s = train(cfg)
    wall = time.perf_counter() - t0
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    step_time = sum(1.0 / r["steps_per_s"] for r in log if r["steps_per_s"])
    useful = sum(r["useful_tokens_per_s"] / r["steps_per_s"] for r in log if r["steps_per_s"])
    total = sum(r["tokens_per_s"] / r["steps_per_s"] for r in log if r["steps_per_s"])
    samples = sum(r["samples_per_s"] / r["steps_per_s"] for r in log if r["steps_per_s"])
    return {"mode": "packed" if packing else "padded", "rows_per_step": rows, "steps": s["steps"],
            "rows": s["packing"]["rows"], "samples": s["packing"]["samples"], "rejects": s["packing"]["rejects"],
            "train_s": step_time, "steps_per_s": s["steps"] / step_time, "tokens_per_s": total / step_time,
            "useful_tokens_per_s": useful / step_time, "samples_per_s": samples / step_time,
            "padding_waste": 1 - useful / total, "wall_s_incl_packing": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--padded-rows", type=int, default=16)
    ap.add_argument("--packed-rows", type=int, default=2)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_tiny_all(root / "models")
        shard = make_shard(root / "data" / "part-00000.parquet", args.n)
        padded = run(root, dirs, shard, False, args.padded_rows, args.max_len)
        packed = run(root, dirs, shard, True, args.packed_rows, args.max_len)
    ratio = packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"]
    print(json.dumps({"packed": packed, "padded": padded, "useful_tokens_per_s_ratio": ratio,
                      "goal": ">= 1.5x useful tokens/s packed vs padded",
                      "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
