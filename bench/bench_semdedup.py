"""Semantic dedup (issue 15) on synthetic L2-normalised embeddings with planted semantic duplicates.

    python bench/bench_semdedup.py --n 1000000 --dim 512 [--eps 0.01] [--json]

Rows are noisy points around `--topics` topic centres (siblings far below 1 - eps), plus planted copies of some of
them at known cosines: half above 1 - eps (duplicates to find), half below (near misses to keep). Measures
curation.dedup.semantic.semantic_dedup (seeded FAISS k-means on a sample, greedy leaders within each cluster):
wall seconds split into k-means and pairwise, peak RSS, precision and recall against the planted copies; and, side
by side on a sample that holds whole planted pairs, the brute-force reference (all pairs, no clusters): its time
and how many rows get the same decision. Then the op's global step as it runs at scale (clusters spread over
tasks of --spread-bucket-mib, curation.dedup.semantic_parts) in a child process: time, peak RSS, agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_near_dup import peak_rss_mb, reset_peak_rss

from curation.dedup.semantic import brute_force_semantic, kmeans_assign, n_clusters_for, semantic_dedup


def make_embeddings(n: int, d: int, n_pairs: int, eps: float, topics: int, seed: int, chunk: int = 65536):
    """emb [n, d] float32 unit rows: the last n_pairs are copies of distinct earlier rows `src` at cosine `cos`
    (the first half in [1 - 0.7 eps, 1 - 0.1 eps], the second in [1 - 5 eps, 1 - 1.5 eps])."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, d), np.float32)
    n_base = n - n_pairs
    for s in range(0, n_base, chunk):
        e = min(n_base, s + chunk)
        x = centres[rng.integers(0, topics, e - s)] + rng.standard_normal((e - s, d), dtype=np.float32) * (
            1.0 / np.sqrt(d)
        )
        emb[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n_base, n_pairs, replace=False)
    half = n_pairs // 2
    cos = np.concatenate(
        [rng.uniform(1 - 0.7 * eps, 1 - 0.1 * eps, half), rng.uniform(1 - 5 * eps, 1 - 1.5 * eps, n_pairs - half)]
    )
    for s in range(0, n_pairs, chunk):  # y = c x + sqrt(1 - c^2) u, u a unit vector orthogonal to x
        e = min(n_pairs, s + chunk)
        x = emb[src[s:e]]
        u = rng.standard_normal(x.shape, dtype=np.float32)
        u -= (u * x).sum(axis=1, keepdims=True) * x
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        c = cos[s:e, None].astype(np.float32)
        y = c * x + np.sqrt(1 - c * c) * u
        emb[n_base + s : n_base + e] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return emb, src, cos


def score(leader: np.ndarray, n_base: int, src: np.ndarray, cos: np.ndarray, eps: float) -> dict:
    """Precision and recall of the rejected rows against the planted copies at cosine >= 1 - eps."""
    rejected = leader != np.arange(leader.size)
    truth = np.zeros(leader.size, bool)
    truth[n_base + np.flatnonzero(cos >= 1 - eps)] = True
    tp = int((rejected & truth).sum())
    right_leader = int((leader[n_base:][cos >= 1 - eps] == src[cos >= 1 - eps]).sum())
    return {
        "rejected": int(rejected.sum()),
        "planted_dups": int(truth.sum()),
        "precision": tp / max(1, int(rejected.sum())),
        "recall": tp / max(1, int(truth.sum())),
        "kept_its_original": right_leader / max(1, int(truth.sum())),
    }


def spread(emb: np.ndarray, leader: np.ndarray, args) -> dict:
    """The op's global step as it runs at scale (curation.dedup.semantic_parts): the rows as the engine's analyze
    phase leaves them (10,000-row part files), decided in a child process that holds only what the steps need
    (one task after another, as on one core): its seconds, its peak RSS, and agreement with the one-array run."""
    import subprocess
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = emb.shape
    with tempfile.TemporaryDirectory(prefix="semdedup-") as tmp:
        files = {}
        for i, s in enumerate(range(0, n, 10_000)):
            e = min(n, s + 10_000)
            col = pa.FixedSizeListArray.from_arrays(pa.array(emb[s:e].reshape(-1)), d).cast(pa.list_(pa.float32()))
            t = pa.table({"uid": [f"u{j:08d}" for j in range(s, e)], "embedding": col, "pixels": np.zeros(e - s)})
            files[f"part-{i:05d}"] = str(Path(tmp) / f"part-{i:05d}.parquet")
            pq.write_table(t, files[f"part-{i:05d}"])
        job = {"files": files, "out": str(Path(tmp) / "decisions"), "eps": args.eps, "seed": args.seed}
        job |= {"rows_per_cluster": args.rows_per_cluster, "sample": args.kmeans_sample, "niter": args.niter}
        job["bucket_bytes"] = args.spread_bucket_mib << 20
        p = subprocess.run(
            [sys.executable, __file__, "--spread-child", json.dumps(job)], capture_output=True, text=True, check=True
        )
        res = json.loads(p.stdout.strip().splitlines()[-1])
        dec = pa.concat_tables([pq.read_table(f) for f in Path(job["out"]).glob("*/*.parquet")])
    uid = np.array([int(u[1:]) for u in dec.column("uid").to_pylist()])
    kept = dec.column("kept_uid").to_pylist()
    mine = np.array([u if k is None else int(k[1:]) for u, k in zip(uid, kept)])  # uid u{i} is row i
    want = leader[uid]
    return {
        "spread_bucket_mib": args.spread_bucket_mib,
        "spread_buckets": res["buckets"],
        "spread_seconds": res["seconds"],
        "spread_peak_rss_mb": res["peak_rss_mb"],
        "spread_agree": round(float((mine == want).mean()), 5),
        "spread_rows": int(uid.size),
    }


def spread_child(job: dict) -> None:
    from curation.dedup.semantic_parts import semantic_dedup_parts

    t0 = time.perf_counter()
    files = {p: Path(f) for p, f in job.pop("files").items()}
    out, eps = Path(job.pop("out")), job.pop("eps")
    info = semantic_dedup_parts(files, out, eps, **job)
    print(json.dumps({**info, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--pairs", type=float, default=0.05, help="planted copies, as a fraction of n")
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--rows-per-cluster", type=int, default=1000)
    ap.add_argument("--kmeans-sample", type=int, default=65536)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--sample", type=int, default=10_000, help="rows of the brute-force side-by-side run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread-bucket-mib", type=int, default=256, help="also the spread global step (0: not)")
    ap.add_argument("--spread-child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.spread_child:
        return spread_child(json.loads(args.spread_child))

    n_pairs = int(args.n * args.pairs)
    t0 = time.perf_counter()
    emb, src, cos = make_embeddings(args.n, args.dim, n_pairs, args.eps, args.topics, args.seed)
    gen_s = time.perf_counter() - t0
    n_base = args.n - n_pairs
    k = n_clusters_for(args.n, args.rows_per_cluster)

    reset_ok = reset_peak_rss()
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    labels = kmeans_assign(emb, k, sample=args.kmeans_sample, seed=args.seed, niter=args.niter)
    kmeans_s = time.perf_counter() - t0
    r = semantic_dedup(emb, args.eps, labels=labels)
    seconds = time.perf_counter() - t0
    rss_peak = peak_rss_mb()
    full = score(r.leader, n_base, src, cos, args.eps)
    sizes = np.bincount(labels, minlength=k)

    # side by side: brute force and semdedup on a sample of whole planted pairs plus base rows
    rng = np.random.default_rng(args.seed + 1)
    m = min(args.sample // 2, n_pairs) // 2 * 2
    pairs = rng.choice(n_pairs, m // 2, replace=False)
    others = rng.choice(np.setdiff1d(np.arange(n_base), src[pairs]), args.sample - m, replace=False)
    base_rows = np.sort(np.concatenate([others, src[pairs]]))
    rows = np.concatenate([base_rows, n_base + np.sort(pairs)])  # priority: base rows first, as in the full run
    sub = emb[rows]
    t1 = time.perf_counter()
    fast = semantic_dedup(sub, args.eps, rows_per_cluster=args.rows_per_cluster, seed=args.seed, niter=args.niter)
    sample_fast_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    brute = brute_force_semantic(sub, args.eps)
    sample_brute_s = time.perf_counter() - t1
    agree = float((fast.leader == brute.leader).mean())

    out = {
        "n": args.n,
        "dim": args.dim,
        "eps": args.eps,
        "n_clusters": k,
        "kmeans_sample": min(args.n, args.kmeans_sample),
        "niter": args.niter,
        "cluster_size_max": int(sizes.max()),
        "cluster_size_median": float(np.median(sizes)),
        "generate_seconds": round(gen_s, 2),
        "seconds": round(seconds, 2),
        "kmeans_seconds": round(kmeans_s, 2),
        "pairwise_seconds": round(seconds - kmeans_s, 2),
        "peak_rss_mb": round(rss_peak, 1),
        "rss_before_mb": round(rss_before, 1),  # the embeddings themselves (n x dim x 4 bytes) and the interpreter
        "rss_reset": reset_ok,
        **full,
        "sample_n": int(rows.size),
        "sample_fast_s": round(sample_fast_s, 3),
        "sample_brute_s": round(sample_brute_s, 3),
        "sample_agree": round(agree, 5),
        "sample_brute_precision": score(
            brute.leader, base_rows.size, np.searchsorted(rows, src[np.sort(pairs)]), cos[np.sort(pairs)], args.eps
        )["precision"],
    }
    if args.spread_bucket_mib:
        del sub, fast, brute
        out.update(spread(emb, r.leader, args))
    if args.json:
        print(json.dumps(out))
    else:
        for key, v in out.items():
            print(f"{key:>24}: {v}")


if __name__ == "__main__":
    main()
