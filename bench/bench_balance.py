"""Benchmark concept balancing at pool scale, against a pandas explode + groupby baseline on a sample."""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd

from curation.concepts import sampling as bal


def zipf_matches(n: int, k: int, n_concepts: int, s: float = 1.1, seed: int = 0) -> np.ndarray:
    """Raw (not deduplicated) entry ids int64 [n * k]: k draws per image from a Zipf(s) law over the entries."""
    rng = np.random.default_rng(seed)
    rank_to_id = rng.permutation(n_concepts).astype(np.int64)  # [C] frequent entries scattered over the ids
    out = np.empty(n * k, dtype=np.int64)
    lo, span = 1.0, float(n_concepts + 1) ** (1.0 - s) - 1.0
    for a in range(0, out.size, 1 << 24):  # inverse CDF of a power law on [1, C+1), 16M draws at a time
        u = rng.random(min(1 << 24, out.size - a))
        ranks = np.floor((lo + u * span) ** (1.0 / (1.0 - s))).astype(np.int64) - 1  # [chunk] 0-based rank
        out[a : a + u.size] = rank_to_id[np.minimum(ranks, n_concepts - 1)]
    return out


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Collects named wall-clock timings in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        """Run fn(*args, **kwargs), record its wall time under name, return its result."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 3)
        return result


def pandas_baseline(lists: list[list[int]], t: float) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward pandas: explode, per-entry counts, per-image MetaCLIP prob and inverse-frequency weight."""
    df = pd.DataFrame({"concepts": lists}).explode("concepts").dropna()
    df = df.rename_axis("image").reset_index()
    df["concepts"] = df["concepts"].astype(np.int64)
    df = df.drop_duplicates(["image", "concepts"])
    counts = df.groupby("concepts")["image"].transform("size").astype(np.float64)
    df["q"] = 1.0 - np.minimum(1.0, t / counts)
    df["inv"] = 1.0 / counts
    probs = np.zeros(len(lists))
    weights = np.zeros(len(lists))
    grouped = df.groupby("image")
    keep = 1.0 - grouped["q"].prod()
    probs[keep.index.to_numpy()] = keep.to_numpy()
    inv = grouped["inv"].sum()
    weights[inv.index.to_numpy()] = inv.to_numpy()
    return probs, weights


def compare_sample(raw: np.ndarray, k: int, n_sample: int, t: float, n_concepts: int) -> dict:
    """Time pandas vs this module on the first n_sample images taken as a pool of their own; check equal results."""
    rows = raw[: n_sample * k].reshape(n_sample, k)
    lists = rows.tolist()  # [n_sample] python lists, the form a naive pipeline would hold
    start = time.perf_counter()
    pd_probs, pd_weights = pandas_baseline(lists, t)
    pd_s = time.perf_counter() - start
    start = time.perf_counter()
    offsets, ids = bal.dedupe_rows(np.arange(0, n_sample * k + 1, k), rows.reshape(-1))
    counts = bal.concept_counts(ids, n_concepts)
    probs = bal.metaclip_probs(offsets, ids, counts, t)
    weights = bal.inverse_frequency_weights(offsets, ids, counts)
    np_s = time.perf_counter() - start
    return {
        "images": n_sample,
        "t": t,
        "pandas_s": round(pd_s, 3),
        "numpy_s": round(np_s, 3),
        "speedup": round(pd_s / np_s, 1),
        "probs_max_abs_diff": float(np.max(np.abs(pd_probs - probs))),
        "probs_exactly_equal_frac": float(np.mean(pd_probs == probs)),
        "weights_max_rel_diff": float(np.max(np.abs(pd_weights - weights) / np.maximum(weights, 1e-300))),
        "same_results": bool(
            np.allclose(pd_probs, probs, rtol=0, atol=1e-12) and np.allclose(pd_weights, weights, rtol=1e-12)
        ),
    }


def main() -> None:
    """Parse arguments, run the full-size pipeline and the pandas comparison, print a report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000_000, help="images in the synthetic pool")
    ap.add_argument("--k", type=int, default=20, help="entry draws per image (before per-image dedup)")
    ap.add_argument("--concepts", type=int, default=500_000, help="entries in the vocabulary")
    ap.add_argument("--sample", type=int, default=200_000, help="images in the pandas comparison")
    ap.add_argument("--t", type=float, default=None, help="MetaCLIP threshold (default: found for --keep-frac)")
    ap.add_argument("--keep-frac", type=float, default=0.25, help="expected MetaCLIP keep rate when --t is unset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    n, k, c = args.n, args.k, args.concepts
    tm = Timer()

    gen_start = time.perf_counter()
    raw = zipf_matches(n, k, c, seed=args.seed)  # [n*k] int64, data preparation, not timed below
    gen_s = time.perf_counter() - gen_start
    sub = min(n, 1_000_000)  # t search on a sub-pool: every bisection step is one metaclip_probs pass
    sub_offsets, sub_ids = bal.dedupe_rows(np.arange(0, sub * k + 1, k, dtype=np.int64), raw[: sub * k])
    sub_counts = bal.concept_counts(sub_ids, c)
    t_sub = tm("t_for_target_size_1M", bal.t_for_target_size, sub_offsets, sub_ids, sub_counts, sub * args.keep_frac)
    del sub_offsets, sub_ids
    t = args.t if args.t is not None else t_sub * n / sub  # counts grow linearly with the pool, so does t
    n_sample = min(args.sample, n)
    sample = compare_sample(raw, k, n_sample, t * n_sample / n, c)

    start = time.perf_counter()
    offsets, ids = tm("dedupe", bal.dedupe_rows, np.arange(0, n * k + 1, k, dtype=np.int64), raw)
    del raw
    uids = np.arange(n, dtype=np.int64) * 1_000_003 + 17  # [n] stand-in for stable 64-bit image ids
    counts = tm("counts", bal.concept_counts, ids, c)
    probs = tm("metaclip_probs", bal.metaclip_probs, offsets, ids, counts, t)
    keep = tm("keep_mask", bal.keep_mask, uids, probs, args.seed)
    before = tm("coverage_before", bal.coverage, offsets, ids, c, None, t)
    after = tm("coverage_metaclip", bal.coverage, offsets, ids, c, keep, t)
    weights = tm("if_weights", bal.inverse_frequency_weights, offsets, ids, counts)
    chosen = tm("weighted_sample_10pct", bal.weighted_sample, uids, weights, n // 10, args.seed)
    weighted = tm("coverage_weighted", bal.coverage, offsets, ids, c, chosen, t)
    total_s = time.perf_counter() - start

    str_uids = np.array([f"laion/{i:012d}.jpg" for i in range(min(n, 1_000_000))])
    tm("uid_hash_1M_strings", bal.uid_hash, str_uids)

    report = {
        "n_images": n,
        "k": k,
        "n_concepts": c,
        "n_matches_after_dedupe": int(ids.size),
        "t": round(t, 4),
        "t_source": "--t" if args.t is not None else f"t_for_target_size on {sub} images, keep_frac {args.keep_frac}",
        "generate_s": round(gen_s, 3),
        "seconds": tm.seconds,
        "pipeline_total_s": round(total_s, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "kept_metaclip": int(keep.sum()),
        "kept_metaclip_frac": round(float(keep.mean()), 4),
        "expected_metaclip": round(float(probs.sum()), 1),
        "coverage_before": before,
        "coverage_metaclip": after,
        "coverage_weighted_10pct": weighted,
        "pandas_vs_numpy_sample": sample,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k2, v2 in value.items():
                print(f"  {k2:32s} {v2}")
        else:
            print(f"{key:34s} {value}")


if __name__ == "__main__":
    main()
