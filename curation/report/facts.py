"""Facts for `curate report` and `curate view`: a run dir's manifests and Parquet outputs, read with polars."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import polars as pl

from curation.status import coverage_rows, run_status
from curation.store import StageDir

SYNTH_OPS = ("recaption", "instruct")


class RunFacts:
    """A run dir: per-stage status (from `curate status`), manifests and lazy scans of parts and rejects."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.status = run_status(self.root)
        self.manifests = {s["stage"]: StageDir(self.root, s["stage"]).manifest() for s in self.status["stages"]}

    def stages(self, *ops: str) -> list[str]:
        """Stages in pipeline order that have a manifest (and run one of `ops`, when given)."""
        return [s for s, m in self.manifests.items() if m and (not ops or m["op"] in ops)]

    def op(self, stage: str) -> str | None:
        m = self.manifests.get(stage)
        return m["op"] if m else None

    def files(self, stage: str, rejects: bool = False) -> list[Path]:
        return sorted((self.root / stage / ("rejects" if rejects else "")).glob("part-*.parquet"))

    def scan(self, stage: str, rejects: bool = False) -> pl.LazyFrame | None:
        files = self.files(stage, rejects)
        return pl.scan_parquet(files) if files else None

    def columns(self, stage: str) -> list[str]:
        files = self.files(stage)
        return list(pl.read_parquet_schema(files[0])) if files else []

    def image_stages(self) -> list[str]:
        """Stages whose rows carry an image and its alt-text (ingest, dedup, filter, balance...)."""
        return [s for s in self.stages() if {"image", "caption", "uid"} <= set(self.columns(s))]

    def images(self, uids: list[str], size: int = 160) -> dict[str, str]:
        """Thumbnails (data URIs) of the given uids, from the first image stage holding each."""
        out: dict[str, str] = {}
        for stage in self.image_stages():
            todo = [u for u in uids if u not in out]
            if not todo:
                break
            rows = self.scan(stage).filter(pl.col("uid").is_in(todo)).select("uid", "image").collect()
            for uid, data in rows.iter_rows():
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
    thumbs = run.images(members["uid"].to_list(), size=96)
    shown = []
    for rep, size in big.iter_rows():
        rows = members.filter(pl.col("rep_uid") == rep).sort(pl.col("uid") != rep)
        shown.append({"rep_uid": rep, "size": size, "members": [
            {"uid": r["uid"], "reason": r["reason"], "distance": r["distance"], "thumb": thumbs.get(r["uid"], "")}
            for r in rows.iter_rows(named=True)]})
    reasons = groups["reason"].drop_nulls().value_counts().sort("reason")
    return {
        "stage": stage, "images": groups.height, "groups": sizes.height,
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
        "stage": stage, "report": report, "metrics": coverage_rows(report),
        "before": sorted((c for c in cov["count_before"].to_list() if c), reverse=True),
        "after": sorted((c for c in cov["count_after"].to_list() if c), reverse=True),
        "top": cov.sort(["count_before", "concept_id"], descending=[True, False]).head(top).to_dicts(),
    }


def _words(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.extract_all(r"\S+").list.len()


def lengths(run: RunFacts) -> dict:
    """Word counts of alt-text captions, recaptions and conversations (per instruct stage), and turns per conversation."""
    out: dict = {"captions": {}, "conversations": {}, "turns": {}}
    images = run.image_stages()
    if images:
        stage = images[-1]
        out["captions"][f"alt-text ({stage})"] = run.scan(stage).select(_words("caption")).collect().to_series().to_list()
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
        rows.append({
            "stage": stage, "op": m["op"], "kind": params.get("kind") or ("recaption" if m["op"] == "recaption" else ""),
            "backend": report.get("backend", params.get("backend")), "model": report.get("model", params.get("model")),
            "in": c["in"], "out": c["out"], "rejected": c["rejected"],
            "failure_rate": c["rejected"] / c["in"] if c["in"] else 0.0,
            "llm_failures": sum(n for r, n in c["rejected_by_reason"].items() if r.startswith("llm_")),
            "reasons": c["rejected_by_reason"], "usage": report.get("usage"),
        })
    return rows


def gallery(run: RunFacts, n: int = 8) -> dict | None:
    """Sample rows of the last image stage: image, alt-text, recaption and every generated conversation."""
    images = run.image_stages()
    if not images:
        return None
    stage = images[-1]
    instruct = [s for s in run.stages("instruct") if run.files(s)]
    uids = run.scan(stage).select("uid").collect()["uid"].sort().to_list()
    if instruct:  # prefer images that got conversations
        with_conv = set(run.scan(instruct[0]).select("uid").collect()["uid"])
        uids = [u for u in uids if u in with_conv] or uids
    step = max(len(uids) // n, 1)
    uids = uids[::step][:n]
    base = run.scan(stage).filter(pl.col("uid").is_in(uids)).select("uid", "url", "caption", "image").collect()
    recaps: dict[str, str] = {}
    for s in run.stages("recaption"):
        if run.files(s):
            recaps.update(run.scan(s).filter(pl.col("uid").is_in(uids)).select("uid", "recaption").collect().iter_rows())
    convs: dict[str, list] = {u: [] for u in uids}
    for s in instruct:
        for uid, kind, turns in run.scan(s).filter(pl.col("uid").is_in(uids)).select("uid", "kind", "conversations").collect().iter_rows():
            convs[uid].append({"stage": s, "kind": kind, "turns": turns})
    rows = [{"uid": r["uid"], "url": r["url"], "caption": r["caption"], "thumb": thumbnail(r["image"], 224),
             "recaption": recaps.get(r["uid"]), "conversations": convs.get(r["uid"], [])}
            for r in base.sort("uid").iter_rows(named=True)]
    return {"stage": stage, "rows": rows}
