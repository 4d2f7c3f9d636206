"""Benchmark near-duplicate grouping of 64-bit pHashes as dedup groups them (greedy leaders, each candidate verified
by a 192-byte colour thumbnail): fast path at full size, brute force on a sample; connected components (the grouping
before issue 15) timed beside it."""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from curation.dedup.leaders import brute_force_leaders, leader_groups
from curation.dedup.neardup import choose_plan, near_duplicate_groups, phash_u64
from curation.dedup.signals import thumb_diff


def thumbnails(groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """An 8x8 RGB thumbnail per item [N, 192] uint8: its planted group's, give or take 3 levels per channel."""
    rng = np.random.default_rng(seed)
    base = rng.integers(20, 236, size=(int(groups.max()) + 1, 192), dtype=np.uint8)
    return base[groups] + rng.integers(0, 4, size=(groups.size, 192), dtype=np.uint8)


def verifier(thumbs: np.ndarray, max_diff: int = 20):
    """dedup's check: no thumbnail cell differs by more than max_diff in any channel."""

    def verify(leader: int, cand: np.ndarray) -> np.ndarray:
        return thumb_diff(thumbs[cand], thumbs[leader]) <= max_diff

    return verify


def flip_bits(base: np.ndarray, n_flips: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip exactly n_flips[i] distinct random bits of base[i] (uint64 arrays of equal length)."""
    out = base.copy()
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)  # [64] value of each bit
    for start in range(0, base.size, 100_000):  # bounded temporaries: [chunk, 64] floats
        rank = rng.random((min(100_000, base.size - start), 64)).argsort(axis=1)  # random bit order per row
        chosen = rank < n_flips[start : start + 100_000, None]  # [chunk, 64] bool, n_flips true per row
        out[start : start + 100_000] ^= np.bitwise_or.reduce(np.where(chosen, weights, np.uint64(0)), axis=1)
    return out


def make_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Realistic-ish pHash mix of n items: returns (hashes uint64 [n], planted group id int64 [n]), shuffled.

    About 55% unrelated random hashes, 35% in near-duplicate clusters of 2-10 variants that differ from the
    cluster centre by 1-6 bits, 5% exact copies, plus 1,000 blank-image copies and one dense cluster of
    2,000 distinct hashes within 3 bits of a single centre.
    """
    rng = np.random.default_rng(seed)
    blank = phash_u64(Image.new("L", (64, 64), 128))
    n_blank, n_dense = min(1_000, n // 20), min(2_000, n // 20)
    n_copies = n // 20
    n_clustered = int(n * 0.35)
    n_random = n - n_blank - n_dense - n_copies - n_clustered

    def random_u64(k: int) -> np.ndarray:
        return rng.integers(0, 2**64, size=k, dtype=np.uint64)

    sizes = rng.integers(2, 11, size=max(1, n_clustered // 6))  # [C] cluster sizes
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_clustered) + 1]
    sizes[-1] -= sizes.sum() - n_clustered
    centres = random_u64(sizes.size)
    cluster_of = np.repeat(np.arange(sizes.size), sizes)  # [n_clustered]
    variants = flip_bits(centres[cluster_of], rng.integers(1, 7, size=n_clustered), rng)

    dense = flip_bits(np.full(n_dense, random_u64(1)[0]), rng.integers(1, 4, size=n_dense), rng)
    hashes = np.concatenate([random_u64(n_random), variants, dense, np.full(n_blank, blank, dtype=np.uint64)])
    groups = np.concatenate(
        [
            np.arange(n_random),
            n_random + cluster_of,
            np.full(n_dense, n_random + sizes.size),
            np.full(n_blank, n_random + sizes.size + 1),
        ]
    )
    src = rng.integers(0, hashes.size, size=n_copies)  # exact copies of earlier items
    hashes, groups = np.concatenate([hashes, hashes[src]]), np.concatenate([groups, groups[src]])
    perm = rng.permutation(n)
    return hashes[perm], groups[perm]


def make_dense_ball(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Worst case for bucketing: n draws from all 43,745 hashes within 3 bits of one centre (one group)."""
    rng = np.random.default_rng(seed)
    centre = int(rng.integers(0, 2**64, dtype=np.uint64))
    flips = [sum(1 << b for b in bits) for k in range(4) for bits in itertools.combinations(range(64), k)]
    ball = np.array([centre ^ f for f in flips], dtype=np.uint64)  # [43745] pairwise distance <= 6
    return ball[rng.integers(0, ball.size, size=n)], np.zeros(n, dtype=np.int64)


def sample_by_group(groups: np.ndarray, k: int, seed: int = 1) -> np.ndarray:
    """Indices of about k items taken as whole planted groups, so the sample keeps its clusters."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    picked = rng.permutation(uniq)
    sizes = np.bincount(groups)[picked]
    take = picked[: np.searchsorted(np.cumsum(sizes), k) + 1]
    return np.flatnonzero(np.isin(groups, take))[:k]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MiB: VmHWM (since the last reset) or ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    """Run fn and return (result, wall seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    """Parse arguments, run both measurements, print a markdown table (and a JSON line with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000, help="number of hashes to group")
    parser.add_argument("--max-distance", type=int, default=6, help="Hamming radius for near duplicates")
    parser.add_argument("--sample", type=int, default=20_000, help="sample size for the brute-force baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scenario",
        choices=["mix", "dense"],
        default="mix",
        help="mix: random + planted clusters + copies; dense: one tight ball of 43,745 distinct hashes",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    args = parser.parse_args()

    make = make_hashes if args.scenario == "mix" else make_dense_ball
    hashes, groups = make(args.n, args.seed)
    n_unique = int(np.unique(hashes).size)
    plan = choose_plan(n_unique, args.max_distance)

    thumbs = thumbnails(groups, args.seed)
    reset_ok = reset_peak_rss()
    rss_before = peak_rss_mb()
    labels, seconds = timed(leader_groups, hashes, args.max_distance, verify=verifier(thumbs))
    rss_peak = peak_rss_mb()
    n_groups = int(np.unique(labels).size)
    _, components_s = timed(near_duplicate_groups, hashes, args.max_distance)

    idx = sample_by_group(groups, args.sample)
    sample, sample_verify = hashes[idx], verifier(thumbs[idx])
    fast, fast_s = timed(leader_groups, sample, args.max_distance, verify=sample_verify)
    brute, brute_s = timed(brute_force_leaders, sample, args.max_distance, sample_verify)
    agree = bool(np.array_equal(fast, brute))

    figures = {
        "scenario": args.scenario,
        "n": args.n,
        "n_unique": n_unique,
        "max_distance": args.max_distance,
        "plan": plan.describe(),
        "seconds": round(seconds, 3),
        "components_seconds": round(components_s, 3),
        "peak_rss_mb": round(rss_peak, 1),  # process peak while grouping (VmHWM reset just before)
        "rss_before_mb": round(rss_before, 1),
        "peak_is_grouping_only": reset_ok,
        "groups": n_groups,
        "sample_n": int(idx.size),
        "sample_fast_s": round(fast_s, 4),
        "sample_brute_s": round(brute_s, 4),
        "speedup": round(brute_s / fast_s, 1) if fast_s > 0 else None,
        "agree": agree,
    }
    print("| measure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    if args.json:
        print(json.dumps(figures))
    if not agree:
        raise SystemExit("fast and brute-force labels disagree on the sample")


if __name__ == "__main__":
    main()
