"""clip_score: keep the image-caption pairs whose caption fits the image (DataComp's CLIP score filter).

The score is the cosine of `embed`'s image and caption (text) embeddings. `min_score` keeps the rows at or over an
absolute threshold; `top_fraction` keeps exactly round(top_fraction * scored rows) of the whole stage input, best
first (DataComp keeps the top 30%). Global step: `analyze` scores each part (uid, score, model), `aggregate` ranks
every scored row by (score descending, uid ascending), so ties at the threshold are decided by uid whatever the
partitioning, and writes each part's decisions plus the threshold under the stage's `_work`; `process` reads its
part's decisions (the scores are computed once, in `analyze`). A row without a text embedding (no alt-text) is
rejected as `no_text_embedding` and is not counted among the scored rows. The output is thin: uid and clip_score."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curation.engine.store import atomic_write_json, empty_rejects, make_rejects, read_json, write_per_part
from curation.ops.base import Op, Params
from curation.ops.filter import usable_captions
from schemas import ClipScored, arrow_schema

SCHEMA = arrow_schema(ClipScored)
SUMMARY = pa.schema(
    [("uid", pa.string()), ("clip_score", pa.float32()), ("model", pa.dictionary(pa.int32(), pa.string()))]
)


class ClipScoreParams(Params):
    min_score: float | None = Field(
        None, ge=-1, le=1, description="keep rows whose image-caption cosine is at or over this"
    )
    top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="keep this fraction of the scored rows of the whole stage input, best first, ties by uid "
        "(DataComp: 0.3)",
    )

    @model_validator(mode="after")
    def _one_threshold(self):
        given = [k for k in ("min_score", "top_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of min_score, top_fraction; got {given or 'none'}")
        return self


def _matrix(col: pa.Array, what: str) -> np.ndarray:
    """Non-null list<float> rows -> float64 [N, D]; every row must have the same length."""
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(col) and (lengths != lengths[0]).any():
        raise ValueError(f"clip_score: {what} embeddings of different lengths in one part ({sorted(set(lengths))})")
    d = int(lengths[0]) if len(col) else 0
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), d)


def cosines(image: pa.Array, text: pa.Array) -> np.ndarray:
    """Cosine of each row's image and text embedding (both non-null), float32 [N]; a zero vector scores 0."""
    a, b = _matrix(image, "image"), _matrix(text, "text")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"clip_score: image embeddings have {a.shape[1]} dimensions and text embeddings {b.shape[1]}: "
            "not one model's towers"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("clip_score: embeddings with NaN or infinite values in the input")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # 1 for embed's L2-normalised rows
    dots = np.einsum("ij,ij->i", a, b)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0).astype(np.float32)


def _pair(score: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, more where 4 would print a score under the threshold as equal to it."""
    for digits in range(4, 10):
        a, b = f"{score:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b or score == threshold:
            return a, b
    return a, b


class ClipScore(Op):
    """Global step: score every row and set the threshold over the whole input; map step: keep or reject."""

    name = "clip_score"
    version = "1"
    Params = ClipScoreParams
    output = ClipScored

    @classmethod
    def required_columns(cls, params: ClipScoreParams) -> set[str]:
        return {"uid", "model", "image_embedding", "text_embedding"}

    @classmethod
    def optional_columns(cls, params: ClipScoreParams) -> set[str]:
        return {"caption_issue"}  # a caption filter flagged has no text embedding, by design

    def analyze(self, table: pa.Table) -> pa.Table:
        """uid, score (null where the row has no text embedding) and model id of each row."""
        text = table.column("text_embedding").combine_chunks()
        has = pc.is_valid(text)
        if "caption" in table.column_names:
            lost = pc.and_(pc.is_valid(pa.array(usable_captions(table), pa.string())), pc.invert(has))
            if (n := pc.sum(lost).as_py() or 0) > 0:
                uid = table.column("uid").filter(lost)[0].as_py()
                raise ValueError(
                    f"clip_score: {n} row(s) have a caption but no text embedding (first: {uid}): the embed stage "
                    "ran with text: false; set it to true so that captions are embedded"
                )
        image = table.column("image_embedding").combine_chunks()
        if image.null_count:
            raise ValueError("clip_score: rows without an image embedding in the input")
        scores = np.full(table.num_rows, np.nan, np.float32)
        valid = has.to_numpy(zero_copy_only=False)
        scores[valid] = cosines(image.filter(has), text.filter(has))
        return pa.table(
            {
                "uid": table.column("uid"),
                "clip_score": pa.array(scores, pa.float32(), mask=~valid),
                "model": pc.dictionary_encode(table.column("model").combine_chunks()),
            },
            schema=SUMMARY,
        )

    def aggregate(self, summaries: pa.Table | None) -> None:
        """Decide every row (uid, clip_score, keep per part under _work/decisions) and write the threshold."""
        p = self.params
        if summaries is None:
            summaries = SUMMARY.empty_table().append_column("part", pa.array([], pa.string()))
        models = sorted(m for m in pc.unique(summaries.column("model")).to_pylist() if m is not None)
        if len(models) > 1:
            raise ValueError(
                f"clip_score: the input was embedded by {len(models)} models ({', '.join(models)}); scores of "
                "different models are not comparable: rerun embed so that one model embeds every row"
            )
        scores = summaries.column("clip_score")
        scored = np.flatnonzero(pc.is_valid(scores).to_numpy(zero_copy_only=False))  # [S] rows with a score
        keep = np.zeros(summaries.num_rows, bool)
        info = {"rows": summaries.num_rows, "scored": int(scored.size), "model": models[0] if models else None}
        if p.min_score is not None:
            keep[scored] = scores.to_numpy(zero_copy_only=False)[scored].astype(np.float64) >= p.min_score
            info |= {"mode": "min_score", "threshold": p.min_score, "threshold_uid": None}
        else:
            k = round(p.top_fraction * scored.size)
            order = pc.sort_indices(
                summaries.select(["uid", "clip_score"]).take(pa.array(scored, pa.int64())),
                sort_keys=[("clip_score", "descending"), ("uid", "ascending")],
            ).to_numpy()
            keep[scored[order[:k]]] = True
            last = scored[order[k - 1]] if k else None  # the last row kept: the threshold, ties decided by uid
            info |= {
                "mode": "top_fraction",
                "top_fraction": p.top_fraction,
                "threshold": None if last is None else float(scores[int(last)].as_py()),
                "threshold_uid": None if last is None else summaries.column("uid")[int(last)].as_py(),
            }
        info["kept"] = int(keep.sum())
        decisions = summaries.select(["uid", "clip_score", "part"]).append_column("keep", pa.array(keep))
        write_per_part(decisions, self.work / "decisions")
        atomic_write_json(self.work / "threshold.json", info)

    def report(self) -> dict | None:
        """Rows scored and kept, the threshold (and, with top_fraction, the uid that closes it) and the model."""
        return read_json(self.work / "threshold.json")

    def _detail(self, score: float | None, info: dict) -> str:
        if score is None:
            return "no caption to score"
        if info["mode"] == "min_score":
            s, t = _pair(score, info["threshold"])
            return f"clip score {s} < {t} (min_score)"
        pct = f"top {self.params.top_fraction * 100:g}%"
        if info["threshold"] is None:
            return f"clip score {score:.4f}: the {pct} of {info['scored']} scored rows is no row"
        s, t = _pair(score, info["threshold"])
        if score < info["threshold"]:
            return f"clip score {s} < {t} ({pct} threshold)"
        return f"clip score {s} = {t} ({pct} threshold; tie decided by uid, kept up to {info['threshold_uid']})"

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:  # aggregate wrote no decision file for an empty part
            return SCHEMA.empty_table(), empty_rejects()
        dec = pq.read_table(self.work / "decisions" / f"{part}.parquet")
        info = read_json(self.work / "threshold.json")
        t = table.select([c for c in ("uid", "url", "caption") if c in table.column_names])
        t = t.join(dec, "uid").sort_by("uid")
        if t.num_rows != table.num_rows:
            raise RuntimeError(f"clip_score: part {part} has {table.num_rows} rows and {t.num_rows} decisions")
        keep = t.column("keep")
        out = t.filter(keep).select(SCHEMA.names).cast(SCHEMA)
        dropped = t.filter(pc.invert(keep))
        scores = dropped.column("clip_score").to_pylist()
        reasons = ["no_text_embedding" if s is None else "low_clip_score" for s in scores]
        return out, make_rejects(dropped, self.stage, reasons, [self._detail(s, info) for s in scores])
