"""embed: open_clip image (and caption) embeddings per image; images that do not decode are rejected."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation.engine.store import empty_rejects, make_rejects
from curation.ops.base import Op, Params, Placement
from curation.ops.filter import usable_captions
from schemas import Embedding, arrow_schema

SCHEMA = arrow_schema(Embedding)


class EmbedParams(Params):
    model: str = Field("ViT-H-14-quickgelu", description="open_clip model name")
    pretrained: str | None = Field(
        "metaclip_fullcc", description="open_clip tag (cached locally) or a local checkpoint path"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA or a bf16 CPU, else fp32"
    )
    batch_size: int = Field(32, ge=1)
    text: bool = Field(True, description="also embed the caption with the text tower (null caption -> null)")


def _list_array(emb: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """float32 [N, D] -> list<float32> array; rows where valid is False are null."""
    n, d = emb.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    mask = None if valid is None else pa.array(~valid)
    return pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1), pa.float32()), mask=mask)


class Embed(Op):
    """Image embeddings with the text tower's caption embeddings, one model per actor."""

    name = "embed"
    version = "1"
    Params = EmbedParams
    output = Embedding

    def placement(self) -> Placement:
        return Placement(actor=True)  # the model is built once per actor

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = None

    @classmethod
    def required_columns(cls, params: EmbedParams) -> set[str]:
        return {"uid", "image", "caption"} if params.text else {"uid", "image"}

    @classmethod
    def optional_columns(cls, params: EmbedParams) -> set[str]:
        return {"caption_issue"} if params.text else set()  # a caption filter flagged is not embedded

    def setup(self) -> None:
        import torch

        from curation.concepts.clip import load_clip

        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # Ray sets it to the actor's num_cpus
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        p = self.params
        self.clip = load_clip(p.model, p.pretrained, precision=p.precision)

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:
            return SCHEMA.empty_table(), empty_rejects()
        if self.clip is None:
            self.setup()
        table = table.sort_by("uid")
        emb, ok, errors = self.clip.encode_images(table.column("image").to_pylist(), self.params.batch_size)
        kept = table.take(pa.array(ok, pa.int64()))
        text = pa.nulls(len(ok), SCHEMA.field("text_embedding").type)
        if self.params.text and "caption" in kept.column_names:
            captions = usable_captions(kept)
            has = np.array([c is not None for c in captions], dtype=bool)  # [N_ok]
            vecs = np.zeros((len(ok), self.clip.dim), np.float32)  # [N_ok, D]
            if has.any():
                vecs[has] = self.clip.encode_texts([c for c in captions if c is not None])
            text = _list_array(vecs, has)
        out = pa.Table.from_arrays(
            [kept.column("uid"), pa.array([self.clip.model_id] * len(ok), pa.string()), _list_array(emb), text],
            schema=SCHEMA,
        )
        bad = sorted(errors)
        rejects = make_rejects(
            table.take(pa.array(bad, pa.int64())), self.stage, "decode_error", [errors[i] for i in bad]
        )
        return out, rejects
