"""Greedy generation for LlavaLite: a loop of full forward calls (no KV cache), batched with right padding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from trainer.model import LlavaLite


@torch.no_grad()
def generate(
    model: LlavaLite,
    prompts: Sequence[Sequence[int]],
    pixel_values: Sequence[torch.Tensor] | None = None,
    stop_ids: Iterable[int] = (),
    max_new_tokens: int = 16,
    pad_id: int = 0,
    image_sizes: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (their `<image>` slots already expanded), stop token excluded.

    pixel_values: per prompt, its images' pixels [n, C, H, W] (n = 0 for a text-only prompt), as the model's
    forward takes them (an AnyRes model: its images' views, with `image_sizes` per prompt: each image's (H, W)).
    A row stops at its first stop id or after `max_new_tokens`; finished rows leave the batch.
    """
    stops = set(stop_ids)
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = [i for i, p in enumerate(seqs) if p] if max_new_tokens > 0 else []
    dev = next(model.parameters()).device
    model.eval()
    while active:
        T = max(len(seqs[i]) for i in active)
        ids = torch.full((len(active), T), pad_id, dtype=torch.long)  # [B, T], right-padded
        for b, i in enumerate(active):
            ids[b, : len(seqs[i])] = torch.tensor(seqs[i])
        px = None
        if pixel_values is not None:
            rows = [pixel_values[i] for i in active]
            px = torch.cat(rows).to(dev) if any(len(r) for r in rows) else None  # [n_images, C, H, W]
        sizes = [s for i in active for s in image_sizes[i]] if image_sizes is not None else None
        lens = [len(seqs[i]) for i in active]
        logits, _ = model(ids.to(dev), pixel_values=px, seq_lens=[[n] for n in lens], image_sizes=sizes)  # [B, T, V]
        last = torch.tensor(lens, device=logits.device) - 1
        nxt = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()  # [B]
        still = []
        for i, tok in zip(active, nxt):
            if tok in stops:
                continue
            out[i].append(tok)
            seqs[i].append(tok)
            if len(out[i]) < max_new_tokens:
                still.append(i)
        active = still
    return out
