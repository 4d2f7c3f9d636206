"""Learning, balanced vs random (issue 16): does a concept-balanced selection train a model that knows the tail better
than a uniform random selection of the same size?

    .venv/bin/python bench/learning_balance.py [--urls 12000] [--fraction 0.25] [--steps 800] [--seeds 0 1 2]
        [--power 1]

Chain: a long-tailed fixture web (`make_web(scenes="longtail")`: 72 colour x shape compounds drawn from a Zipf law,
captions naming them) served on 127.0.0.1 -> ingest, dedup, filter, match_concepts (MetaCLIP's substring matcher
over the 72 compound names, no tower needed), balance (inverse frequency at `--power`, `--fraction` of the matched
images),
instruct (short_answer, rules backend: "What color is the star?" per object whose shape is alone in its image) on the
whole pool. Arms, each the pool's instruction rows of one uid set of the same size: `balanced` (balance's selection),
`random` (uniform, uid-hashed), and `truth` (the same inverse-frequency sampling on the drawn compounds: the upper
bound of any matcher). Every arm trains the same tiny model (stage 2, same steps and seed) and answers held-out
questions from another web (its own seed) through the same chain; each question is about one drawn compound
("What color is the star?" -> "Pink" is about "pink star"), scored as tail (the rarer half of the 72 compounds by
Zipf rank) or head (the 7 most frequent). Accuracy: argmax of the model's log-likelihood over the 9 colours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_SIZE = 64
HEAD = 7  # head compounds: the 7 most frequent (as concept_shares counts them)
ARMS = ("balanced", "random", "truth")
_COLOUR_Q = re.compile(r"^What colou?r is the (\w+)\?")


def pipeline(web: Path, vocab: Path, fraction: float | None, power: float = 1.0) -> dict:
    """ingest -> dedup -> filter -> match_concepts (substring) [-> balance]; instruct (colour questions) on the pool."""
    rules = {
        "backend": "rules",
        "annotations": str(web / "truth.parquet"),
        "max_turns": 3,
        "ask": ["colour"],
    }
    stages = {
        "ingest": {
            "op": "ingest",
            # a generous timeout: on a loaded machine (CI) a slow answer must not change the pool the arms draw from
            "params": {
                "urls": str(web / "urls.parquet"),
                "image_size": IMAGE_SIZE,
                "allow_loopback": True,
                "timeout": 30,
            },
        },
        "dedup": {"op": "dedup", "after": ["ingest"], "params": {"max_distance": 6}},
        "filter": {"op": "filter", "after": ["dedup"], "params": {"languages": ["en"]}},
        "match_concepts": {
            "op": "match_concepts",
            "after": ["filter"],
            "params": {"vocab": str(vocab), "mode": "substring"},
        },
        "short_answer": {"op": "instruct", "after": ["match_concepts"], "params": {**rules, "kind": "short_answer"}},
    }
    if fraction is not None:
        stages["balance"] = {
            "op": "balance",
            "after": ["match_concepts"],
            "params": {"method": "inverse_frequency", "target_fraction": fraction, "vocab": str(vocab), "power": power},
        }
    return {"name": "learning_balance", "stages": stages}


def run_web(
    workdir: Path, name: str, n: int, seed: int, vocab: Path, fraction: float | None, power: float = 1.0
) -> tuple[Path, Path, dict]:
    """Make and serve a long-tailed web, run the chain; (run dir, web dir, stage counts)."""
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    web, run = workdir / f"{name}_web", workdir / f"{name}_run"
    make_web(web, n=n, port=free_port(), seed=seed, scenes="longtail")
    with WebServer(web):
        manifests = run_pipeline(parse_pipeline(pipeline(web, vocab, fraction, power), name), run)
    return run, web, {k: m["counts"] for k, m in manifests.items()}


def selections(run: Path, web: Path, fraction: float, power: float = 1.0) -> tuple[dict[str, set[str]], dict]:
    """The arms' uid sets (same size) and the tail figures of each (concept_shares: tail share, retention)."""
    import polars as pl

    from curation.concepts.truth import concept_shares, image_concepts, random_selection, truth_selection

    pool = (
        pl.read_parquet(run / "match_concepts" / "part-*.parquet", columns=["uid"])
        .join(image_concepts(run, web / "truth.parquet"), on="uid", how="left")
        .sort("uid")
    )
    balanced = set(pl.read_parquet(run / "balance" / "part-*.parquet", columns=["uid"])["uid"].to_list())
    truth = truth_selection(pool, fraction, power=power)
    size = len(balanced)
    arms = {
        "balanced": balanced,
        "random": random_selection(pool["uid"].to_list(), size, seed=0),
        "truth": set(sorted(truth)[:size]) if len(truth) > size else truth,
    }
    figures = {a: concept_shares(pool, uids, head=HEAD) for a, uids in arms.items()}
    return arms, figures


def bucket_of(pool_counts: dict[str, int]) -> dict[str, str]:
    """compound -> "head" (the HEAD most frequent in the pool), "tail" (the rarer half of the 72, absent ones
    included) or "mid": concept_shares' head and tail."""
    from curation.concepts.truth import head_and_tail
    from curation.fixtures.scenes import COMPOUNDS, concept_name

    counts = {concept_name(c, s): 0 for c, s in COMPOUNDS} | pool_counts
    head, tail = head_and_tail(counts, HEAD)
    return {c: "head" if c in head else "tail" if c in tail else "mid" for c in counts}


def colour_questions(rows: list[dict]) -> list[tuple[object, str]]:
    """(evaluate.Question, compound asked about) for every colour question of Instruction rows with images."""
    from trainer.evaluate import questions

    out = []
    for q in questions(rows):
        m = _COLOUR_Q.match(q.text)
        if q.type == "colour" and m:
            out.append((q, f"{q.answer.lower()} {m.group(1)}"))
    return out


def train_arm(workdir: Path, rows: list[dict], parts: dict, steps: int, seed: int, lr: float) -> Path:
    """Stage 2 of the tiny model on the rows (written as a shard that holds its images); returns the output dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.learning import stage2_config
    from schemas import ImageInstruction, arrow_schema
    from trainer.train import train

    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: never resume another selection's checkpoint
    shards = workdir / "shard"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(ImageInstruction)), shards / "part-00000.parquet")
    cfg = stage2_config(shards, parts, workdir / "train", steps, seed, lr)
    train(cfg)
    return workdir / "train"


def score(out: Path, qs: list[tuple[object, str]], buckets: dict[str, str]) -> dict:
    """Accuracy over the 9 colours, all questions and per bucket."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from curation.fixtures.scenes import COMPOUNDS
    from trainer.evaluate import answer_logprobs
    from trainer.train import load_trained

    final = out / "final"
    model = load_trained(out)
    tok, proc = (
        AutoTokenizer.from_pretrained(str(final / "lm")),
        AutoImageProcessor.from_pretrained(str(final / "vision")),
    )
    colours = sorted({c.capitalize() for c, _ in COMPOUNDS})
    pred = answer_logprobs(model, tok, proc, [q for q, _ in qs], colours).argmax(1).tolist()
    right = [colours[p] == q.answer for p, (q, _) in zip(pred, qs)]
    res = {"all": sum(right) / max(1, len(right)), "n": len(right)}
    for b in ("tail", "head"):
        hits = [r for r, (_, c) in zip(right, qs) if buckets.get(c) == b]
        res[b], res[f"n_{b}"] = (sum(hits) / len(hits) if hits else float("nan")), len(hits)
    return res


def experiment(
    workdir: str | Path,
    n_urls: int = 12000,
    held_urls: int | None = None,
    fraction: float = 0.25,
    steps: int = 800,
    seeds: tuple[int, ...] = (0, 1, 2),
    web_seed: int = 11,
    lr: float = 3e-3,
    arms: tuple[str, ...] = ARMS,
    power: float = 1.0,
) -> dict:
    """The whole experiment in `workdir`: per arm and seed, held-out colour accuracy on tail and head compounds."""
    import polars as pl

    from bench.bench_concepts import compound_vocab
    from curation.concepts.truth import image_concepts
    from schemas.rundir import RunDir
    from trainer.tiny import make_tiny_all

    workdir = Path(workdir)
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = compound_vocab(workdir)  # the 72 names, as bench/bench_concepts.py matches them
    run, web, counts = run_web(workdir, "pool", n_urls, web_seed, vocab, fraction, power)
    held_run, _, _ = run_web(workdir, "held", held_urls or max(400, n_urls // 3), web_seed + 1000, vocab, None)
    chosen, shares = selections(run, web, fraction, power)
    objs = image_concepts(run, web / "truth.parquet").explode("concepts").drop_nulls("concepts")
    pool_counts = dict(objs.group_by("concepts").len().iter_rows())
    buckets = bucket_of(pool_counts)
    cols = ["id", "uid", "kind", "conversations", "model", "prompt_version", "source", "image"]
    pool_rows = RunDir(run).read("short_answer", cols).to_pylist()
    held_qs = colour_questions(RunDir(held_run).read("short_answer", cols).to_pylist())
    t_data = time.perf_counter() - t0
    res: dict = {"urls": n_urls, "fraction": fraction, "power": power, "steps": steps, "seeds": list(seeds)}
    res["counts"] = counts
    res["selection"] = {
        a: {k: shares[a][k] for k in ("images", "tail_share", "head_share", "tail_retention")} for a in arms
    }
    res["held_out"] = {
        "questions": len(held_qs),
        **{b: sum(buckets.get(c) == b for _, c in held_qs) for b in ("tail", "head")},
    }
    res["runs"] = {}
    for seed in seeds:
        parts = make_tiny_all(workdir / f"models_{seed}", seed=seed)
        for arm in arms:
            rows = [r for r in pool_rows if r["uid"] in chosen[arm]]
            out = train_arm(workdir / f"{arm}_{seed}", rows, parts, steps, seed, lr)
            res["runs"][f"{arm}/{seed}"] = {"samples": len(rows), **score(out, held_qs, buckets)}
    res["mean"] = {
        a: {m: float(pl.Series([res["runs"][f"{a}/{s}"][m] for s in seeds]).mean()) for m in ("all", "tail", "head")}
        for a in arms
    }
    b, r = res["mean"]["balanced"], res["mean"]["random"]
    res["tail_gain"], res["head_loss"] = b["tail"] - r["tail"], r["head"] - b["head"]
    res["seconds"] = {"data": round(t_data, 1), "all": round(time.perf_counter() - t0, 1)}
    return res


def table(res: dict) -> str:
    lines = [
        "| arm | images | tail share of objects | tail retention | held-out colour accuracy: tail | head | all "
        "| per seed (tail) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, m in res["mean"].items():
        s = res["selection"][a]
        per = ", ".join(f"{res['runs'][f'{a}/{x}']['tail']:.3f}" for x in res["seeds"])
        lines.append(
            f"| {a} | {s['images']:,} | {s['tail_share']:.3f} | {s['tail_retention']:.3f} | {m['tail']:.3f} | "
            f"{m['head']:.3f} | {m['all']:.3f} | {per} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=12000)
    ap.add_argument("--held-urls", type=int, default=None, help="held-out web size (default urls/3)")
    ap.add_argument("--fraction", type=float, default=0.25, help="balance target_fraction (and the random arm's size)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--web-seed", type=int, default=11)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--power", type=float, default=1.0, help="inverse frequency's power (balance and truth arms)")
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for `make bench`)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    out = args.out or Path(tempfile.mkdtemp(prefix="learning-balance-"))
    res = experiment(
        out,
        args.urls,
        args.held_urls,
        args.fraction,
        args.steps,
        tuple(args.seeds),
        args.web_seed,
        arms=tuple(args.arms),
        power=args.power,
    )
    if args.json:
        print(json.dumps(res))
        return
    print(table(res))
    print(json.dumps({k: res[k] for k in ("held_out", "tail_gain", "head_loss", "seconds")}))


if __name__ == "__main__":
    main()
