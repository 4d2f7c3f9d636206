"""Why feature top-5 recall stays low (issue 16, item 3): re-rank bench_concepts' stored embeddings three ways.

    .venv/bin/python bench/bench_concepts.py --n 6000 --steps 600   # writes bench/out/concepts (the input here)
    .venv/bin/python bench/concepts_hubs.py [--out bench/out/concepts]

Reads the trained tower's image embeddings (`embed_trained`) and the vocabulary's cached text embeddings, and
prints recall@5 of the drawn compounds (all images / one compound / 2-3) for: the raw cosine (what match_concepts
does), CSLS hubness correction (2 cos - r_c, r_c = mean of the concept's k best image cosines; k = 5, 10, 50), the
cosine minus each entry's mean, and the vocabulary without caption bigrams holding a function word ("a green",
"cross on") and without case duplicates; then the rank of the right compound on one-compound images and the
entries that most often take a top-5 place from it, and the recall when a compound's French or Spanish name counts
as the compound. Then, against the full vocabulary and the 72 compound names
alone: querybank normalisation (Bogolin et al., CVPR 2022: each entry's cosine as an inverted softmax over a bank
of 1,000 images), matching pursuit (take the best entry, remove its direction from the image embedding, search
again: SpLiCE-like, for images of several objects), and region crops (the image and 5 crops of 60% of its sides
embedded by the tower; merged by each entry's best cosine, or round-robin: the image's 2 best, then each crop's
best not yet taken), on the first `--crop-images` judged images.
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
    from curation.fixtures.words import names_abroad
    from schemas.rundir import read_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "concepts")
    ap.add_argument("--tower", type=Path, help="the checkpoint embed_trained used (default: OUT/models/trained.pt)")
    ap.add_argument("--crop-images", type=int, default=1200, help="judged images embedded with their crops")
    args = ap.parse_args()
    out = args.out
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

    judged = [i for i, u in enumerate(uids) if u in drawn]

    def recall_of(tops, drawn_sets=None) -> tuple[float, float, float]:
        """(all, one compound, 2-3) recall of each judged image's top names."""
        sets = drawn_sets or [drawn[uids[i]] for i in judged]
        per = [(len(d & set(t)) / len(d), len(d) == 1) for t, d in zip(tops, sets)]
        mean = lambda rs: round(float(np.mean(rs)), 3)  # noqa: E731
        return mean([r for r, _ in per]), mean([r for r, o in per if o]), mean([r for r, o in per if not o])

    def recall(scores: np.ndarray) -> tuple[float, float, float]:
        """recall_of the top 5 entries of each judged image's `scores` row [N, C]."""
        return recall_of([names[j] for j in top5(scores[i])] for i in judged)

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
    abroad = {k: f"{c} {s}" for k, (c, s) in names_abroad().items()}
    print(
        f"raw cosine, a French or Spanish name counted as its compound ({sum(t in abroad for t in raw)} entries)",
        recall_of([abroad.get(raw[j], names[j]) for j in top5(s[i])] for i in judged),
    )

    compounds = ConceptCache(str(out / "compounds.parquet"), model_id, cache.template, str(out / "cache"))
    for label, vocab in (("full vocabulary", cache), ("72 names", compounds)):
        v = vocab.embeddings().astype(np.float32)  # [C, D]
        vnames = [_singular(t) for t in vocab.vocab.column("text").to_pylist()]
        bank = x[np.random.default_rng(0).choice(len(x), min(1000, len(x)), replace=False)] @ v.T  # [B, C]
        sv = s if vocab is cache else x @ v.T  # [N, C]
        print(f"{label}: raw cosine", recall_of([vnames[j] for j in top5(sv[i])] for i in judged))
        for beta in (10, 100):
            norm = np.log(np.exp(beta * (bank - bank.max(0))).sum(0)) + beta * bank.max(0)  # [C]
            qb = ([vnames[j] for j in top5(beta * sv[i] - norm)] for i in judged)
            print(f"{label}: querybank norm beta={beta}", recall_of(qb))
        print(f"{label}: matching pursuit", recall_of([vnames[j] for j in pursuit(x[i], v)] for i in judged))
        sub = judged[: args.crop_images]
        crops = crop_embeddings(run, [uids[i] for i in sub], args.tower or out / "models" / "trained.pt")
        sc = crops @ v.T  # [n, 6, C]
        dr = [drawn[uids[i]] for i in sub]
        print(f"{label}: {len(sub)} images, raw cosine", recall_of(([vnames[j] for j in top5(c[0])] for c in sc), dr))
        print(f"{label}: crops, best cosine", recall_of(([vnames[j] for j in top5(c.max(0))] for c in sc), dr))
        print(f"{label}: crops, round-robin", recall_of((round_robin(c, vnames) for c in sc), dr))


def top5(scores: np.ndarray) -> np.ndarray:
    """The 5 best entries of one row of scores, best first."""
    top = np.argpartition(-scores, 5)[:5]
    return top[np.argsort(-scores[top])]


def pursuit(q: np.ndarray, v: np.ndarray, k: int = 5) -> list[int]:
    """Greedy matching pursuit: the best entry, then the best for what the picked entries leave of q."""
    picked, r = [], q.copy()
    for _ in range(k):
        j = next(j for j in np.argsort(-(v @ r)) if j not in picked)
        picked.append(j)
        r = r - (r @ v[j]) * v[j]
    return picked


def round_robin(s: np.ndarray, names: list[str], k: int = 5) -> list[str]:
    """s [1 + crops, C]: the whole image's 2 best names, then each crop's best name not yet taken, in turn."""
    orders = [iter(np.argsort(-row)) for row in s]
    got = [names[j] for j in np.argsort(-s[0])[:2]]
    while len(got) < k:
        for o in orders[1:]:
            name = next(names[j] for j in o if names[j] not in got)
            if len(got) < k:
                got.append(name)
    return got


def crop_embeddings(run: Path, uids: list[str], tower: Path) -> np.ndarray:
    """[N, 6, D]: each image and its 4 corner and 1 centre crops of 60% of its sides, through the tower."""
    import io

    import polars as pl
    from PIL import Image

    from curation.concepts.clip import TRAINABLE_MODEL, load_clip

    clip = load_clip(TRAINABLE_MODEL, str(tower), "fp32")
    images = pl.read_parquet(run / "ingest" / "part-*.parquet", columns=["uid", "image"])
    data = dict(zip(images["uid"].to_list(), images["image"].to_list()))
    flat = []
    for u in uids:
        im = Image.open(io.BytesIO(data[u])).convert("RGB")
        w, h = im.size
        cw, ch = int(w * 0.6), int(h * 0.6)
        flat.append(data[u])
        for x0, y0 in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2)):
            buf = io.BytesIO()
            im.crop((x0, y0, x0 + cw, y0 + ch)).save(buf, "PNG")
            flat.append(buf.getvalue())
    emb, _, errors = clip.encode_images(flat, batch_size=64)
    assert not errors, errors
    return emb.reshape(len(uids), 6, -1)


if __name__ == "__main__":
    main()
