"""Concepts judged against ground truth (issue 16), on the long-tailed fixture web, each figure beside its baseline:

1. a tiny CLIP trained here (`curate models train-clip` on a training web's `filter` output) vs the random tower:
   zero-shot accuracy on a held-out web's one-object images (72 compounds, and their shape and colour);
2. match_concepts (feature, substring, hybrid) precision@K and recall@K of the drawn compounds;
3. clip_score vs no filter: the planted mismatched captions it drops (precision, recall, ROC AUC of the score);
4. balance (inverse frequency and MetaCLIP) vs a uniform random selection of the same size: tail and head shares,
   tail retention, entropy of the compound distribution.

    python bench/bench_concepts.py --n 20000 --steps 600 [--out bench/out/concepts] [--json]

Two webs of `--n` URLs, both served on 127.0.0.1: the training web (seed 1) goes through ingest -> dedup -> filter
and the tower trains on filter's pairs; the bench web (seed 0) goes through the whole DAG below, once with the
trained tower and once with the random one. The vocabulary is the demo's (frequent words, caption bigrams) plus the
72 compound names (as MetaCLIP's vocabulary holds WordNet's and Wikipedia's compounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from curation.concepts.clip import TINY_MODEL, TRAINABLE_MODEL
from curation.concepts.truth import power_tag

K = 5
TRUTH_FRACTION = 0.1  # the truth upper bound is also measured at this budget: the tail ratio can reach 1/budget
GOALS = {"recall@5": 0.8, "tail_ratio": 3.0}  # feature top-5 recall (trained); inverse-frequency tail share / random's


BALANCED_MATCHES = ("feature", "substring", "hybrid", "feature_compounds")  # trained tower; random: feature only
POWERS = (1.0, 2.0, 3.0)  # inverse frequency's exponent: 1 is LLaVA-OneVision-1.5's weight
GOAL_SELECTION = "inverse_frequency_p3_substring_trained"  # the engine's best route to the tail (MetaCLIP's matches)


def pipeline(
    web: Path,
    vocab: Path,
    cache: Path,
    towers: dict[str, Path],
    fraction: float,
    score_keep: float,
    compounds: Path | None = None,
) -> dict:
    """The DAG: ingest -> dedup -> filter, then per tower: embed -> match (feature, substring, hybrid, and feature
    over the `compounds` vocabulary only), clip_score, balance (inverse frequency and MetaCLIP) after each match."""
    stages = {
        "ingest": {"op": "ingest", "params": {"urls": str(web / "urls.parquet"), "allow_loopback": True}},
        "dedup": {"op": "dedup", "after": ["ingest"], "params": {"max_distance": 6}},
        "filter": {"op": "filter", "after": ["dedup"], "params": {"languages": ["en"]}},
    }
    for tower, ckpt in towers.items():
        model = TRAINABLE_MODEL if tower == "trained" else TINY_MODEL
        clip = {"model": model, "pretrained": str(ckpt), "precision": "fp32"}
        stages[f"embed_{tower}"] = {"op": "embed", "after": ["filter"], "params": clip}
        match = {**clip, "vocab": str(vocab), "cache_dir": str(cache), "k": K}
        for mode in ("feature", "substring", "hybrid"):
            if mode == "substring" and tower != "trained":
                continue  # no tower involved
            stages[f"match_{mode}_{tower}"] = {
                "op": "match_concepts",
                "after": [f"embed_{tower}"],
                "params": {**match, "mode": mode},
            }
        if compounds is not None and tower == "trained":
            stages[f"match_feature_compounds_{tower}"] = {
                "op": "match_concepts",
                "after": [f"embed_{tower}"],
                "params": {**match, "vocab": str(compounds), "mode": "feature"},
            }
        stages[f"clip_score_{tower}"] = {
            "op": "clip_score",
            "after": [f"embed_{tower}"],
            "params": {"top_fraction": score_keep},
        }
        for method, power in [("inverse_frequency", p) for p in POWERS] + [("metaclip", 1.0)]:
            for m in BALANCED_MATCHES:
                if f"match_{m}_{tower}" in stages:
                    stages[f"balance_{method}{power_tag(power)}_{m}_{tower}"] = {
                        "op": "balance",
                        "after": [f"match_{m}_{tower}"],
                        "params": {
                            "method": method,
                            "target_fraction": fraction,
                            "vocab": str(compounds if m == "feature_compounds" else vocab),
                            "power": power,
                        },
                    }
    return {"name": "concepts_truth", "stages": stages}


def train_web_tower(out: Path, n: int, steps: int, seed: int) -> tuple[Path, dict]:
    """The training web through ingest -> dedup -> filter, then the tower trained on filter's pairs."""
    from curation.concepts.train_clip import TrainClipParams, read_pairs, train_clip
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    web, run = out / "train_web", out / "train_run"
    make_web(web, n=n, port=free_port(), seed=1, scenes="longtail")
    dag = pipeline(web, Path("unused"), Path("unused"), {}, 0.5, 0.5)
    t0 = time.time()
    with WebServer(web):
        run_pipeline(parse_pipeline(dag, "train_web"), run)
    ingest_s = time.time() - t0
    images, captions = read_pairs(run / "filter")
    ckpt = out / "models" / "trained.pt"
    summary = train_clip(images, captions, ckpt, TrainClipParams(steps=steps, seed=seed))
    return ckpt, {"pipeline_s": round(ingest_s, 1), **{k: summary[k] for k in ("pairs", "decode_s", "train_s")}}


def zero_shot_figures(web: Path, model: str, ckpt: Path) -> dict:
    """Zero-shot accuracy on a web's one-object images: the compound (72-way), its shape and its colour."""
    import pyarrow.parquet as pq

    from curation.concepts.clip import load_clip
    from curation.concepts.train_clip import zero_shot
    from curation.fixtures.scenes import COMPOUNDS, concept_name, true_concepts

    rows = [r for r in pq.read_table(web / "truth.parquet").to_pylist() if r["kind"] == "ok" and r["objects"]]
    one = [r for r in rows if len(true_concepts(r["objects"])) == 1]
    images = [(web / "files" / r["url"].rsplit("/", 1)[1]).read_bytes() for r in one]
    labels = [true_concepts(r["objects"])[0] for r in one]
    clip = load_clip(model, str(ckpt), "fp32")
    z = zero_shot(clip, images, labels, [concept_name(c, s) for c, s in COMPOUNDS])
    pairs = list(zip(z["pred"], labels))
    return {
        "images": z["n"],
        "compound": z["accuracy"],
        "shape": sum(p.split()[1] == t.split()[1] for p, t in pairs) / max(1, len(pairs)),
        "colour": sum(p.split()[0] == t.split()[0] for p, t in pairs) / max(1, len(pairs)),
    }


def bench_vocab(out: Path, web: Path) -> Path:
    """The demo's vocabulary of the web's captions plus the compound names."""
    import pyarrow.parquet as pq

    from curation.concepts.vocab import build_vocab, write_vocab
    from curation.fixtures.demo import DEMO_VOCAB
    from curation.fixtures.scenes import COMPOUNDS, concept_name

    titles = out / "compounds.txt"
    titles.write_text("".join(concept_name(c, s) + "\n" for c, s in COMPOUNDS))
    captions = pq.read_table(web / "urls.parquet", columns=["caption"]).column("caption").to_pylist()
    vocab = out / "vocab.parquet"
    write_vocab(
        build_vocab(DEMO_VOCAB, wordnet_dir=None, title_files=[titles], corpus=captions, bigram_min_count=3), vocab
    )
    return vocab


def compound_vocab(out: Path) -> Path:
    """A vocabulary of the 72 compound names only: what feature matching reaches when every entry is a concept the
    images can show (the full vocabulary's other 12,000 entries are words and bigrams no image draws)."""
    from curation.concepts.vocab import make_table, write_vocab
    from curation.fixtures.scenes import COMPOUNDS, concept_name

    vocab = out / "compounds.parquet"
    write_vocab(make_table([concept_name(c, s) for c, s in COMPOUNDS], "title"), vocab)
    return vocab


def score_figures(run: Path, truth: Path, tower: str, stage: str) -> dict:
    """clip_score against the planted mismatched captions: the stage's drops, and the score's ROC AUC."""
    import numpy as np
    import polars as pl

    from curation.concepts.truth import auc, image_concepts, judge_drops

    emb = pl.read_parquet(
        run / f"embed_{tower}" / "part-*.parquet", columns=["uid", "image_embedding", "text_embedding"]
    )
    emb = emb.drop_nulls("text_embedding").join(image_concepts(run, truth), on="uid")
    a, b = (np.asarray(emb[c].to_list(), np.float32) for c in ("image_embedding", "text_embedding"))
    bad = (emb["caption_kind"] == "mismatched").to_numpy()
    rejected = pl.read_parquet(run / stage / "rejects" / "part-*.parquet", columns=["uid", "reason"])
    dropped = set(rejected.filter(pl.col("reason") == "low_clip_score")["uid"].to_list())
    planted = set(emb.filter(pl.col("caption_kind") == "mismatched")["uid"].to_list())
    return {"auc": auc((a * b).sum(1), bad), **judge_drops(emb["uid"].to_list(), dropped, planted)}


def run(
    n: int, steps: int, out: Path, fraction: float, score_keep: float, seed: int = 0, tower: Path | None = None
) -> dict:
    from curation.concepts.clip import make_tiny_checkpoint
    from curation.concepts.truth import judge_balance, judge_matching, judge_truth_balance
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    trained, training = (tower, {"checkpoint": str(tower)}) if tower else train_web_tower(out, n, steps, seed)
    towers = {"trained": trained, "random": make_tiny_checkpoint(out / "models" / "random.pt", seed=0)}
    held = out / "held_web"
    make_web(held, n=max(300, n // 20), port=free_port(), seed=2, scenes="longtail")
    res = {"n": n, "steps": steps, "fraction": fraction, "score_keep": score_keep, "training": training}
    models = {"trained": TRAINABLE_MODEL, "random": TINY_MODEL}
    res["zero_shot"] = {t: zero_shot_figures(held, models[t], ckpt) for t, ckpt in towers.items()}  # web seed 2
    web, run_dir = out / "web", out / "run"
    make_web(web, n=n, port=free_port(), seed=0, scenes="longtail")
    vocab, truth = bench_vocab(out, web), web / "truth.parquet"
    compounds = compound_vocab(out)
    dag = pipeline(web, vocab, out / "cache", towers, fraction, score_keep, compounds)
    with WebServer(web):
        run_pipeline(parse_pipeline(dag, "bench"), run_dir)
    res["matching"] = {
        s.name.removeprefix("match_"): judge_matching(
            run_dir, s.name, truth, compounds if "compounds" in s.name else vocab, K
        )
        for s in sorted(run_dir.glob("match_*"))
    }
    res["clip_score"] = {t: score_figures(run_dir, truth, t, f"clip_score_{t}") for t in towers}
    res["balance"] = {}
    for f in sorted(
        {fraction, TRUTH_FRACTION}, reverse=True
    ):  # the upper bound at the stages' budget and a smaller one
        truth_rows = judge_truth_balance(run_dir, "match_feature_trained", truth, f, seed=seed, powers=POWERS)
        res["balance"] |= {(k if f == fraction else f"{k}@{f:g}"): v for k, v in truth_rows.items()}
    for s in sorted(run_dir.glob("balance_*")):
        source = dag["stages"][s.name]["after"][0]
        res["balance"][s.name.removeprefix("balance_")] = judge_balance(run_dir, source, s.name, truth)
    for b in res["balance"].values():
        rnd = b["random"]["tail_share"]
        b["tail_ratio"] = b["balanced"]["tail_share"] / rnd if rnd else None  # None: random kept no tail at all
    res["goal_selection"], res["tail_ratio"] = GOAL_SELECTION, res["balance"][GOAL_SELECTION]["tail_ratio"]
    res["tail_ratio_feature"] = res["balance"]["inverse_frequency_feature_trained"]["tail_ratio"]
    res["goals"] = {
        "recall@5": res["matching"]["feature_trained"][f"recall@{K}"] >= GOALS["recall@5"],
        "tail_ratio": (res["tail_ratio"] or 0.0) >= GOALS["tail_ratio"],
    }
    res["seconds"] = round(time.time() - t0, 1)
    return res


def table(res: dict) -> str:
    z, lines = res["zero_shot"], []
    lines.append("| tower | zero-shot compound (72) | shape (8) | colour (9) |")
    lines.append("|---|---|---|---|")
    for t, r in z.items():
        lines.append(f"| {t} | {r['compound']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} |")
    lines += [
        "",
        f"| match stage | images | precision@{K} | recall@{K} | recall@{K}, one compound | recall@{K}, 2-3 "
        f"| precision (all) | recall (all) | top-{K} tail labels (right) | wrong compounds on 2-3 swapped (chance) |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for s, r in res["matching"].items():
        lines.append(
            f"| {s} | {r['images']:,} | {r[f'precision@{K}']:.3f} | {r[f'recall@{K}']:.3f} | "
            f"{r[f'recall@{K}_one_compound']:.3f} | {r[f'recall@{K}_several']:.3f} | "
            f"{r['precision_all']:.3f} | {r['recall_all']:.3f} | "
            f"{r[f'tail_labels@{K}']:,} ({r[f'tail_precision@{K}']:.2f}) | "
            f"{r['swapped_share']:.2f} ({r['swapped_chance']:.3f}) |"
        )
    lines += ["", "| clip_score tower | rows | planted mismatched | dropped | precision | recall | AUC |"]
    lines.append("|---|---|---|---|---|---|---|")
    for t, r in res["clip_score"].items():
        lines.append(
            f"| {t} | {r['rows']:,} | {r['planted']} | {r['dropped']:,} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['auc']:.3f} |"
        )
    lines += [
        "",
        "| selection (balance method, after which matches) | images | tail share (random) | tail / random "
        "| head share (random) | tail retention (random) | entropy (random) | Gini (random) |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    first = next(iter(res["balance"].values()))["balanced"]
    pool_images = next(iter(res["matching"].values()))["images"]
    lines.append(
        f"| pool | {pool_images:,} | {first['tail_share_pool']:.3f} | | {first['head_share_pool']:.3f} | "
        f"1.000 | {first['entropy_pool']:.3f} | {first['gini_pool']:.3f} |"
    )
    for name, r in res["balance"].items():
        b, u = r["balanced"], r["random"]
        ratio = f"{r['tail_ratio']:.2f}x" if r["tail_ratio"] is not None else "n/a"
        lines.append(
            f"| {name} | {b['images']:,} | {b['tail_share']:.3f} ({u['tail_share']:.3f}) | {ratio} | "
            f"{b['head_share']:.3f} ({u['head_share']:.3f}) | {b['tail_retention']:.3f} ({u['tail_retention']:.3f}) | "
            f"{b['entropy']:.3f} ({u['entropy']:.3f}) | {b['gini']:.3f} ({u['gini']:.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=600, help="tower training steps (batch 256)")
    ap.add_argument("--fraction", type=float, default=0.25, help="balance target_fraction")
    ap.add_argument("--score-keep", type=float, default=0.9, help="clip_score top_fraction")
    ap.add_argument("--out", type=Path, default=Path("bench/out/concepts"))
    ap.add_argument("--tower", type=Path, help="a trained curation-tiny-clip-rn checkpoint: skip the training web")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.n, args.steps, args.out, args.fraction, args.score_keep, tower=args.tower)
    if args.json:
        print(json.dumps(res))
        return
    print(table(res))
    print(
        json.dumps(
            {k: res[k] for k in ("n", "steps", "training", "tail_ratio", "tail_ratio_feature", "goals", "seconds")}
        )
    )


if __name__ == "__main__":
    main()
