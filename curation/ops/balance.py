"""balance: count concepts over the whole pool, then keep the tail and thin the head (MetaCLIP or inverse frequency)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curation.concepts import sampling as bal
from curation.engine.store import (
    atomic_write_json,
    atomic_write_parquet,
    empty_rejects,
    make_rejects,
    read_json,
    write_per_part,
)
from curation.ops.base import Op, Params
from schemas import Balanced, arrow_schema


class BalanceParams(Params):
    method: Literal["metaclip", "inverse_frequency"] = Field(
        "metaclip",
        description="metaclip: keep with 1 - prod(1 - min(1, t/count)); inverse_frequency: "
        "draw target images without replacement, weight = sum (or mean) of 1/count^power (LLaVA-OneVision-1.5)",
    )
    t: float | None = Field(None, gt=0, description="metaclip threshold (20,000 for a 400M pool)")
    tail_mass: float | None = Field(
        None, gt=0, le=1, description="metaclip: pick t so the tail entries hold this share of matches"
    )
    target_size: int | None = Field(None, ge=0, description="images to keep (expected size for metaclip)")
    target_fraction: float | None = Field(
        None, gt=0, le=1, description="images to keep, as a fraction of the images with concepts"
    )
    seed: int = 0
    reduce: Literal["sum", "mean"] = "sum"
    power: float = Field(
        1.0,
        gt=0,
        description="inverse_frequency: the exponent of 1/count (a sampling temperature); > 1 thins the head harder "
        "(bench/RESULTS.md: 3 keeps 3x random's tail share at 25% on substring matches, 1 keeps 1.6x)",
    )
    min_weight: float = Field(
        0.0, ge=0, description="inverse_frequency: weight floor; > 0 lets images without concepts be drawn"
    )
    vocab: str | None = Field(
        None, description="vocabulary Parquet: names the entries in coverage.parquet and sets their number"
    )
    ADDED_LATER: ClassVar[dict[str, Any]] = {"power": 1.0}

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in ("t", "tail_mass", "target_size", "target_fraction") if getattr(self, k) is not None]
        allowed = (
            ("target_size", "target_fraction")
            if self.method == "inverse_frequency"
            else ("t", "tail_mass", "target_size", "target_fraction")
        )
        if len(given) != 1 or given[0] not in allowed:
            raise ValueError(f"method {self.method} needs exactly one of {', '.join(allowed)}; got {given or 'none'}")
        if self.method == "metaclip" and self.power != 1.0:
            raise ValueError("power is inverse_frequency's exponent; metaclip thins the head by t")
        return self


class Balance(Op):
    """Global step: concept counts and the selection over all parts; map step: keep or reject each image."""

    name = "balance"
    version = "2"  # 2: thin rows (uid, concepts, weight); the image stays in the source stage's rows
    Params = BalanceParams
    output = Balanced
    max_inputs = 3

    @classmethod
    def required_columns(cls, params: BalanceParams) -> set[str]:
        return {"uid", "vocab", "concept_ids"}

    def analyze(self, table: pa.Table) -> pa.Table:
        return table.select(["uid", "concept_ids"])

    def aggregate(self, summaries: pa.Table | None) -> None:
        p = self.params
        summaries = (
            summaries
            if summaries is not None
            else pa.table(
                {"uid": [], "concept_ids": [], "part": []},
                schema=pa.schema([("uid", pa.string()), ("concept_ids", pa.list_(pa.int64())), ("part", pa.string())]),
            )
        )
        lists = summaries.column("concept_ids").combine_chunks()
        uids = np.asarray(summaries.column("uid").to_pylist(), dtype=object)
        offsets, ids = bal.dedupe_rows(
            np.asarray(lists.offsets) - lists.offsets[0].as_py(), np.asarray(lists.flatten(), np.int64)
        )
        texts = self._texts()
        n_concepts = len(texts) if texts is not None else int(ids.max() + 1 if ids.size else 1)
        counts = bal.concept_counts(ids, n_concepts)
        matched = int((np.diff(offsets) > 0).sum())
        target = (
            p.target_size
            if p.target_size is not None
            else (round(p.target_fraction * matched) if p.target_fraction is not None else None)
        )
        keep, weight, t = bal.select(
            uids,
            offsets,
            ids,
            counts,
            p.method,
            target,
            t=p.t,
            tail_mass=p.tail_mass,
            seed=p.seed,
            reduce=p.reduce,
            power=p.power,
            min_weight=p.min_weight,
        )
        before, after = bal.coverage(offsets, ids, n_concepts, None, t), bal.coverage(offsets, ids, n_concepts, keep, t)
        kept_counts = bal.concept_counts(ids[np.repeat(keep, np.diff(offsets))], n_concepts)
        present = np.flatnonzero(counts)
        cov = {
            "concept_id": pa.array(present, pa.int64()),
            "count_before": pa.array(counts[present], pa.int64()),
            "count_after": pa.array(kept_counts[present], pa.int64()),
        }
        if texts is not None:
            cov["text"] = pa.array([texts[i] for i in present], pa.string())
        atomic_write_parquet(
            pa.table(cov).sort_by([("count_before", "descending"), ("concept_id", "ascending")]), self.coverage_path
        )
        atomic_write_json(
            self.work / "report.json",
            {
                "method": p.method,
                "t": t,
                "target": target,
                "seed": p.seed,
                "power": p.power,
                "pool": int(uids.size),
                "with_concepts": matched,
                "selected": int(keep.sum()),
                "n_concepts": n_concepts,
                "coverage_before": before,
                "coverage_after": after,
            },
        )
        sel = pa.table(
            {
                "uid": summaries.column("uid"),
                "keep": pa.array(keep),
                "weight": pa.array(weight, pa.float64()),
                "n": pa.array(np.diff(offsets)),
                "part": summaries.column("part"),
            }
        )
        write_per_part(sel, self.work / "selection")

    @property
    def coverage_path(self):
        return self.work.parent / "coverage.parquet"

    def _texts(self) -> list[str] | None:
        if self.params.vocab is None:
            return None
        from curation.concepts.vocab import read_vocab

        return read_vocab(self.params.vocab).column("text").to_pylist()

    def report(self) -> dict | None:
        return read_json(self.work / "report.json")

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        schema = arrow_schema(Balanced)
        if table.num_rows == 0:
            return schema.empty_table(), empty_rejects()
        sel = pq.read_table(self.work / "selection" / f"{part}.parquet")
        idx = pc.index_in(table.column("uid"), value_set=sel.column("uid"))
        keep, weight, n = (sel.column(c).take(idx) for c in ("keep", "weight", "n"))
        t = table.append_column("sample_weight", weight)
        out = t.filter(keep).select(schema.names).sort_by("uid")
        dropped = t.filter(pc.invert(keep))
        no_concepts = pc.equal(n.filter(pc.invert(keep)), 0).to_pylist()
        w = dropped.column("sample_weight").to_pylist()
        label = "keep probability" if self.params.method == "metaclip" else "weight"
        reasons = ["no_concepts" if z else "balanced_out" for z in no_concepts]
        details = [None if z else f"{label} {x:.4g}" for z, x in zip(no_concepts, w)]
        return out, make_rejects(dropped, self.stage, reasons, details)
