"""Train the project's tiny open_clip model on a run's image-caption pairs: open_clip's own model and contrastive loss
(`open_clip.loss.ClipLoss`), on CPU in minutes. The checkpoint is a state dict that `embed`, `match_concepts` and
`curate vocab embed` load through the same `pretrained=<file>` path as real MetaCLIP weights."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from curation.concepts.clip import TRAINABLE_MODEL, register_tiny


class TrainClipParams(BaseModel):
    """How the tower is trained (CLIP's recipe, scaled down: AdamW, warmup then cosine decay)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(TRAINABLE_MODEL, description="open_clip model name (a config registered here)")
    steps: int = Field(600, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: int = Field(100, ge=0)
    seed: int = 0
    threads: int | None = Field(None, description="torch CPU threads (default: torch's)")


def _part_files(source: Path) -> list[Path]:
    """A stage dir's part files, or one Parquet file."""
    if source.is_file():
        return [source]
    files = sorted(source.glob("part-*.parquet"))
    if not files:
        raise ValueError(f"{source}: no part-*.parquet (pass a stage dir of a run, e.g. RUN/filter, or a Parquet file)")
    return files


def read_pairs(source: str | Path, caption_col: str = "caption") -> tuple[list[bytes], list[str]]:
    """(image bytes, caption) of every row of a stage (its images read from the stage that stored them) or of a
    Parquet file with `image` and a caption column; rows without a caption are skipped."""
    from schemas.rundir import read_file

    images, captions = [], []
    for f in _part_files(Path(source)):
        table = read_file(f, ["image", caption_col])
        for im, cap in zip(table.column("image").to_pylist(), table.column(caption_col).to_pylist()):
            if im and cap and cap.strip():
                images.append(im)
                captions.append(cap)
    if len(images) < 2:
        raise ValueError(f"{source}: {len(images)} image-caption pairs; training needs at least 2")
    return images, captions


def decode(images: list[bytes], pil_steps) -> np.ndarray:
    """Encoded images -> uint8 [N, 3, H, W] after the model's eval resize and crop."""
    from PIL import Image

    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            for step in pil_steps:
                im = step(im)
            out.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W]
    return np.stack(out)  # [N, 3, H, W]


def _param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings' scales and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _lr(step: int, p: TrainClipParams) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    t = (step - p.warmup) / max(1, p.steps - p.warmup)
    return 0.5 * p.lr * (1 + math.cos(math.pi * t))


def train_clip(
    images: list[bytes], captions: list[str], out: str | Path, params: TrainClipParams | None = None, log=None
) -> dict:
    """Train `params.model` from seeded random weights on the pairs; write its state dict to `out` (atomically) and
    `out`.json (the params, the data size, the loss curve). Returns that summary."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    p = params or TrainClipParams()
    register_tiny()
    if p.threads:
        torch.set_num_threads(p.threads)
    torch.manual_seed(p.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(p.model, pretrained=None, output_dict=True)
    model = model.to(memory_format=torch.channels_last)  # oneDNN conv layout: 1.2x a CPU step (bench_train_clip)
    steps = list(preprocess.transforms)
    mean = torch.tensor(steps[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(steps[-1].std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    pixels = torch.from_numpy(decode(images, steps[:-2]))  # uint8 [N, 3, H, W]
    tokens = open_clip.get_tokenizer(p.model)(list(captions))  # [N, L]
    decode_s = time.perf_counter() - t0
    loss_fn, opt = ClipLoss(), torch.optim.AdamW(_param_groups(model, p.weight_decay), lr=p.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(p.seed)
    n, bs = len(pixels), min(p.batch_size, len(pixels))
    order, at, curve = torch.randperm(n, generator=gen), 0, []
    model.train()
    t0 = time.perf_counter()
    for step in range(p.steps):
        if at + bs > n:
            order, at = torch.randperm(n, generator=gen), 0
        idx, at = order[at : at + bs], at + bs
        x = ((pixels[idx].float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)  # [B, 3, H, W]
        for g in opt.param_groups:
            g["lr"] = _lr(step, p)
        out_ = model(x, tokens[idx])
        loss = loss_fn(out_["image_features"], out_["text_features"], out_["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == p.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 4)})
            if log:
                log(step, loss.item())
    train_s = time.perf_counter() - t0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    summary = {
        "model": p.model,
        "pretrained": str(out),
        "params": p.model_dump(),
        "pairs": n,
        "decode_s": round(decode_s, 1),
        "train_s": round(train_s, 1),
        "loss": curve,
    }
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def zero_shot(clip, images: list[bytes], labels: list[str], classes: list[str], template: str = "a {}") -> dict:
    """Zero-shot classification with a loaded Clip: accuracy of argmax over `classes` (each embedded through
    `template`) against `labels`, and the predictions."""
    emb, _, errors = clip.encode_images(images)
    if errors:
        raise ValueError(f"{len(errors)} images did not decode, e.g. {next(iter(errors.values()))}")
    text = clip.encode_texts([template.format(c) for c in classes])  # [C, D]
    pred = [classes[i] for i in (emb @ text.T).argmax(1)]
    hits = sum(a == b for a, b in zip(pred, labels))
    return {"n": len(labels), "accuracy": hits / max(1, len(labels)), "pred": pred}
