"""The training loop: packed (or padded) rows from offline-packed shards, stage 1/2 params, checkpoints, exact resume.

An `out` dir:

    out/packed/                         packed shards + _report.json (trainer.packed), rebuilt when data/config change
    out/log.jsonl                       one JSON line per `log_every` steps (step, loss, lr, tokens/s, padding...)
    out/checkpoints/step-N/             trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
    out/checkpoints/latest              the name of the newest complete checkpoint (written after its dir)
    out/final/                          vision/, lm/ (HF folders with processor/tokenizer), projector.safetensors,
                                        trainable.safetensors, parts.json, summary.json: what load_trained() reads

Under torchrun or Ray Train (trainer/distributed.py) the same loop runs data-parallel: a step's `rows_per_step`
global rows are split over the ranks, the gradient is the one a single process computes on them, rank 0 packs,
logs and writes; checkpoints do not depend on the number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoTokenizer

from trainer import distributed as dist_
from trainer.anyres import AnyRes
from trainer.config import TrainConfig
from trainer.model import IGNORE_INDEX, LlavaLite, PatchMerger, segment_ids, shifted_targets
from trainer.packed import PackedReader, build_packed, collate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def lr_lambda(cfg: TrainConfig, max_steps: int):
    """Multiplier of the base lr at a step: linear warmup, then constant or cosine decay to 0 at max_steps."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def trainable_state(model: LlavaLite) -> dict[str, torch.Tensor]:
    """The parameters that train in this run (requires_grad), by LlavaLite name, contiguous copies."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint-like dir from a run's out dir (final/ first, else latest checkpoint) or a checkpoint dir."""
    p = Path(path)
    if (p / "trainable.safetensors").exists():
        return p
    if (p / "final" / "trainable.safetensors").exists():
        return p / "final"
    if (p / "checkpoints" / "latest").exists():
        return p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    raise FileNotFoundError(f"init_from {path}: no trainable.safetensors, final/ or checkpoints/latest there")


def init_weights(model: LlavaLite, path: str | Path) -> list[str]:
    """Load what a checkpoint trained (projector and newline; the LM after stage 2; every part after stage 1.5), so a
    later stage starts from the whole model an earlier one left; the names loaded."""
    state = load_file(str(_checkpoint_dir(path) / "trainable.safetensors"))
    if not any(k.startswith("projector.") for k in state):
        raise KeyError(f"init_from {path}: no projector weights in the checkpoint")
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    if wrong:
        raise KeyError(
            f"init_from {path}: keys {wrong[:5]} do not fit this model (another projector, AnyRes or parts?)"
        )
    model.load_state_dict(state, strict=False)
    return sorted(state)


def optimizer_groups(model: LlavaLite, params: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: everything at cfg.lr, the vision tower (stage 1.5) at cfg.vision_lr."""
    vision = {id(p) for p in model.vision.parameters()}
    groups = [{"params": [p for p in params if id(p) not in vision], "lr": cfg.lr, "name": "main"}]
    tower = [p for p in params if id(p) in vision]
    if tower:
        groups.append({"params": tower, "lr": cfg.vision_lr, "name": "vision"})
    return groups


def _write_checkpoint(
    ckdir: Path, model, optimizer, scheduler, step: int, reader: PackedReader, cfg: TrainConfig, keep: int
) -> Path:
    """Write step-N atomically (temp dir, rename), then the `latest` pointer; prune older checkpoints.
    Called on every rank (a gather under FSDP); rank 0 writes, the others wait."""
    final = ckdir / f"step-{step}"
    full = dist_.full_state(model, optimizer)
    if full is not None:
        _write_checkpoint_files(ckdir, final, full, scheduler, step, reader, cfg, keep)
    dist_.barrier()
    return final


def _write_checkpoint_files(
    ckdir: Path, final: Path, full: tuple[dict, dict], scheduler, step: int, reader: PackedReader, cfg, keep: int
) -> None:
    tmp = ckdir / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(full[0], str(tmp / "trainable.safetensors"))
    torch.save(full[1], tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "reader": reader.state(), "stage": cfg.stage, "config": cfg.model_dump()}, indent=2)
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ptr = ckdir / ".latest.tmp"
    ptr.write_text(final.name)
    os.replace(ptr, ckdir / "latest")
    steps = sorted(int(p.name[5:]) for p in ckdir.glob("step-*") if p.name[5:].isdigit())
    for s in steps[:-keep]:
        shutil.rmtree(ckdir / f"step-{s}", ignore_errors=True)


def _resume(ckdir: Path, model, optimizer, scheduler, reader: PackedReader, cfg: TrainConfig) -> int:
    """Restore from checkpoints/latest; the step it was taken at (0 when there is none)."""
    ptr = ckdir / "latest"
    if not ptr.exists():
        return 0
    ck = ckdir / ptr.read_text().strip()
    meta = json.loads((ck / "state.json").read_text())
    if meta["stage"] != cfg.stage:
        raise ValueError(f"{ck}: a stage-{meta['stage']} checkpoint; this config is stage {cfg.stage}")
    state = load_file(str(ck / "trainable.safetensors"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != names:
        raise KeyError(f"{ck}: checkpoint holds other trainable params than this run")
    dist_.load_full_state(model, optimizer, state, torch.load(ck / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(ck / "rng.pt", weights_only=False))
    reader.load_state(meta["reader"])
    return int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (those after the checkpoint are redone exactly)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def _label_count(batch: dict) -> int:
    """Tokens that carry loss after the shift (what reduction='sum' counts)."""
    seg = segment_ids(batch["seq_lens"], batch["input_ids"].shape[1])
    return int((shifted_targets(batch["labels"], seg) != IGNORE_INDEX).sum())


def _fsdp_padding(cfg: TrainConfig, rows: int, world: int, micro: int, batches: int) -> int:
    """Zero-weighted forwards this rank adds under FSDP, so every rank runs as many (each gathers the LM)."""
    return math.ceil(math.ceil(rows / world) / micro) - batches if cfg.fsdp else 0


def _save_final(final: Path, model: LlavaLite, tokenizer, processor, summary: dict) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.vision.save_pretrained(str(tmp / "vision"))
    processor.save_pretrained(str(tmp / "vision"))
    model.lm.save_pretrained(str(tmp / "lm"))
    tokenizer.save_pretrained(str(tmp / "lm"))
    save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(tmp / "projector.safetensors"))
    (tmp / PARTS).write_text(json.dumps(parts_spec(model), indent=2))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


PARTS = "parts.json"  # in final/: the projector kind and AnyRes settings load_trained rebuilds the model with


def parts_spec(model: LlavaLite) -> dict:
    return {
        "projector": "patch_merge" if isinstance(model.projector, PatchMerger) else "mlp",
        "anyres": model.anyres.model_dump() if model.anyres else None,
        "pad_to_square": model.pad_to_square,
    }


def load_trained(out: str | Path) -> LlavaLite:
    """LlavaLite rebuilt from `out/final` (vision + LM folders through from_parts, then the trained projector and
    image newline)."""
    final = Path(out) / "final"
    if not (final / "projector.safetensors").exists():
        raise FileNotFoundError(f"{final}: no finished training here (projector.safetensors missing)")
    spec = json.loads((final / PARTS).read_text()) if (final / PARTS).exists() else {}
    anyres = AnyRes(**spec["anyres"]) if spec.get("anyres") else None
    model = LlavaLite.from_parts(
        final / "vision",
        final / "lm",
        projector=spec.get("projector", "mlp"),
        anyres=anyres,
        pad_to_square=spec.get("pad_to_square", True),
    )
    model.projector.load_state_dict(load_file(str(final / "projector.safetensors")))
    if anyres:
        model.image_newline.data.copy_(load_file(str(final / "trainable.safetensors"))["image_newline"])
    return model.eval()


def export_trained(out: str | Path, hf_dir: str | Path) -> Path:
    """export_hf of a finished run: a LlavaForConditionalGeneration checkpoint in hf_dir, whose chat template
    renders the run's template and system message."""
    from trainer.export_hf import export_hf

    final = Path(out) / "final"
    model = load_trained(out)
    summary = json.loads((final / "summary.json").read_text())
    return export_hf(
        model,
        AutoTokenizer.from_pretrained(str(final / "lm")),
        AutoImageProcessor.from_pretrained(str(final / "vision")),
        hf_dir,
        template=summary.get("template") or summary["packing"]["template"],
        system=summary.get("system"),
    )


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Train (or resume the run in cfg.out) to max_steps; `stop_after` stops early without saving (a simulated kill).

    Returns a summary: steps, final loss, timings, packing report, and where the final weights are. Under a process
    group (trainer/distributed.py) every rank calls this with the same config; the summary's counts are global.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.lm)
    processor = AutoImageProcessor.from_pretrained(cfg.vision)

    def build() -> LlavaLite:
        return LlavaLite.from_parts(
            cfg.vision,
            cfg.lm,
            seed=cfg.seed,
            projector=cfg.projector,
            anyres=cfg.anyres,
            pad_to_square=cfg.pad_to_square,
        )

    model = build()
    report = dist_.on_main(  # rank 0 packs; the others wait for its report
        lambda: build_packed(
            cfg.shards,
            out / "packed",
            tokenizer,
            cfg.template,
            model.tokens_for if cfg.anyres else model.image_tokens,
            cfg.max_len,
            packing=cfg.packing,
            system=cfg.system,
            key=cfg.data_key(),
            method=cfg.pack_method,
        )
    )
    if report["rows"] == 0:
        raise ValueError(f"no trainable samples in {cfg.shards}: rejects {report['rejects']}")
    reader = PackedReader(out / "packed", seed=cfg.seed)
    steps_per_epoch = math.ceil(len(reader) / cfg.rows_per_step)
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    loaded = init_weights(model, cfg.init_from) if cfg.init_from else []
    params = model.trainable(cfg.stage)
    rank, world, device = dist_.rank(), dist_.world(), dist_.device()
    if cfg.fsdp:
        params = dist_.shard(model)
    else:
        model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(optimizer_groups(model, params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    image_inputs = model.image_inputs(processor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
    ckdir = out / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    step = _resume(ckdir, model, optimizer, scheduler, reader, cfg)
    log_path = out / "log.jsonl"
    if dist_.is_main():
        _truncate_log(log_path, step)
    resumed_from = step
    micro = cfg.micro_rows or cfg.rows_per_step
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last_loss, t_start, totals = None, time.perf_counter(), {"tokens": 0, "useful_tokens": 0, "samples": 0}
    window = {"tokens": 0, "useful_tokens": 0, "samples": 0, "time": 0.0}
    while step < max_steps:
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        rows = reader.next_rows(cfg.rows_per_step)  # the step's global rows; this rank trains on rows[rank::world]
        mine = rows[rank::world]
        batches = [collate(mine[i : i + micro], image_inputs, pad_id) for i in range(0, len(mine), micro)]
        n_labels = int(dist_.all_reduce_sum([sum(_label_count(b) for b in batches)])[0])
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = 0.0
        pad = _fsdp_padding(cfg, len(rows), world, micro, len(batches))
        for i, b in enumerate(batches + [collate(rows[:1], image_inputs, pad_id)] * pad):
            w, b = float(i < len(batches)), dist_.to_device(b, device)
            _, ls = model(
                b["input_ids"],
                pixel_values=b["pixel_values"],
                position_ids=b["position_ids"],
                seq_lens=b["seq_lens"],
                labels=b["labels"],
                reduction="sum",
                image_sizes=b["image_sizes"],
            )
            (ls[0] * w / max(n_labels, 1)).backward()
            loss_sum += w * float(ls[0].detach())
        dist_.sum_gradients(params)
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = dist_.clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        keys = ("tokens", "useful_tokens", "samples")
        loss_sum, *counts = dist_.all_reduce_sum([loss_sum, *(sum(b[k] for b in batches) for k in keys)])
        last_loss = loss_sum / max(n_labels, 1)
        dt = time.perf_counter() - t0
        for k, n in zip(keys, map(int, counts)):
            totals[k] += n
            window[k] += n
        window["time"] += dt
        if step % cfg.log_every == 0 or step == max_steps:
            rec = {
                "step": step,
                "epoch": rows[-1]["epoch"],
                "loss": last_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "label_tokens": n_labels,
                "tokens_per_s": window["tokens"] / window["time"],
                "useful_tokens_per_s": window["useful_tokens"] / window["time"],
                "useful_ratio": window["useful_tokens"] / window["tokens"],
                "padding_waste": 1 - window["useful_tokens"] / window["tokens"],
                "samples_per_s": window["samples"] / window["time"],
                "steps_per_s": cfg.log_every / window["time"] if step % cfg.log_every == 0 else None,
            }
            if dist_.is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            window = {"tokens": 0, "useful_tokens": 0, "samples": 0, "time": 0.0}
        if step % cfg.checkpoint_every == 0 or step == max_steps:
            _write_checkpoint(ckdir, model, optimizer, scheduler, step, reader, cfg, cfg.keep_checkpoints)
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "max_steps": max_steps,
        "resumed_from": resumed_from,
        "finished": step >= max_steps,
        "last_loss": last_loss,
        "elapsed_s": elapsed,
        "init_loaded": loaded,
        "packing": report,
        "steps_per_s": (step - resumed_from) / elapsed if elapsed else None,
        "tokens_per_s": totals["tokens"] / elapsed if elapsed else None,
        "useful_tokens_per_s": totals["useful_tokens"] / elapsed if elapsed else None,
        "final": str(out / "final") if step >= max_steps else None,
        "template": cfg.template,  # what the export's chat template renders
        "system": cfg.system,
    }
    if dist_.broadcast(step >= max_steps and (step > resumed_from or not (out / "final").exists())):  # rank 0 decides
        plain = dist_.unsharded(model, build)
        if plain is not None:
            _save_final(out / "final", plain, tokenizer, processor, summary)
        dist_.barrier()
    return summary
