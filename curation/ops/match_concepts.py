"""match_concepts: each image's concepts, by FAISS top-K over the vocabulary embeddings and/or substrings of its
caption."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curation.engine.store import empty_rejects, make_rejects
from curation.ops.base import Op, Params, Placement
from curation.ops.filter import usable_captions
from schemas import ConceptMatch, arrow_schema

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class MatchParams(Params):
    vocab: str = Field(description="vocabulary Parquet from `curate vocab build` or `curate vocab import`")
    mode: Literal["feature", "substring", "hybrid"] = Field(
        "feature",
        description="feature: top-K by cosine (LLaVA-OneVision-1.5); substring: MetaCLIP's caption matcher; "
        "hybrid: both",
    )
    k: int = Field(20, ge=1, description="feature matches per image")
    min_score: float | None = Field(None, description="drop feature matches with a lower cosine")
    index: Literal["flat", "ivf"] = Field("flat", description="flat is exact; ivf is faster, recall measured in bench/")
    nlist: int = Field(1024, ge=1)
    nprobe: int = Field(8, ge=1)
    model: str = Field("ViT-H-14-quickgelu", description="text tower for the vocabulary: the embed stage's model")
    pretrained: str | None = "metaclip_fullcc"
    precision: Precision = "auto"
    template: str = Field("{}", description="text embedded for each entry, e.g. 'a photo of {}'")
    cache_dir: str | None = Field(
        None, description="concept embedding cache; default $CURATION_CACHE or ~/.cache/curation"
    )
    space_entries: bool = Field(True, description="apply MetaCLIP's punctuation spacing to entries too")
    batch_size: int = Field(256, ge=1, description="vocabulary entries per text-tower batch")


class MatchConcepts(Op):
    """Top-K concepts per image embedding, caption substrings, or the union with provenance per match."""

    name = "match_concepts"
    version = "1"
    Params = MatchParams
    output = ConceptMatch
    max_inputs = 3

    def placement(self) -> Placement:
        return Placement(actor=True)  # the index is loaded once per actor

    @classmethod
    def required_columns(cls, params: MatchParams) -> set[str]:
        feature = {"uid", "model", "image_embedding"} if params.mode != "substring" else set()
        return {"uid"} | feature | ({"caption"} if params.mode != "feature" else set())

    @classmethod
    def optional_columns(cls, params: MatchParams) -> set[str]:
        return {"caption_issue"} if params.mode != "feature" else set()  # flagged captions are not matched

    @property
    def uses_features(self) -> bool:
        return self.params.mode != "substring"

    def _cache(self):
        from curation.concepts.clip import model_id_for
        from curation.concepts.embeddings import ConceptCache

        p = self.params
        return ConceptCache(p.vocab, model_id_for(p.model, p.pretrained, p.precision), p.template, p.cache_dir)

    def prepare(self) -> None:
        """Embed the vocabulary with the text tower and build the index, once per (model, vocabulary, template)."""
        if not self.uses_features:
            return
        cache, p = self._cache(), self.params
        if not cache.ready():
            from curation.concepts.clip import load_clip

            cache.build(load_clip(p.model, p.pretrained, p.precision), batch_size=p.batch_size)
        cache.index(p.index, p.nlist, p.nprobe)

    def setup(self) -> None:
        from curation.concepts.vocab import read_vocab, vocab_hash

        p = self.params
        if self.uses_features:
            cache = self._cache()
            self.vhash, self.model_id = cache.vhash, cache.model_id
            self.index, self.vectors = cache.index(p.index, p.nlist, p.nprobe), cache.embeddings()
            texts = cache.vocab.column("text").to_pylist()
        else:
            vocab = read_vocab(p.vocab)
            self.vhash, texts = vocab_hash(vocab), vocab.column("text").to_pylist()
        if p.mode != "feature":
            from curation.concepts.substring import SubstringMatcher

            self.matcher = SubstringMatcher(texts, p.space_entries)

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        rejects = empty_rejects()
        if self.uses_features:
            missing = pc.is_null(table.column("image_embedding"))
            rejects = make_rejects(table.filter(missing), self.stage, "no_embedding")
            table = table.filter(pc.invert(missing))
            models = set(table.column("model").to_pylist())
            if models - {self.model_id}:
                raise ValueError(
                    f"stage '{self.stage}': embeddings were made by {sorted(models)} but the vocabulary is "
                    f"embedded with {self.model_id!r}; set model/pretrained/precision like the embed stage"
                )
        if table.num_rows == 0:
            return arrow_schema(ConceptMatch).empty_table(), rejects
        feats, query = self._feature_matches(table) if self.uses_features else (None, None)
        subs = self.matcher.match_many(usable_captions(table)) if self.params.mode != "feature" else None
        rows = []
        for i, uid in enumerate(table.column("uid").to_pylist()):
            ids, scores, source = feats[i] if feats else ([], [], [])
            if subs is not None:
                ids, scores, source = self._union(ids, scores, source, subs[i], query[i] if feats else None)
            rows.append({"uid": uid, "vocab": self.vhash, "concept_ids": ids, "scores": scores, "source": source})
        out = pa.Table.from_pylist(rows, schema=arrow_schema(ConceptMatch)).sort_by("uid")
        return out, rejects

    def _feature_matches(self, table: pa.Table) -> tuple[list[tuple[list[int], list[float], list[str]]], np.ndarray]:
        """Top-K (ids, scores, sources) per row, and the query embeddings [N, D] they were searched with."""
        col = table.column("image_embedding").combine_chunks()
        query = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)  # [N, D]
        scores, ids = self.index.search(query, self.params.k)  # [N, k], [N, k]
        keep = ids >= 0
        if self.params.min_score is not None:
            keep &= scores >= self.params.min_score
        matches = [
            (ids[i][keep[i]].tolist(), scores[i][keep[i]].tolist(), ["feature"] * int(keep[i].sum()))
            for i in range(len(ids))
        ]
        return matches, query

    def _union(self, ids, scores, source, sub_ids, query):
        """Feature matches (best first) marked 'both' when the caption has them too, then caption-only matches."""
        sub = set(sub_ids)
        source = ["both" if c in sub else s for c, s in zip(ids, source)]
        extra = [c for c in sub_ids if c not in set(ids)]
        if query is None or not extra:
            return ids + extra, scores + [None] * len(extra), source + ["substring"] * len(extra)
        cos = np.asarray(self.vectors[extra], dtype=np.float32) @ query  # [E] cosines (unit vectors)
        order = np.argsort(-cos, kind="stable")
        return (ids + [extra[j] for j in order], scores + cos[order].tolist(), source + ["substring"] * len(extra))
