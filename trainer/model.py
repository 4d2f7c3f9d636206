"""LlavaLite: an HF vision tower, a projector (2-layer GELU MLP, or a 2x2 patch merge) and an HF causal LM, with
packed-batch attention; one fixed-resolution view per image (LLaVA-1.5) or AnyRes views (LLaVA-NeXT, trainer.anyres).

Attention of a batch (position ids restart at 0 for every sample in all modes):

    batch                       packed_attention="varlen" (default)          packed_attention="mask" (reference)
    packed (a row holds > 1)    per-sample causal SDPA ("llava_lite_varlen")  dense [B, 1, T, T] block-diagonal mask
    padded (one sample a row)   HF standard: [B, T] padding mask             dense [B, 1, T, T] block-diagonal mask
    flash_attention_* LM        flash varlen from cu_seq_lens (any batch)    same

Varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`, boundaries over the flattened B x T tokens, a padding tail
being one more segment) are what transformers' flash-attention path reads; the CUDA flash path is not tested here
(load the LM with attn_implementation="flash_attention_2" to use it). The CPU varlen function is switched on for
the one LM call only; with activation checkpointing (recomputed outside that call) packed batches use the mask.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, PreTrainedModel

from trainer.anyres import AnyRes, ImageInputs, grid_shape, image_tokens, pack_features

IGNORE_INDEX = -100
VARLEN_ATTENTION = "llava_lite_varlen"  # registered below; not in the mask interface, so transformers builds no mask
PACKED_ATTENTION_MODES = ("varlen", "mask")
PROJECTORS = ("mlp", "patch_merge")
STAGES = (1, 1.5, 2)


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA inside each segment of `cu_seq_lens_q` (over the flattened B x T tokens); q [B, H, T, D],
    k/v [B, Hkv, T, D] -> [B, T, H, D]. No [T, T] mask exists: work and memory follow the sample lengths."""
    if cu_seq_lens_q is None:
        raise ValueError(f"{VARLEN_ATTENTION} attention needs cu_seq_lens_q (LlavaLite.forward passes it)")
    B, H, T, _ = query.shape
    cu = [int(c) for c in cu_seq_lens_q.tolist()]
    if cu[0] != 0 or cu[-1] != B * T:
        raise ValueError(f"cu_seq_lens_q must run from 0 to B*T={B * T} (padding included), got {cu[0]}..{cu[-1]}")
    lens = [b - a for a, b in itertools.pairwise(cu)]  # segments never cross a row (seq_lens_from_cu checks)
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3]) for x in (query, key, value)]  # [B*T, H, D]
    outs = [
        F.scaled_dot_product_attention(  # [1, H, L, D] per segment -> [L, H, D]
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=key.shape[1] != H,
        )[0].transpose(0, 1)
        for q, k, v in zip(*(torch.split(x, lens, dim=0) for x in flat))
    ]  # split: one cat in backward
    return torch.cat(outs, dim=0).view(B, T, H, -1), None  # [B, T, H, D]


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)


def flat_cu_seqlens(seq_lens: Sequence[Sequence[int]], T: int, device: torch.device | None = None) -> torch.Tensor:
    """Sample boundaries int32 [n+1] over the flattened B x T tokens; each row's padding tail is one more segment."""
    cu = [0]
    for r, lens in enumerate(seq_lens):
        for n in lens:
            if n > 0:
                cu.append(cu[-1] + n)
        if cu[-1] < (r + 1) * T:
            cu.append((r + 1) * T)
    return torch.tensor(cu, dtype=torch.int32, device=device)


@contextmanager
def attention_implementation(lm: PreTrainedModel, name: str) -> Iterator[None]:
    """Run the LM with another registered attention function for one call (its config is restored after)."""
    config = lm.config
    old = config._attn_implementation_internal
    config._attn_implementation_internal = name  # read by every attention layer and by create_causal_mask
    try:
        yield
    finally:
        config._attn_implementation_internal = old


class Projector(nn.Module):
    """Two linear layers with a GELU between, named like transformers' LlavaMultiModalProjector."""

    merge = 1  # patches per feature side

    def __init__(self, vision_hidden: int, lm_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, lm_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_hidden, lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map vision features [N, P, Dv] to LM embeddings [N, P, D]."""
        return self.linear_2(self.act(self.linear_1(x)))


class PatchMerger(nn.Module):
    """LLaVA-OneVision-1.5's projector (after Qwen2.5-VL's PatchMerger): LayerNorm over each patch, each 2x2 block of
    neighbouring patches concatenated, then a GELU MLP: a quarter of the tokens per view."""

    merge = 2

    def __init__(self, vision_hidden: int, lm_hidden: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(vision_hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(4 * vision_hidden, 4 * vision_hidden), nn.GELU(), nn.Linear(4 * vision_hidden, lm_hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map vision features [N, P, Dv] (a g x g grid, g even, row-major) to LM embeddings [N, P/4, D]."""
        N, P, Dv = x.shape
        g = math.isqrt(P)
        if g * g != P or g % 2:
            raise ValueError(f"patch_merge needs an even square grid of patches, got {P}")
        x = self.ln_q(x).view(N, g // 2, 2, g // 2, 2, Dv).permute(0, 1, 3, 2, 4, 5)  # [N, g/2, g/2, 2, 2, Dv]
        return self.mlp(x.reshape(N, P // 4, 4 * Dv))


def make_projector(kind: str, vision_hidden: int, lm_hidden: int) -> nn.Module:
    """A fresh projector of `kind` (PROJECTORS)."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
    return (Projector if kind == "mlp" else PatchMerger)(vision_hidden, lm_hidden)


def segment_ids(seq_lens: Sequence[Sequence[int]], T: int, device: torch.device | None = None) -> torch.Tensor:
    """Sample index of every token, per row; padding after the last sample gets its own index -1-row."""
    rows = []
    for r, lens in enumerate(seq_lens):
        if sum(lens) > T:
            raise ValueError(f"row {r}: sample lengths {list(lens)} sum to {sum(lens)} > sequence length {T}")
        ids = [i for i, n in enumerate(lens) for _ in range(n)]
        rows.append(ids + [-1 - r] * (T - len(ids)))  # padding is one more block, attended by nothing else
    return torch.tensor(rows, dtype=torch.long, device=device)  # [B, T]


def seq_lens_from_cu(cu_seqlens: torch.Tensor | Sequence[int], row_len: int, n_rows: int) -> list[list[int]]:
    """Split flat cumulative sample boundaries (over `n_rows` rows of `row_len` tokens) into per-row sample lengths."""
    cu = [int(c) for c in cu_seqlens]
    if cu[-1] > n_rows * row_len:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} > {n_rows} rows x {row_len} tokens")
    out: list[list[int]] = [[] for _ in range(n_rows)]
    for a, b in itertools.pairwise(cu):
        row = a // row_len
        if (b - 1) // row_len != row:
            raise ValueError(f"cu_seqlens: sample [{a}, {b}) crosses a row boundary (row length {row_len})")
        out[row].append(b - a)
    return out


def packed_attention_mask(seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive block-diagonal causal mask [B, 1, T, T]: 0 where a token may attend, dtype-min elsewhere."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()  # [T, T]
    same = seg[:, :, None] == seg[:, None, :]  # [B, T, T]
    allowed = (same & causal)[:, None]  # [B, 1, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)  # [B, 1, T, T]


def shifted_targets(labels: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Next-token targets [B, T]: labels shifted left, IGNORE where the next token starts another sample."""
    nxt = torch.full_like(labels, IGNORE_INDEX)  # [B, T]
    nxt[:, :-1] = labels[:, 1:]
    nxt[:, :-1][seg[:, 1:] != seg[:, :-1]] = IGNORE_INDEX  # never predict across a sample boundary
    return nxt


class LlavaLite(nn.Module):
    """A readable LLaVA: penultimate-layer patch features (no CLS) -> projector -> spliced into the LM's inputs.

    With `anyres`, an image is several views (trainer.anyres): their features are laid out as LLaVA-NeXT does,
    with a learned `image_newline` after each row of the tiles' map."""

    def __init__(
        self,
        vision: CLIPVisionModel,
        lm: PreTrainedModel,
        projector: nn.Module | None = None,
        image_token_id: int | None = None,
        packed_attention: str = "varlen",
        anyres: AnyRes | None = None,
        pad_to_square: bool = True,
    ):
        super().__init__()
        self.vision, self.lm = vision, lm
        self.projector = projector or Projector(vision.config.hidden_size, lm.config.hidden_size)
        self.image_token_id = image_token_id
        self.packed_attention = packed_attention  # "varlen" (per-sample attention) or "mask" (dense reference)
        self.tile = vision.config.image_size
        self.anyres, self.pad_to_square = anyres, pad_to_square
        self.pinpoints = anyres.pinpoints(self.tile) if anyres else None
        if anyres:
            hidden = lm.config.hidden_size
            self.image_newline = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))  # as LlavaNextModel's init
        self.vision.requires_grad_(False).eval()

    @classmethod
    def from_parts(
        cls,
        vision_dir: str | Path,
        lm_dir: str | Path,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        packed_attention: str = "varlen",
        projector: str = "mlp",
        anyres: AnyRes | None = None,
        pad_to_square: bool = True,
    ) -> LlavaLite:
        """Load vision tower, LM and the `<image>` id with from_pretrained; a fresh projector (and newline) from
        `seed`."""
        vision = CLIPVisionModel.from_pretrained(str(vision_dir))
        lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
        torch.manual_seed(seed)
        return cls(
            vision,
            lm,
            make_projector(projector, vision.config.hidden_size, lm.config.hidden_size),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            packed_attention=packed_attention,
            anyres=anyres,
            pad_to_square=pad_to_square,
        )

    @property
    def feature_side(self) -> int:
        """Features per side of one view: the tower's patches per side, halved by a 2x2 patch merge."""
        return self.vision.config.image_size // self.vision.config.patch_size // self.projector.merge

    @property
    def image_tokens(self) -> int:
        """`<image>` copies per fixed-resolution image (CLS dropped); with AnyRes use tokens_for(size)."""
        if self.anyres:
            raise ValueError("an AnyRes model's image tokens depend on the image size: use tokens_for((H, W))")
        return self.feature_side**2

    def tokens_for(self, size: Sequence[int]) -> int:
        """`<image>` copies for an image of size (H, W)."""
        if not self.anyres:
            return self.feature_side**2
        return image_tokens(size, self.pinpoints, self.tile, self.feature_side, self.anyres.max_tiles)

    def image_inputs(self, processor) -> ImageInputs:
        """What turns this model's images into (pixel_values, image_sizes), from the tower's image processor."""
        return ImageInputs(processor, self.pinpoints, self.pad_to_square)

    def train(self, mode: bool = True) -> LlavaLite:
        """Switch train/eval mode; the vision tower always stays in eval (CLIP has no dropout; stage 1.5 trains it
        with its statistics fixed)."""
        super().train(mode)
        self.vision.eval()
        return self

    def trainable(self, stage: float) -> list[nn.Parameter]:
        """Set requires_grad for a stage and return the trainable params: 1 projector (+ newline), 1.5 everything
        (LLaVA-OneVision), 2 projector (+ newline) + LM."""
        if stage not in STAGES:
            raise ValueError(f"stage must be 1 (projector), 1.5 (all) or 2 (projector + LM), got {stage}")
        self.requires_grad_(True)
        self.vision.requires_grad_(stage == 1.5)
        self.lm.requires_grad_(stage != 1)
        return [p for p in self.parameters() if p.requires_grad]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected penultimate-layer patch features [n_views, P, D] of views [n_views, C, t, t], CLS dropped."""
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and self.vision.embeddings.patch_embedding.weight.requires_grad
        ):
            out = self.vision(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[-2][:, 1:]  # [n_views, P, Dv], drop CLS
        return self.projector(feats)  # [n_views, P', D]

    def image_embeddings(
        self, pixel_values: torch.Tensor, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> torch.Tensor:
        """Every image's tokens in order, [sum of tokens_for, D]: one view each, or AnyRes views by image_sizes."""
        feats = self.image_features(pixel_values)  # [n_views, P', D]
        if not self.anyres:
            return feats.reshape(-1, feats.shape[-1])
        if image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes (H, W) with its pixel_values")
        views = [1 + math.prod(grid_shape(s, self.pinpoints, self.tile)) for s in image_sizes]
        if sum(views) != feats.shape[0]:
            raise ValueError(
                f"pixel_values hold {feats.shape[0]} views; image_sizes {list(image_sizes)} need {sum(views)}"
            )
        return torch.cat(
            [
                pack_features(f, s, self.pinpoints, self.tile, self.image_newline, self.anyres.max_tiles)
                for f, s in zip(torch.split(feats, views), image_sizes)
            ]
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with `<image>` positions replaced by image features, in reading order."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T, D]
        is_image = input_ids == self.image_token_id  # [B, T]
        n_slots = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} <image> tokens but no pixel_values were given")
            return embeds
        feats = self.image_embeddings(pixel_values, image_sizes).to(embeds.dtype)  # [N, D]
        if n_slots != feats.shape[0]:
            raise ValueError(
                f"input_ids hold {n_slots} <image> tokens but the images give {feats.shape[0]} features; expand "
                f"each <image> to tokens_for(its size) copies ({self.feature_side**2} a view at fixed resolution)"
            )
        return embeds.masked_scatter(is_image[..., None], feats)  # [B, T, D]

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_lens: Sequence[Sequence[int]] | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        packed_attention: str | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] and loss: mean CE over label tokens, or `reduction="sum"`: tensor [sum, count].
        `packed_attention` overrides the model's mode ("varlen" or "mask") for this call; `image_sizes` (H, W) per
        image go with an AnyRes model's views."""
        B, T = input_ids.shape
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        mode = packed_attention or self.packed_attention
        if mode not in PACKED_ATTENTION_MODES:
            raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION_MODES}, got {mode!r}")
        if seq_lens is None:
            seq_lens = seq_lens_from_cu(cu_seqlens, T, B) if cu_seqlens is not None else [[T]] * B
        seg = segment_ids(seq_lens, T, input_ids.device)  # [B, T]
        if position_ids is None:
            position_ids = positions_from_lens(seq_lens, T).to(input_ids.device)  # [B, T]
        embeds = self.embed(input_ids, pixel_values, image_sizes)  # [B, T, D]
        logits = self._lm_logits(embeds, position_ids, seq_lens, seg, mode)  # [B, T, V]
        if labels is None:
            return logits, None
        targets = shifted_targets(labels, seg)  # [B, T]
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        count = (targets != IGNORE_INDEX).sum()
        if reduction == "sum":
            return logits, torch.stack([total, count.to(total.dtype)])
        return logits, total / count.clamp(min=1)

    def _lm_logits(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        seq_lens: Sequence[Sequence[int]],
        seg: torch.Tensor,
        mode: str,
    ) -> torch.Tensor:
        """LM logits [B, T, V] with the attention of the module docstring's table."""
        T = seg.shape[1]
        run = {"inputs_embeds": embeds, "position_ids": position_ids, "use_cache": False}
        impl = self.lm.config._attn_implementation or ""
        if mode == "varlen" and any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()):
            mode = "mask"  # recomputation in backward runs outside attention_implementation(): use the mask
        if impl.startswith("flash") or (mode == "varlen" and any(len(lens) != 1 for lens in seq_lens)):
            cu = flat_cu_seqlens(seq_lens, T, embeds.device)  # [n+1] over B x T
            longest = int((cu[1:] - cu[:-1]).max())
            varlen = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
            if impl.startswith("flash"):  # CUDA: transformers' flash varlen path (flattens B x T itself); untested
                return self.lm(**run, **varlen).logits
            with attention_implementation(self.lm, VARLEN_ATTENTION):
                return self.lm(**run, **varlen).logits
        if mode == "varlen":  # one sample per row: the standard HF padded batch
            pad = seg < 0  # [B, T]
            mask = (~pad).long() if bool(pad.any()) else None
            return self.lm(**run, attention_mask=mask).logits
        return self.lm(**run, attention_mask=packed_attention_mask(seg, embeds.dtype)).logits  # [B, 1, T, T]


def positions_from_lens(seq_lens: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """Position ids [B, T] restarting at 0 for each sample (padding continues counting from 0 too)."""
    rows = []
    for lens in seq_lens:
        pos = [i for n in lens for i in range(n)]
        rows.append(pos + list(range(T - len(pos))))
    return torch.tensor(rows, dtype=torch.long)  # [B, T]
