"""Benchmark the embed stage (decode + preprocess + forward + table) against the bare model forward on the same
batches."""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from curation.fixtures.photos import real_photos
from curation.ops.embed import Embed, EmbedParams


def make_jpegs(n: int, side: int = 256, seed: int = 0) -> list[bytes]:
    """n distinct JPEGs, shortest side `side` (as ingest's resize leaves them): random crops, scales and flips of
    real photos."""
    rng = np.random.default_rng(seed)
    photos = [im for _, im, _ in real_photos()]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        scale = side / min(cw, ch)
        crop = crop.resize((max(side, round(cw * scale)), max(side, round(ch * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
        out.append(buf.getvalue())
    return out


def baseline(clip, batches: list[torch.Tensor]) -> float:
    """Seconds for the bare model forward over already-preprocessed batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            clip.model.encode_image(x)  # [B, D]
    return time.perf_counter() - start


def stage(op: Embed, table: pa.Table) -> tuple[float, int]:
    """Seconds and output rows for Embed.process over the whole table as one part."""
    start = time.perf_counter()
    out, rejects = op.process("bench", table)
    assert out.num_rows + rejects.num_rows == table.num_rows
    return time.perf_counter() - start, out.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=512, help="images per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/stage rounds; best of each is reported")
    ap.add_argument("--model", default="ViT-B-32-quickgelu")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--text", action="store_true", help="also embed captions in the stage (not in the baseline)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    jpegs = make_jpegs(args.n)
    table = pa.table(
        {
            "uid": [f"{i:08d}" for i in range(args.n)],
            "caption": [f"a photo number {i}" for i in range(args.n)],
            "image": pa.array(jpegs, pa.binary()),
        }
    )
    op = Embed(
        EmbedParams(
            model=args.model, pretrained=None, precision=args.precision, batch_size=args.batch_size, text=args.text
        ),
        "embed",
        None,
    )
    op.setup()
    clip = op.clip
    t_prep = time.perf_counter()
    batches = []
    for s in range(0, args.n, args.batch_size):
        batch, _, _ = clip._prepare(jpegs[s : s + args.batch_size], s)
        batches.append(clip._normalise(batch))  # [B, 3, H, W] model dtype
    prep_s = time.perf_counter() - t_prep
    baseline(clip, batches[:1])  # warm-up
    stage(op, table.slice(0, args.batch_size))
    base_s, stage_s = [], []
    for _ in range(args.rounds):
        base_s.append(baseline(clip, batches))
        secs, rows = stage(op, table)
        stage_s.append(secs)
    res = {
        "model": clip.model_id,
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "text": args.text,
        "rounds": args.rounds,
        "baseline_img_s": round(args.n / min(base_s), 1),
        "stage_img_s": round(rows / min(stage_s), 1),
        "ratio": round(min(base_s) / min(stage_s), 3),
        "decode_preprocess_img_s_serial": round(args.n / prep_s, 1),
        "baseline_s": [round(s, 2) for s in base_s],
        "stage_s": [round(s, 2) for s in stage_s],
        "total_s": round(time.perf_counter() - t0, 1),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['model']}, {args.n} images, batch {args.batch_size}, {res['threads']} torch threads, best of "
            f"{args.rounds}"
        )
        print(f"  bare forward on preprocessed tensors: {res['baseline_img_s']:8.1f} img/s")
        print(f"  Embed.process on JPEG bytes:          {res['stage_img_s']:8.1f} img/s")
        print(f"  ratio stage / bare:                   {res['ratio']:8.3f}  (goal >= 0.9)")
        print(f"  decode + preprocess alone, serial:    {res['decode_preprocess_img_s_serial']:8.1f} img/s")


if __name__ == "__main__":
    main()
