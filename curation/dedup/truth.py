"""Dedup's decisions judged against a fixture web's ground truth (truth.parquet): precision, recall per planted
variant kind, and the distinct images lost.

A row's family is the source image it was made from (its own URL for an original). A duplicate reject is right when
its representative is of its family. A planted variant is recalled when it ends in its source's group. A distinct
image (a family present in dedup's input) is lost when no member of it is kept.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curation.dedup.neardup import near_duplicate_groups


def judge(run_dir: Path, truth: Path, stage: str = "dedup", source: str = "ingest", groups=None) -> dict:
    """The figures for one run dir's dedup stage (its groups.parquet, or `groups`) against the web's truth.parquet."""
    t = pl.read_parquet(truth).select("url", "kind", "variant", family=pl.coalesce("source_url", "url"))
    uids = pl.read_parquet(Path(run_dir) / source / "part-*.parquet", columns=["uid", "url"])
    if groups is None:
        groups = pl.read_parquet(Path(run_dir) / stage / "groups.parquet", columns=["uid", "rep_uid", "reason"])
    rep = uids.join(t, on="url").select(rep_uid="uid", rep_family="family")
    g = groups.join(uids, on="uid").join(t, on="url").join(rep, on="rep_uid")
    rejects = g.filter(pl.col("reason").is_not_null())
    right = rejects.filter(pl.col("family") == pl.col("rep_family"))
    families = g.group_by("family").agg(kept=pl.col("reason").is_null().any())
    planted = g.filter(pl.col("kind").is_in(["exact_dup", "near_dup"]))
    source_rep = g.filter(pl.col("url") == pl.col("family")).select("family", source_rep="rep_uid")
    recall = (
        planted.join(source_rep, on="family", how="left")
        .with_columns(recalled=pl.col("rep_uid") == pl.col("source_rep"))
        .group_by("variant")
        .agg(planted=pl.len(), recalled=pl.col("recalled").fill_null(False).sum())
        .sort("variant")
    )
    lost = families.filter(~pl.col("kept")).height
    by_group = g.group_by("rep_uid").agg(size=pl.len(), families=pl.col("family").n_unique())
    largest = by_group.sort(["size", "rep_uid"], descending=[True, False]).row(0, named=True) if g.height else {}
    return {
        "rows": g.height,
        "rejects": rejects.height,
        "wrong_rejects": rejects.height - right.height,
        "precision": right.height / rejects.height if rejects.height else 1.0,
        "recall": {r["variant"]: r["recalled"] / r["planted"] for r in recall.iter_rows(named=True)},
        "planted": {r["variant"]: r["planted"] for r in recall.iter_rows(named=True)},
        "recall_all": recall["recalled"].sum() / max(recall["planted"].sum(), 1),
        "distinct": families.height,
        "distinct_lost": lost,
        "distinct_lost_fraction": lost / families.height if families.height else 0.0,
        "largest_group": largest.get("size", 0),  # the report's first "Largest groups" row
        "largest_group_families": largest.get("families", 0),  # 1 when it holds one image's copies only
        "mixed_groups": by_group.filter(pl.col("families") > 1).height,
    }


def components_baseline(run_dir: Path, max_distance: int, stage: str = "dedup", source: str = "ingest") -> pl.DataFrame:
    """The grouping dedup used before leader groups, on the stage's own hashes: connected components of pHash
    distance <= max_distance, the representative the most pixels (then smallest uid), as groups for `judge`."""
    g = pl.read_parquet(Path(run_dir) / stage / "groups.parquet", columns=["uid", "phash"])
    size = pl.read_parquet(
        Path(run_dir) / source / "part-*.parquet", columns=["uid", "original_width", "original_height"]
    )
    g = g.join(size, on="uid").with_columns(px=pl.col("original_width").cast(pl.Int64) * pl.col("original_height"))
    g = g.sort(["px", "uid"], descending=[True, False])
    g = g.with_columns(label=pl.Series(near_duplicate_groups(g["phash"].to_numpy(), max_distance)))
    g = g.with_columns(rep_uid=pl.col("uid").first().over("label"))
    return g.select("uid", "rep_uid", reason=pl.when(pl.col("uid") != pl.col("rep_uid")).then(pl.lit("near_duplicate")))
