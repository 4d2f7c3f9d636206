"""Concept matching and balancing judged against a long-tailed fixture web's truth (`make_web(scenes="longtail")`):
the compound concepts (colour x shape) drawn in each image are in truth.parquet.

Matching: for each image with drawn concepts, precision and recall of its matched vocabulary entries (the first K,
and all of them) against the drawn compounds' names. Balancing: the share of each true compound among the objects
of the pool and of a selection, the tail's and the head's shares, the entropy of the distribution, and each figure
beside a uniform random selection of the same size.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from curation.concepts.sampling import gini, uniforms
from curation.fixtures.scenes import true_concepts


def image_concepts(run_dir: Path, truth: Path, source: str = "ingest") -> pl.DataFrame:
    """uid -> the compounds drawn in the image (`concepts`, a sorted list) and its `caption_kind` ("mismatched":
    the alt-text of another image), for every row the source stage wrote."""
    t = pl.read_parquet(truth, columns=["url", "objects", "caption_kind"])
    t = t.with_columns(concepts=pl.Series([true_concepts(o) for o in t["objects"].to_list()], dtype=pl.List(pl.String)))
    uids = pl.read_parquet(Path(run_dir) / source / "part-*.parquet", columns=["uid", "url"])
    return uids.join(t.select("url", "concepts", "caption_kind"), on="url", how="left").drop("url")


@functools.cache
def _plurals() -> dict[str, str]:
    """ "green rings" -> "green ring", for every compound."""
    from curation.fixtures.scenes import COMPOUNDS
    from curation.synth.rules import plural

    return {f"{c} {plural(s, 2)}": f"{c} {s}" for c, s in COMPOUNDS}


def _singular(entry: str) -> str:
    """A vocabulary entry that names a compound in the plural ("green rings") as the compound ("green ring")."""
    return _plurals().get(entry, entry)


@functools.cache
def _compound_parts() -> dict[str, tuple[str, str]]:
    """ "red circle" -> ("red", "circle"), for every compound."""
    from curation.fixtures.scenes import COMPOUNDS

    return {f"{c} {s}": (c, s) for c, s in COMPOUNDS}


def _attributes(drawn: set[str]) -> tuple[set[str], set[str]]:
    """The colours and the shapes of the drawn compounds."""
    parts = _compound_parts()
    return {parts[d][0] for d in drawn}, {parts[d][1] for d in drawn}


def binding_errors(top: list[str], drawn: set[str]) -> Counter:
    """The wrong entries among an image's `top` names, by what they share with the drawn compounds: `swapped` (a
    drawn colour on another drawn object's shape: the attributes seen, bound wrong), `colour_only`, `shape_only`,
    `neither`, or `not_a_compound` (a word or bigram)."""
    parts, (colours, shapes) = _compound_parts(), _attributes(drawn)
    kinds = Counter()
    for name in top:
        if name in drawn:
            continue
        if name not in parts:
            kinds["not_a_compound"] += 1
            continue
        c, s = parts[name]
        if c in colours:
            kinds["swapped" if s in shapes else "colour_only"] += 1
        else:
            kinds["shape_only" if s in shapes else "neither"] += 1
    return kinds


def swap_chance(drawn: set[str]) -> float:
    """The share of swapped compounds among the compounds not drawn: what `swapped` would be by chance."""
    colours, shapes = _attributes(drawn)
    rest = [p for n, p in _compound_parts().items() if n not in drawn]
    return sum(c in colours and s in shapes for c, s in rest) / len(rest)


def _stage_rows(run_dir: Path, stage: str, columns: list[str]) -> pl.DataFrame:
    return pl.read_parquet(Path(run_dir) / stage / "part-*.parquet", columns=columns)


def judge_matching(run_dir: Path, stage: str, truth: Path, vocab: Path, k: int = 5) -> dict:
    """Precision and recall of a match_concepts stage's entries against the drawn compounds, over the images with
    at least one drawn compound: @k (the first k entries: feature matches, best first) and over all entries; and the
    precision of the top-k entries that name a tail compound (`head_and_tail`). An entry naming a compound in the
    plural ("green rings") counts as that compound."""
    texts = pl.read_parquet(vocab, columns=["id", "text"])
    names = dict(zip(texts["id"].to_list(), (_singular(t) for t in texts["text"].to_list())))
    rows = _stage_rows(run_dir, stage, ["uid", "concept_ids"]).join(
        image_concepts(run_dir, truth), on="uid", how="inner"
    )
    counts = Counter(c for drawn in rows["concepts"].to_list() for c in drawn or ())
    _, tail = head_and_tail(counts) if counts else (set(), set())
    tail_labels = tail_right = 0  # top-k entries naming a tail compound, and those the image really holds
    p_k, r_k, p_all, r_all, one = [], [], [], [], []
    wrong, chance = Counter(), []  # images of several compounds: their wrong top-k entries, by kind
    for ids, drawn in zip(rows["concept_ids"].to_list(), rows["concepts"].to_list()):
        labels = [names[i] for i in ids[:k] if names[i] in tail]
        tail_labels += len(labels)
        tail_right += sum(c in (drawn or ()) for c in labels)
        if not drawn:
            continue
        drawn = set(drawn)
        one.append(len(drawn) == 1)
        got = [names[i] for i in ids]
        top = got[:k]
        if len(drawn) > 1:
            wrong += binding_errors(top, drawn)
            chance.append(swap_chance(drawn))
        hits_k, hits_all = len(drawn & set(top)), len(drawn & set(got))
        p_k.append(hits_k / k)
        r_k.append(hits_k / len(drawn))
        p_all.append(hits_all / len(got) if got else 0.0)
        r_all.append(hits_all / len(drawn))
    n = len(r_k)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {
        "images": n,
        "k": k,
        f"precision@{k}": mean(p_k),
        f"recall@{k}": mean(r_k),
        "precision_all": mean(p_all),
        "recall_all": mean(r_all),
        f"recall@{k}_one_compound": mean([r for r, o in zip(r_k, one) if o]),  # images of one compound
        f"recall@{k}_several": mean([r for r, o in zip(r_k, one) if not o]),  # of 2-3 (the binding problem)
        "entries_per_image": float(rows["concept_ids"].list.len().mean() or 0.0),
        # what inverse frequency feeds on: of the top-k entries naming a tail compound, the share that is right
        # (a head image labelled with a tail compound counts as tail, and heads outnumber tails 100 to 1)
        f"tail_labels@{k}": tail_labels,
        f"tail_precision@{k}": tail_right / tail_labels if tail_labels else 0.0,
        "tail_objects": sum(counts[c] for c in tail),
        # CLIP's bag of words (Yuksekgonul et al., ICLR 2023): on several-object images, how many wrong top-k
        # compounds carry a drawn colour on another drawn object's shape, beside the share chance would give
        f"wrong@{k}_several": dict(wrong),
        "swapped_share": wrong["swapped"] / (wrong.total() - wrong["not_a_compound"] or 1),
        "swapped_chance": mean(chance),
    }


def _objects(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (image, drawn compound)."""
    return table.select("uid", "concepts").explode("concepts").drop_nulls("concepts").rename({"concepts": "concept"})


def head_and_tail(counts: dict[str, int], head: int = 7, tail_fraction: float = 0.5) -> tuple[set[str], set[str]]:
    """The `head` most frequent concepts and the least frequent `tail_fraction` of them (ties by name)."""
    order = sorted(counts, key=lambda c: (-counts[c], c))
    return set(order[:head]), set(order[-max(1, round(tail_fraction * len(order))) :])


def concept_shares(
    pool: pl.DataFrame, kept_uids: list[str] | set[str], head: int = 7, tail_fraction: float = 0.5
) -> dict:
    """Figures of a selection (`kept_uids`) of a pool (uid, concepts): tail and head shares before and after,
    tail retention, normalised entropy and Gini of the compound distribution. Head: the `head` most frequent
    compounds of the pool; tail: its least frequent `tail_fraction` of the compounds present."""
    objs = _objects(pool)
    counts = objs.group_by("concept").agg(pool=pl.len())
    kept = objs.filter(pl.col("uid").is_in(list(kept_uids))).group_by("concept").agg(kept=pl.len())
    c = counts.join(kept, on="concept", how="left").fill_null(0).sort(["pool", "concept"], descending=[True, False])
    head_names, tail_names = head_and_tail(dict(zip(c["concept"], c["pool"])), head, tail_fraction)
    pool_n, kept_n = int(c["pool"].sum()), int(c["kept"].sum())

    def share(col: str, names: set[str], total: int) -> float:
        return float(c.filter(pl.col("concept").is_in(list(names)))[col].sum()) / total if total else 0.0

    def entropy(col: str) -> float:
        p = c[col].to_numpy().astype(np.float64)
        p = p[p > 0] / p.sum() if p.sum() else p[:0]
        return float(-(p * np.log(p)).sum() / math.log(c.height)) if c.height > 1 and len(p) else 0.0

    tail_pool = c.filter(pl.col("concept").is_in(list(tail_names)))
    return {
        "images": len(set(kept_uids) & set(pool["uid"].to_list())),
        "concepts": c.height,
        "head_over_tail": float(c["pool"][0] / max(1, c["pool"][-1])),
        "tail_share_pool": share("pool", tail_names, pool_n),
        "tail_share": share("kept", tail_names, kept_n),
        "head_share_pool": share("pool", head_names, pool_n),
        "head_share": share("kept", head_names, kept_n),
        "tail_retention": float(tail_pool["kept"].sum() / max(1, tail_pool["pool"].sum())),
        "head_retention": float(
            c.filter(pl.col("concept").is_in(list(head_names)))["kept"].sum()
            / max(1, c.filter(pl.col("concept").is_in(list(head_names)))["pool"].sum())
        ),
        "concepts_kept": int((c["kept"] > 0).sum()),
        "entropy_pool": entropy("pool"),
        "entropy": entropy("kept"),
        "gini_pool": gini(c["pool"].to_numpy()),
        "gini": gini(c["kept"].to_numpy()),
    }


def random_selection(uids: list[str], size: int, seed: int = 0) -> set[str]:
    """A uniform random selection of `size` uids, by a seeded hash of each uid (the same whatever the order)."""
    u = uniforms(uids, seed)
    return {uids[i] for i in np.argsort(u, kind="stable")[:size]}


def judge_balance(run_dir: Path, pool_stage: str, kept_stage: str, truth: Path, **shares_kw) -> dict[str, dict]:
    """A balance stage's selection and a uniform random one of the same size, from the same pool (the rows of
    `pool_stage`, e.g. the balance stage's input), each judged by `concept_shares`."""
    pool_uids = _stage_rows(run_dir, pool_stage, ["uid"])
    pool = pool_uids.join(image_concepts(run_dir, truth), on="uid", how="left")
    kept = set(_stage_rows(run_dir, kept_stage, ["uid"])["uid"].to_list())
    return {"balanced": concept_shares(pool, kept, **shares_kw), "random": random_shares(pool, len(kept), **shares_kw)}


def random_shares(pool: pl.DataFrame, size: int, seeds: int = 10, **shares_kw) -> dict:
    """`concept_shares` of uniform random selections of `size` images, averaged over `seeds` draws (one draw of a
    small selection holds few tail objects: its tail share is noisy)."""
    uids = pool["uid"].to_list()
    draws = [concept_shares(pool, random_selection(uids, size, s), **shares_kw) for s in range(seeds)]
    return {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores lower than a random negative (ties half);
    positives here are the rows a filter should drop, so a useful score ranks them low."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = pl.Series(-scores).rank("average").to_numpy()  # 1 = highest score
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def judge_drops(uids: list[str], dropped: set[str], planted: set[str]) -> dict:
    """Precision and recall of a filter's drops among `uids` against the planted bad rows."""
    planted, dropped = planted & set(uids), dropped & set(uids)
    hit = len(planted & dropped)
    return {
        "rows": len(uids),
        "planted": len(planted),
        "dropped": len(dropped),
        "precision": hit / len(dropped) if dropped else 1.0,
        "recall": hit / len(planted) if planted else 1.0,
    }


def power_tag(power: float) -> str:
    """How a selection's name shows inverse frequency's power: '' for 1 (LLaVA-OneVision-1.5's), '_p2' for 2."""
    return "" if power == 1 else f"_p{power:g}"


def truth_selection(
    pool: pl.DataFrame, fraction: float, method: str = "inverse_frequency", seed: int = 0, power: float = 1.0
) -> set[str]:
    """The selection `balance` would make if its matches were the drawn compounds themselves (an upper bound for
    any matcher): the same sampling code, the same target (`fraction` of the images with concepts) and seed."""
    from curation.concepts import sampling as bal

    names = sorted({c for cs in pool["concepts"].to_list() for c in (cs or [])})
    index = {c: i for i, c in enumerate(names)}
    offsets, ids = bal.csr_from_lists([[index[c] for c in (cs or [])] for cs in pool["concepts"].to_list()])
    counts = bal.concept_counts(ids, max(1, len(names)))
    uids = np.asarray(pool["uid"].to_list(), dtype=object)
    target = round(fraction * int((np.diff(offsets) > 0).sum()))
    keep, _, _ = bal.select(uids, offsets, ids, counts, method, target, seed=seed, power=power)
    return set(uids[keep].tolist())


def judge_truth_balance(
    run_dir: Path, pool_stage: str, truth: Path, fraction: float, seed: int = 0, powers=(1.0,), **kw
) -> dict:
    """`truth_selection` of a stage's rows (inverse frequency at each of `powers`, and MetaCLIP), each beside uniform
    random of its size."""
    pool = _stage_rows(run_dir, pool_stage, ["uid"]).join(image_concepts(run_dir, truth), on="uid", how="left")
    out = {}
    runs = [("inverse_frequency", p) for p in powers] + [("metaclip", 1.0)]
    for method, power in runs:
        kept = truth_selection(pool, fraction, method, seed, power)
        out[f"{method}{power_tag(power)}_truth"] = {
            "balanced": concept_shares(pool, kept, **kw),
            "random": random_shares(pool, len(kept), **kw),
        }
    return out
