"""Benchmark the training step: useful tokens/s of packed vs padded batches on the same tiny model and data.

Data: Instruction rows with a LLaVA-like length mix scaled to the tiny model (16 image tokens per `<image>`,
text lengths a quarter of bench_pack.py's older mix; chat template, max length `--max-len`):

    kind            share   text words (uniform)   image
    short VQA        35%        15 - 50              1
    captions         20%        25 - 75              1
    conversations    20%        75 - 375             1
    detail           10%        50 - 150             1
    text only        15%        12 - 875             0

Model: the tiny CLIP tower of trainer/tiny.py (64 px, 16 patches, hidden 64) and a random Llama LM of
`--hidden` x `--layers` (heads max(4, hidden / 64), MLP 2 x hidden, vocab of the tiny tokenizer ~1k), stage 2
(projector + LM train). Every side starts from the same weights (same seed).

Sides, interleaved step by step (the side furthest behind in its epoch runs next, so CPU contention from other
processes hits all of them alike), one epoch each over the same samples (trainer.packed.build_packed):
  padded          the standard HF batch: `--padded-rows` samples per step in a seeded random order, padded to
                  the longest of the step, [B, T] padding mask through SDPA (LlavaLite's path for padded batches)
  packed_varlen   best-fit-decreasing rows of max_len in a seeded random order, `--packed-rows` rows per step
                  (default: as many samples per step as padded), per-sample causal SDPA (LlavaLite
                  packed_attention="varlen", the default)
  packed_mask     the same packed rows through the dense [B, 1, T, T] block-diagonal mask (the reference path)
A step is what trainer/train.py does: collate (image decode + processor), forward, backward, grad clip, AdamW.
Useful tokens = non-pad tokens; tokens/s = tokens of the steps / summed step time.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import ImageInstruction, arrow_schema
from trainer.model import LlavaLite
from trainer.packed import PackedReader, build_packed, collate
from trainer.tiny import default_corpus, make_tiny_lm, make_tiny_tokenizer, make_tiny_vision

MIX = [
    ("short_vqa", 0.35, 15, 50, 1),
    ("caption", 0.20, 25, 75, 1),
    ("conversation", 0.20, 75, 375, 1),
    ("detail", 0.10, 50, 150, 1),
    ("text_only", 0.15, 12, 875, 0),
]


def make_shard(path: Path, n: int, seed: int = 0) -> Path:
    """n Instruction rows of MIX (one human turn, one gpt turn; a 32 px PNG where the kind has an image)."""
    rng = np.random.default_rng(seed)
    words = " ".join(default_corpus()).split()
    kinds = rng.choice(len(MIX), size=n, p=[m[1] for m in MIX])
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "PNG")
    rows = []
    for i, k in enumerate(kinds):
        name, _, lo, hi, n_img = MIX[k]
        n_words = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - n_words))
        text = words[start : start + n_words]
        q, a = " ".join(text[: max(1, n_words // 3)]), " ".join(text[max(1, n_words // 3) :]) or "Yes."
        conv = [{"from": "human", "value": ("<image>\n" if n_img else "") + q}, {"from": "gpt", "value": a}]
        rows.append(
            ImageInstruction(
                id=f"s{i:06d}",
                uid=f"u{i}",
                kind=name,
                conversations=conv,
                model="bench",
                prompt_version="v0",
                image=buf.getvalue(),
            ).model_dump(by_alias=True)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(ImageInstruction)), path)
    return path


def make_models(root: Path, hidden: int, layers: int, seed: int = 0) -> dict[str, Path]:
    """Tiny tokenizer + vision tower (trainer.tiny) and a random Llama of hidden x layers, saved as HF folders."""
    tokenizer = make_tiny_tokenizer(root / "lm")
    make_tiny_vision(root / "vision", seed=seed)
    make_tiny_lm(root / "lm", tokenizer, seed=seed, hidden=hidden, layers=layers)
    return {"lm": root / "lm", "vision": root / "vision"}


class Side:
    """One training run (model, AdamW, reader) advanced one step at a time, with its own timings."""

    def __init__(self, name: str, dirs: dict, packed_dir: Path, rows: int, attention: str, seed: int = 0):
        self.name, self.rows = name, rows
        self.model = LlavaLite.from_parts(dirs["vision"], dirs["lm"], seed=seed, packed_attention=attention)
        self.params = self.model.trainable(2)
        self.model.train()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.processor = AutoImageProcessor.from_pretrained(str(dirs["vision"]))
        self.reader = PackedReader(packed_dir, seed=seed)
        self.total_steps = math.ceil(len(self.reader) / rows)
        self.steps, self.time, self.losses = 0, 0.0, []
        self.counts = {"tokens": 0, "useful_tokens": 0, "samples": 0}

    @property
    def progress(self) -> float:
        return self.steps / self.total_steps

    def step(self) -> None:
        """collate -> forward (sum loss) -> backward -> clip -> AdamW, timed as trainer/train.py times a step."""
        t0 = time.perf_counter()
        batch = collate(self.reader.next_rows(self.rows), self.processor, pad_id=0)
        _, ls = self.model(
            batch["input_ids"],
            pixel_values=batch["pixel_values"],
            position_ids=batch["position_ids"],
            seq_lens=batch["seq_lens"],
            labels=batch["labels"],
            reduction="sum",
        )
        (ls[0] / ls[1].clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.time += time.perf_counter() - t0
        self.steps += 1
        loss = ls.detach()
        self.losses.append(float(loss[0] / loss[1].clamp(min=1)))
        for k in self.counts:
            self.counts[k] += batch[k]

    def report(self) -> dict:
        c, t = self.counts, self.time
        return {
            "rows_per_step": self.rows,
            "steps": self.steps,
            "rows": len(self.reader),
            "samples": c["samples"],
            "train_s": round(t, 2),
            "useful_tokens_per_s": round(c["useful_tokens"] / t, 1),
            "tokens_per_s": round(c["tokens"] / t, 1),
            "samples_per_s": round(c["samples"] / t, 2),
            "padding_waste": round(1 - c["useful_tokens"] / c["tokens"], 4),
            "mean_loss_last_10": round(float(np.mean(self.losses[-10:])), 4),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=384, help="samples")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--padded-rows", type=int, default=16, help="samples per padded step")
    ap.add_argument(
        "--packed-rows",
        type=int,
        default=0,
        help="packed rows per step; 0: padded-rows / samples per packed row (same samples per step)",
    )
    ap.add_argument("--hidden", type=int, default=64, help="LM hidden size")
    ap.add_argument("--layers", type=int, default=2, help="LM layers")
    ap.add_argument("--sides", default="padded,packed_varlen,packed_mask")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the shared 2-core box is oversubscribed; more threads mostly spin)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print compact JSON on one line (the default is indented)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_models(root / "models", args.hidden, args.layers, args.seed)
        shard = make_shard(root / "data" / "part-00000.parquet", args.n, args.seed)
        tokenizer = AutoTokenizer.from_pretrained(str(dirs["lm"]))
        vision = CLIPVisionConfig.from_pretrained(str(dirs["vision"]))
        image_tokens = (vision.image_size // vision.patch_size) ** 2  # what LlavaLite.image_tokens says
        built = {
            packing: build_packed(
                shard,
                root / ("packed" if packing else "padded"),
                tokenizer,
                "chat",
                image_tokens,
                args.max_len,
                packing=packing,
            )
            for packing in (False, True)
        }
        packed_rows = args.packed_rows or max(1, round(args.padded_rows * built[True]["rows"] / built[True]["samples"]))
        spec = {
            "padded": (False, args.padded_rows, "varlen"),
            "packed_varlen": (True, packed_rows, "varlen"),
            "packed_mask": (True, packed_rows, "mask"),
        }
        sides = [
            Side(name, dirs, root / ("packed" if spec[name][0] else "padded"), spec[name][1], spec[name][2], args.seed)
            for name in args.sides.split(",")
        ]
        while True:
            todo = [s for s in sides if s.steps < s.total_steps]
            if not todo:
                break
            min(todo, key=lambda s: s.progress).step()  # the side furthest behind runs next
    reports = {s.name: s.report() for s in sides}
    out = {
        "setting": {
            "n": args.n,
            "max_len": args.max_len,
            "hidden": args.hidden,
            "layers": args.layers,
            "lm_params_m": round(sum(p.numel() for p in sides[0].model.lm.parameters()) / 1e6, 2),
            "threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "samples": built[True]["samples"],
        "packed_fill": round(built[True]["fill_ratio"], 4),
        "rejects": built[True]["rejects"],
        **reports,
    }
    if "padded" in reports:
        base = reports["padded"]["useful_tokens_per_s"]
        out["ratio_vs_padded"] = {k: round(r["useful_tokens_per_s"] / base, 2) for k, r in reports.items()}
    out["goal"] = ">= 1.5x useful tokens/s packed vs padded"
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
