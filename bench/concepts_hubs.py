"""Why feature top-5 recall stays low (issue 16, item 3): re-rank bench_concepts' stored embeddings three ways.

    .venv/bin/python bench/bench_concepts.py --n 6000 --steps 600   # writes bench/out/concepts (the input here)
    .venv/bin/python bench/concepts_hubs.py [--out bench/out/concepts]

Reads the trained tower's image embeddings (`embed_trained`) and the vocabulary's cached text embeddings, and
prints recall@5 of the drawn compounds (all images / one compound / 2-3) for: the raw cosine (what match_concepts
does), CSLS hubness correction (2 cos - r_c, r_c = mean of the concept's k best image cosines; k = 5, 10, 50), the
cosine minus each entry's mean, and the vocabulary without caption bigrams holding a function word ("a green",
"cross on") and without case duplicates; then the rank of the right compound on one-compound images and the
entries that most often take a top-5 place from it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FUNCTION_WORDS = frozenset(
    "a an the on in of with and against at to for by from is are this that it its or as over near".split()  # noqa: SIM905
)


def main() -> None:
    from curation.concepts.embeddings import ConceptCache
    from curation.concepts.truth import _singular, image_concepts
    from schemas.rundir import read_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "concepts")
    out = ap.parse_args().out
    run, web = out / "run", out / "web"
    tabs = [read_file(f, ["uid", "image_embedding", "model"]) for f in sorted((run / "embed_trained").glob("part-*"))]
    uids = [u for t in tabs for u in t.column("uid").to_pylist()]
    emb = [t.column("image_embedding").combine_chunks() for t in tabs]
    x = np.concatenate([np.asarray(e.flatten(), np.float32).reshape(len(e), -1) for e in emb])  # [N, D]
    model_id = tabs[0].column("model")[0].as_py()
    cache = next(
        c
        for c in (ConceptCache(str(out / "vocab.parquet"), model_id, t, str(out / "cache")) for t in ("{}", "a {}"))
        if c.ready()
    )
    raw = cache.vocab.column("text").to_pylist()
    source = cache.vocab.column("source").to_pylist()
    names = [_singular(t) for t in raw]
    truth = image_concepts(run, web / "truth.parquet")
    drawn = {u: set(c) for u, c in zip(truth["uid"].to_list(), truth["concepts"].to_list()) if c}
    s = x @ cache.embeddings().astype(np.float32).T  # [N, C]

    def recall(scores: np.ndarray, k: int = 5) -> tuple[float, float, float]:
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        per = [(len(drawn[u] & {names[j] for j in top[i]}) / len(drawn[u]), len(drawn[u]) == 1)
               for i, u in enumerate(uids) if u in drawn]  # fmt: skip
        mean = lambda rs: round(float(np.mean(rs)), 3)  # noqa: E731
        return mean([r for r, _ in per]), mean([r for r, o in per if o]), mean([r for r, o in per if not o])

    print("images", len(uids), "entries", len(raw), "(all / one compound / 2-3)")
    print("raw cosine            ", recall(s))
    for k in (5, 10, 50):
        print(f"CSLS k={k:<3}            ", recall(2 * s - (-np.sort(-s, axis=0)[:k]).mean(0)[None, :]))
    print("cosine - entry mean   ", recall(s - s.mean(0)[None, :]))
    keep = np.array([not (src == "bigram" and FUNCTION_WORDS & set(t.lower().split())) for t, src in zip(raw, source)])
    seen: set[str] = set()
    for j, t in enumerate(raw):
        keep[j] &= t.lower() not in seen
        seen.add(t.lower())
    print(f"pruned vocabulary ({keep.sum()})", recall(np.where(keep[None, :], s, -9.0)))
    ranks, thieves = [], Counter()
    for i, u in enumerate(uids):
        if len(drawn.get(u, ())) != 1:
            continue
        order = np.argsort(-s[i])
        ranks.append(next(r for r, j in enumerate(order) if names[j] in drawn[u]))
        thieves.update(raw[j] for j in order[:5] if names[j] not in drawn[u])
    ranks = np.array(ranks)
    print(
        "one compound: right entry at rank < 1/5/10/20:", [round(float((ranks < k).mean()), 3) for k in (1, 5, 10, 20)]
    )
    print("entries taking top-5 places most often:", thieves.most_common(20))


if __name__ == "__main__":
    main()
