"""Training configuration: a validated YAML file (pydantic, unknown keys rejected) plus `k=v` overrides.

Example (stage 2 on an instruct stage's shards, starting from a stage-1 run):

    stage: 2
    shards: [/shared/run/instruct_conversation, /shared/run/instruct_short_answer]
    vision: /models/clip-vit-large-patch14-336   # HF CLIPVisionModel folder (+ its image processor)
    lm: /models/Qwen2.5-0.5B-Instruct           # HF causal LM folder with its tokenizer (needs an <image> token)
    out: /shared/train/stage2
    init_from: /shared/train/stage1             # a stage-1 `out` (its final/ or latest checkpoint)
    max_len: 4096
    rows_per_step: 16
    max_steps: 5000
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.overrides import OverrideError, apply_overrides, parse_overrides
from trainer.anyres import AnyRes

# The real default parts (local folders; nothing is downloaded): an HF CLIP ViT-L/14 at 336 px as the vision
# tower (openai/clip-vit-large-patch14-336, 576 patch tokens) and a small HF causal LM such as
# Qwen/Qwen2.5-0.5B-Instruct whose tokenizer has an `<image>` special token. Tests use trainer.tiny's models.
DEFAULT_VISION = "models/clip-vit-large-patch14-336"
DEFAULT_LM = "models/qwen2.5-0.5b-instruct"

# LLaVA: stage 1 projector lr 1e-3, stage 2 projector + LM 2e-5; LLaVA-NeXT / OneVision stage 1.5 (every part):
# 1e-5, the vision tower 2e-6
LR_DEFAULT = {1: 1e-3, 1.5: 1e-5, 2: 2e-5}
VISION_LR_DEFAULT = 2e-6
TEMPLATE_DEFAULT = {1: "plain", 1.5: "chat", 2: "chat"}


class TrainConfig(BaseModel):
    """Everything a training run depends on; `out` holds packed data, log.jsonl, checkpoints/ and final/."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal[1, 1.5, 2]  # 1 projector; 1.5 every part (vision at vision_lr); 2 projector + LM
    shards: list[str] = Field(min_length=1, description="Instruction shard files or directories of part-*.parquet")
    vision: str = DEFAULT_VISION
    lm: str = DEFAULT_LM
    projector: Literal["mlp", "patch_merge"] = "mlp"  # LLaVA's 2-layer MLP, or OneVision-1.5's 2x2 patch merge
    anyres: AnyRes | None = None  # LLaVA-NeXT's tiles + base view (trainer.anyres); None: one view per image
    pad_to_square: bool = True  # one view: LLaVA-1.5's pad to a square first; false: the processor's centre crop
    out: str
    template: Literal["plain", "chat"] | None = None  # default: plain for stage 1, chat for stage 2
    system: str | None = None  # system message for the chat template
    max_len: int = Field(4096, ge=8)
    packing: bool = True  # false: one sample per row, padded to the longest row of the batch (the baseline)
    pack_method: Literal["gap_aware", "bfd"] = "gap_aware"  # trainer.pack: gap-aware best fit, or plain BFD
    rows_per_step: int = Field(8, ge=1, description="packed rows per optimizer step")
    micro_rows: int | None = Field(None, ge=1, description="rows per forward (gradient accumulation); default all")
    lr: float | None = Field(None, gt=0)  # default 1e-3 stage 1, 1e-5 stage 1.5, 2e-5 stage 2
    vision_lr: float | None = Field(None, gt=0)  # stage 1.5's vision tower; default 2e-6
    schedule: Literal["cosine", "constant"] = "cosine"  # after linear warmup
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)  # default: epochs x steps per epoch
    epochs: int = Field(1, ge=1)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    init_from: str | None = None  # a checkpoint dir, a run's out dir (final/ or latest checkpoint)
    fsdp: bool = False  # shard the LM over ranks (FSDP2; trainer/distributed.py); needs a multi-process launch

    @model_validator(mode="after")
    def _stage_defaults(self) -> TrainConfig:
        if self.template is None:
            self.template = TEMPLATE_DEFAULT[self.stage]
        if self.lr is None:
            self.lr = LR_DEFAULT[self.stage]
        if self.vision_lr is not None and self.stage != 1.5:
            raise ValueError(f"vision_lr applies to stage 1.5 (the vision tower trains), not stage {self.stage}")
        if self.stage == 1.5 and self.vision_lr is None:
            self.vision_lr = VISION_LR_DEFAULT
        return self

    def data_key(self) -> dict:
        """The fields the packed data depends on (a change rebuilds out/packed)."""
        return {
            k: getattr(self, k)
            for k in ("shards", "lm", "vision", "template", "system", "max_len", "packing", "pack_method", "projector")
        } | {"anyres": self.anyres.model_dump() if self.anyres else None}  # image tokens per sample


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file and field."""


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a YAML config and apply overrides (`k=v` strings, values parsed as YAML, or a dict)."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if isinstance(overrides, dict):
        tree.update(overrides)
    else:
        try:
            apply_overrides(tree, parse_overrides(overrides or []))
        except OverrideError as e:
            raise ConfigError(str(e)) from None
    try:
        return TrainConfig(**tree)
    except Exception as e:  # pydantic.ValidationError names each bad field
        raise ConfigError(f"{path or '<overrides>'}: {e}") from e
