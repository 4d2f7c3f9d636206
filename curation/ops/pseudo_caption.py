"""pseudo_caption: a caption for every image, so an image without usable alt-text can still be recaptioned and used.

LLaVA-OneVision-1.5 captions images that come without text from their top concepts. Here: an image keeps its
alt-text where it has a usable one; where the alt-text is missing or filter flagged it (`caption_failures: flag`),
its caption becomes its best feature-matched concept names joined (`"red circle, blue square"`), which the stages
after it (recaption, instruct, export) read as the image's caption. An image with neither is rejected
(`no_caption`). The output is thin: uid, caption and where the caption came from.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curation.engine.store import empty_rejects, make_rejects
from curation.ops.base import Op, Params
from curation.ops.filter import usable_captions
from schemas import PseudoCaptioned, arrow_schema

SCHEMA = arrow_schema(PseudoCaptioned)


class PseudoCaptionParams(Params):
    vocab: str = Field(description="the vocabulary Parquet the match_concepts stage matched against (names the ids)")
    k: int = Field(5, ge=1, description="concepts named in a pseudo-caption, best first")
    min_score: float | None = Field(None, description="leave out feature matches with a lower cosine")
    template: str = Field("{}", description="the pseudo-caption, {} replaced by the concept names joined by ', '")


class PseudoCaption(Op):
    """Map step: the usable alt-text, else the top concepts' names, else a `no_caption` reject."""

    name = "pseudo_caption"
    version = "1"
    Params = PseudoCaptionParams
    output = PseudoCaptioned

    @classmethod
    def required_columns(cls, params: PseudoCaptionParams) -> set[str]:
        return {"uid", "caption", "vocab", "concept_ids", "scores", "source"}

    @classmethod
    def optional_columns(cls, params: PseudoCaptionParams) -> set[str]:
        return {"caption_issue"}

    def setup(self) -> None:
        from curation.concepts.vocab import read_vocab, vocab_hash

        vocab = read_vocab(self.params.vocab)
        self.vhash, self.texts = vocab_hash(vocab), vocab.column("text").to_pylist()

    def concepts_caption(self, ids: list[int], scores: list[float | None], source: list[str]) -> str | None:
        """The names of the best `k` feature matches (substring matches read the very alt-text being replaced)."""
        p = self.params
        names = [
            self.texts[i]
            for i, s, src in zip(ids, scores, source)
            if src != "substring" and (p.min_score is None or (s is not None and s >= p.min_score))
        ][: p.k]
        return p.template.replace("{}", ", ".join(names)) if names else None

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:
            return SCHEMA.empty_table(), empty_rejects()
        if not hasattr(self, "texts"):
            self.setup()
        wrong = set(table.column("vocab").to_pylist()) - {self.vhash}
        if wrong:
            raise ValueError(
                f"stage '{self.stage}': concepts were matched against vocabulary {sorted(wrong)} but vocab "
                f"{self.params.vocab} is {self.vhash}: give pseudo_caption the match_concepts stage's vocabulary"
            )
        rows, bad = [], []
        base = table.select([c for c in ("uid", "url", "caption") if c in table.column_names]).to_pylist()
        cols = [table.column(c).to_pylist() for c in ("concept_ids", "scores", "source")]
        for src, cap, ids, scores, source in zip(base, usable_captions(table), *cols):
            if cap is not None and cap.strip():
                rows.append({"uid": src["uid"], "caption": cap, "caption_source": "alt_text"})
            elif made := self.concepts_caption(ids, scores, source):
                rows.append({"uid": src["uid"], "caption": made, "caption_source": "concepts"})
            else:
                bad.append(src)
        over = "" if self.params.min_score is None else f" with a cosine >= {self.params.min_score}"
        detail = f"no usable alt-text and no feature-matched concept{over}"
        return pa.Table.from_pylist(rows, schema=SCHEMA).sort_by("uid"), make_rejects(
            bad, self.stage, "no_caption", detail
        )
