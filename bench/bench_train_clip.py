"""Tiny CLIP training step, channels_last (what train_clip uses) vs the default contiguous layout, side by side.

    .venv/bin/python bench/bench_train_clip.py [--batch 256] [--steps 5] [--rounds 2] [--json]

The project's trainable tower (open_clip, `curation-tiny-clip-rn`) and open_clip's ClipLoss on random pixels and
tokens of the training shape; each round times `--steps` AdamW steps in each layout after 2 warm-up steps, the
layouts alternating so a noisy machine slows both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def seconds_per_step(channels_last: bool, batch: int, steps: int) -> float:
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    from curation.concepts.clip import TRAINABLE_MODEL, register_tiny

    register_tiny()
    torch.manual_seed(0)
    model = open_clip.create_model(TRAINABLE_MODEL, pretrained=None, output_dict=True)
    size = model.visual.image_size
    x = torch.randn(batch, 3, *((size, size) if isinstance(size, int) else size))
    tokens = torch.randint(1, 1000, (batch, model.context_length))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-3), ClipLoss()

    def step() -> None:
        out = model(x, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    times = {"contiguous": [], "channels_last": []}
    for _ in range(args.rounds):
        for layout in times:
            times[layout].append(seconds_per_step(layout == "channels_last", args.batch, args.steps))
    best = {k: min(v) for k, v in times.items()}
    res = {"batch": args.batch, "seconds_per_step": best, "speedup": best["contiguous"] / best["channels_last"]}
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
