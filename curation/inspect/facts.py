"""Facts for `curate report` and `curate view`: a run dir's manifests and Parquet outputs, read with polars."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from curation.engine.status import coverage_rows, run_status
from curation.engine.store import StageDir
from schemas.rundir import RunDir, resolve

SYNTH_OPS = ("recaption", "instruct")
PART = "_part"  # scan(parts=True): the name of the part file a row is in (its uid is in that part of earlier stages)


class RunFacts:
    """A run dir: per-stage status (from `curate status`), manifests and lazy scans of parts and rejects."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.status = run_status(self.root)
        self.manifests = {s["stage"]: StageDir(self.root, s["stage"]).manifest() for s in self.status["stages"]}
        self.dir = RunDir(self.root)

    def stages(self, *ops: str) -> list[str]:
        """Stages in pipeline order that have a manifest (and run one of `ops`, when given)."""
        return [s for s, m in self.manifests.items() if m and (not ops or m["op"] in ops)]

    def op(self, stage: str) -> str | None:
        m = self.manifests.get(stage)
        return m["op"] if m else None

    def files(self, stage: str, rejects: bool = False) -> list[Path]:
        return sorted((self.root / stage / ("rejects" if rejects else "")).glob("part-*.parquet"))

    def scan(self, stage: str, rejects: bool = False, parts: bool = False) -> pl.LazyFrame | None:
        """A stage's rows (or rejects), lazily; parts=True adds the PART column."""
        files = self.files(stage, rejects)
        if not files:
            return None
        if not parts:
            return pl.scan_parquet(files)
        lf = pl.scan_parquet(files, include_file_paths=PART)
        return lf.with_columns(pl.col(PART).str.extract(r"([^/]+)\.parquet$"))

    def columns(self, stage: str) -> list[str]:
        files = self.files(stage)
        return list(pl.read_parquet_schema(files[0])) if files else []

    def lineage(self, stage: str, columns: Iterable[str], rejects: bool = False) -> dict[str, str]:
        """Column -> the stage that wrote it for the stage's rows (for its rejects: for the rows it was given)."""
        if not rejects:
            return self.dir.lineage(stage, columns)
        return resolve(self.dir.inputs(stage), columns, self.dir.columns, self.dir.inputs)

    def lookup(self, stage: str, rows: pl.DataFrame, columns: Iterable[str], rejects: bool = False) -> pl.DataFrame:
        """`rows` (of the stage, with uid and maybe PART) with the columns it lacks added by uid, each read from the
        stage that wrote it: from the same parts only, and only those rows' uids (null where a stage has none)."""
        todo = [c for c in dict.fromkeys(columns) if c not in rows.columns]
        by_stage: dict[str, list[str]] = {}
        for column, s in self.lineage(stage, todo, rejects).items():
            by_stage.setdefault(s, []).append(column)
        for s, cols in sorted(by_stage.items()):
            lf = self.written(s, rows)
            found = lf.select("uid", *cols) if lf is not None else pl.LazyFrame(schema={"uid": pl.String})
            rows = rows.join(found.unique("uid", keep="first").collect(), on="uid", how="left")
        return rows.with_columns(pl.lit(None).alias(c) for c in todo if c not in rows.columns)

    def written(self, stage: str, rows: pl.DataFrame) -> pl.LazyFrame | None:
        """The stage's rows with the uids of `rows`, scanning only the parts named in its PART, if any."""
        uids = rows["uid"].drop_nulls().unique()
        parts = set(rows[PART].drop_nulls()) if PART in rows.columns else set()
        files = [f for f in self.files(stage) if not parts or f.stem in parts]
        return pl.scan_parquet(files).filter(pl.col("uid").is_in(uids.implode())) if files and len(uids) else None

    def image_stages(self) -> list[str]:
        """Stages with rows that are images (not synthesis outputs): ingest and the stages deciding on its images
        (dedup, filter, balance...), whose image and alt-text a stage before them wrote."""
        return [
            s
            for s in self.stages()
            if self.op(s) not in SYNTH_OPS
            and "uid" in self.columns(s)
            and {"image", "caption"} <= set(self.lineage(s, ["image", "caption"]))
        ]

    def images(self, uids: list[str], size: int = 160, parts: list[str] | None = None) -> dict[str, str]:
        """Thumbnails (data URIs) of the given uids (in the given parts of their stages, when known), read where the
        image stages' images were written."""
        rows = pl.DataFrame(
            {"uid": uids, PART: parts or [None] * len(uids)}, schema={"uid": pl.String, PART: pl.String}
        )
        out: dict[str, str] = {}
        for stage in dict.fromkeys(self.lineage(s, ["image"])["image"] for s in self.image_stages()):
            lf = self.written(stage, rows.filter(~pl.col("uid").is_in(list(out))))
            if lf is not None:
                for uid, data in lf.select("uid", "image").collect().iter_rows():
                    out.setdefault(uid, thumbnail(data, size))
        return out


def thumbnail(data: bytes | None, size: int = 160) -> str:
    """A JPEG data URI of an encoded image scaled to fit size x size; '' when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # untrusted bytes: any decoder failure means no thumbnail
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel(run: RunFacts) -> list[dict]:
    """Rows in/out/rejected and rejects by reason per stage, as `curate status` counts them."""
    return [s for s in run.status["stages"] if "in" in s]


def dedup(run: RunFacts, top: int = 6) -> dict | None:
    """Duplicate groups of the dedup stage: totals, group-size distribution, the largest groups with thumbnails."""
    stages = [s for s in run.stages("dedup") if (run.root / s / "groups.parquet").exists()]
    if not stages:
        return None
    stage = stages[0]
    groups = pl.read_parquet(run.root / stage / "groups.parquet")
    sizes = groups.group_by("rep_uid").agg(pl.len().alias("size"))
    big = sizes.filter(pl.col("size") > 1).sort(["size", "rep_uid"], descending=[True, False]).head(top)
    members = groups.filter(pl.col("rep_uid").is_in(big["rep_uid"].to_list()))
    thumbs = run.images(members["uid"].to_list(), 96, members["part"].to_list() if "part" in members.columns else None)
    shown = []
    for rep, size in big.iter_rows():
        rows = members.filter(pl.col("rep_uid") == rep).sort(pl.col("uid") != rep)
        shown.append(
            {
                "rep_uid": rep,
                "size": size,
                "members": [
                    {
                        "uid": r["uid"],
                        "reason": r["reason"],
                        "distance": r["distance"],
                        "thumb": thumbs.get(r["uid"], ""),
                    }
                    for r in rows.iter_rows(named=True)
                ],
            }
        )
    reasons = groups["reason"].drop_nulls().value_counts().sort("reason")
    return {
        "stage": stage,
        "images": groups.height,
        "groups": sizes.height,
        "multi_groups": int((sizes["size"] > 1).sum()),
        "by_reason": dict(reasons.iter_rows()),
        "size_counts": dict(sizes["size"].value_counts().sort("size").iter_rows()),
        "top": shown,
    }


def coverage(run: RunFacts, top: int = 15) -> dict | None:
    """Concept coverage before and after balancing: the report's metrics and the per-concept counts."""
    stages = run.stages("balance")
    if not stages:
        return None
    stage = stages[-1]
    report = run.manifests[stage].get("report") or {}
    path = run.root / stage / "coverage.parquet"
    if "coverage_before" not in report or not path.exists():
        return None
    cov = pl.read_parquet(path)
    return {
        "stage": stage,
        "report": report,
        "metrics": coverage_rows(report),
        "before": sorted((c for c in cov["count_before"].to_list() if c), reverse=True),
        "after": sorted((c for c in cov["count_after"].to_list() if c), reverse=True),
        "top": cov.sort(["count_before", "concept_id"], descending=[True, False]).head(top).to_dicts(),
    }


def _words(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.extract_all(r"\S+").list.len()


def lengths(run: RunFacts) -> dict:
    """Word counts of alt-text captions, recaptions and conversations (per instruct stage), and turns per
    conversation."""
    out: dict = {"captions": {}, "conversations": {}, "turns": {}}
    images = run.image_stages()
    if images:
        stage = images[-1]
        rows = run.lookup(stage, run.scan(stage, parts=True).select("uid", PART).collect(), ["caption"])
        out["captions"][f"alt-text ({stage})"] = rows.select(_words("caption")).to_series().to_list()
    for stage in run.stages("recaption"):
        lf = run.scan(stage)
        if lf is not None:
            out["captions"][f"recaption ({stage})"] = lf.select(_words("recaption")).collect().to_series().to_list()
    for stage in run.stages("instruct"):
        lf = run.scan(stage)
        if lf is None:
            continue
        df = lf.select("conversations").collect().with_row_index("row")
        turns = df.explode("conversations").unnest("conversations").with_columns(words=_words("value"))
        per = turns.group_by("row").agg(pl.col("words").sum(), pl.len().alias("turns")).sort("row")
        out["conversations"][stage] = per["words"].to_list()
        out["turns"][stage] = per["turns"].to_list()
    return out


def llm(run: RunFacts) -> list[dict]:
    """Per synthesis stage: backend, model, rows, failure rate, rejects by reason and the manifest's usage."""
    rows = []
    for stage in run.stages(*SYNTH_OPS):
        m = run.manifests[stage]
        c, report, params = m["counts"], m.get("report") or {}, m.get("params") or {}
        rows.append(
            {
                "stage": stage,
                "op": m["op"],
                "kind": params.get("kind") or ("recaption" if m["op"] == "recaption" else ""),
                "backend": report.get("backend", params.get("backend")),
                "model": report.get("model", params.get("model")),
                "in": c["in"],
                "out": c["out"],
                "rejected": c["rejected"],
                "failure_rate": c["rejected"] / c["in"] if c["in"] else 0.0,
                "llm_failures": sum(n for r, n in c["rejected_by_reason"].items() if r.startswith("llm_")),
                "reasons": c["rejected_by_reason"],
                "usage": report.get("usage"),
            }
        )
    return rows


def gallery(run: RunFacts, n: int = 8) -> dict | None:
    """Sample rows of the last image stage: image, alt-text, recaption and every generated conversation."""
    images = run.image_stages()
    if not images:
        return None
    stage = images[-1]
    instruct = [s for s in run.stages("instruct") if run.files(s)]
    picked = run.scan(stage, parts=True).select("uid", PART).collect().sort("uid")
    if instruct:  # prefer images that got conversations
        conv = picked.filter(pl.col("uid").is_in(run.scan(instruct[0]).select("uid").collect()["uid"].implode()))
        picked = conv if conv.height else picked
    picked = picked.gather_every(max(picked.height // n, 1)).head(n)
    uids = picked["uid"].to_list()
    base = run.lookup(stage, picked, ["url", "caption", "image"])
    recaps: dict[str, str] = {}
    for s in run.stages("recaption"):
        if run.files(s):
            recaps.update(
                run.scan(s).filter(pl.col("uid").is_in(uids)).select("uid", "recaption").collect().iter_rows()
            )
    convs: dict[str, list] = {u: [] for u in uids}
    for s in instruct:
        for uid, kind, turns in (
            run.scan(s).filter(pl.col("uid").is_in(uids)).select("uid", "kind", "conversations").collect().iter_rows()
        ):
            convs[uid].append({"stage": s, "kind": kind, "turns": turns})
    rows = [
        {
            "uid": r["uid"],
            "url": r["url"],
            "caption": r["caption"],
            "thumb": thumbnail(r["image"], 224),
            "recaption": recaps.get(r["uid"]),
            "conversations": convs.get(r["uid"], []),
        }
        for r in base.sort("uid").iter_rows(named=True)
    ]
    return {"stage": stage, "rows": rows}
