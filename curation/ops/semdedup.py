"""semdedup: semantic duplicates over embed's image embeddings (SemDeDup, as NeMo Curator ships it; issue 15).

Global step: each part's summary is its uids, embeddings and pixel counts; `aggregate` puts every row in priority
order (most pixels where a stage before wrote the sizes, then smallest uid: the same order whatever the parts),
clusters with seeded FAISS k-means trained on a bounded sample, and within each cluster keeps greedy leaders
(curation.dedup.semantic): an image is a `semantic_duplicate` of the first kept image whose cosine with it is
>= 1 - eps. The output is thin (uid, cluster, group size); the image stays in the source stage's rows."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curation.dedup.semantic_parts import semantic_dedup_parts
from curation.engine.store import atomic_write_json, empty_rejects, make_rejects
from curation.ops.base import Op, Params
from schemas import SemDeduped, arrow_schema

SIZE = ("original_width", "original_height")


class SemDedupParams(Params):
    eps: float = Field(
        0.01, gt=0, lt=1, description="images whose embeddings' cosine is >= 1 - eps are semantic duplicates"
    )
    n_clusters: int | None = Field(None, ge=1, description="k-means clusters; null: rows / rows_per_cluster")
    rows_per_cluster: int = Field(1000, ge=1, description="average cluster size when n_clusters is null")
    sample: int = Field(65536, ge=1, description="rows the k-means is trained on (a seeded random sample)")
    niter: int = Field(20, ge=1, description="k-means iterations")
    seed: int = Field(0, description="seed of the sample and the k-means")
    bucket_mib: int = Field(
        1024, ge=1, description="embeddings one pairwise task holds: clusters are spread over bytes / bucket_mib tasks"
    )
    ADDED_LATER: ClassVar[dict] = {"bucket_mib": 1024}  # how the work is spread, not what is decided


class SemDedup(Op):
    """Global step: cluster all image embeddings, keep one image per set of semantic duplicates."""

    name = "semdedup"
    version = "1"
    Params = SemDedupParams
    output = SemDeduped

    @classmethod
    def required_columns(cls, params: SemDedupParams) -> set[str]:
        return {"uid", "image_embedding"}

    @classmethod
    def optional_columns(cls, params: SemDedupParams) -> set[str]:
        return set(SIZE)  # the bigger image of a pair is kept, where ingest's sizes are in the lineage

    def analyze(self, table: pa.Table) -> pa.Table:
        if all(c in table.column_names for c in SIZE):
            w, h = (table.column(c).cast(pa.int64()) for c in SIZE)
            pixels = pc.fill_null(pc.multiply(w, h), 0)
        else:
            pixels = pa.array(np.zeros(table.num_rows, np.int64))
        return pa.table({"uid": table.column("uid"), "embedding": table.column("image_embedding"), "pixels": pixels})

    def aggregate_files(self, analyses: dict[str, Path]) -> None:
        """Decision files per part (uid, kept uid (null when kept), cosine, cluster, group size), the clusters spread
        over tasks (curation.dedup.semantic_parts): no task holds every embedding."""
        p = self.params
        summary = semantic_dedup_parts(
            analyses,
            self.work / "decisions",
            p.eps,
            n_clusters=p.n_clusters,
            rows_per_cluster=p.rows_per_cluster,
            sample=p.sample,
            seed=p.seed,
            niter=p.niter,
            bucket_bytes=p.bucket_mib << 20,
        )
        atomic_write_json(self.work / "clusters.json", summary)  # rows, clusters, buckets

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:  # aggregate wrote no decision file for an empty part
            return arrow_schema(SemDeduped).empty_table(), empty_rejects()
        dec = pa.concat_tables([pq.read_table(f) for f in sorted((self.work / "decisions" / part).glob("*.parquet"))])
        t = table.select([c for c in ("uid", "url", "caption") if c in table.column_names])
        t = t.join(dec, "uid").sort_by("uid")
        keep = pc.is_null(t.column("kept_uid"))
        kept = t.filter(keep)
        out = pa.table(
            {
                "uid": kept.column("uid"),
                "sem_cluster": kept.column("sem_cluster"),
                "sem_dup_count": kept.column("sem_dup_count"),
            },
            schema=arrow_schema(SemDeduped),
        )
        dups = t.filter(pc.invert(keep))
        details = [
            f"semantic duplicate of {k} (cosine {c:.4f})"
            for k, c in zip(dups.column("kept_uid").to_pylist(), dups.column("cosine").to_pylist())
        ]
        return out, make_rejects(dups, self.stage, "semantic_duplicate", details)
