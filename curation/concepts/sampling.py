"""Concept balancing of image pools: MetaCLIP probabilities, inverse-frequency sampling, coverage metrics.

Matches are stored as CSR: `offsets` int64 [N+1] and `concept_ids` int64 [M]; image i matched the
entries `concept_ids[offsets[i]:offsets[i+1]]`. Every function here expects each image's entries to be
unique (an entry found twice in one caption counts once); `csr_from_lists` and `dedupe_rows` make them so.

Randomness never comes from a stateful generator: image i draws u_i = U(hash(uid_i), seed) in (0, 1), so a
selection depends only on (uid, seed, probability or weight), never on row order or on how rows are split
across workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

ROW_CHUNK = 1 << 20  # images processed at once; bounds temporaries to ~ROW_CHUNK * K * 8 bytes
DEDUPE_BLOCK = 1 << 16  # images sorted at once by dedupe_rows; measured fastest of 2**14..2**20 here
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# ---------------------------------------------------------------- CSR helpers


def csr_from_lists(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Build deduplicated CSR (offsets int64 [N+1], concept_ids int64 [M]) from a list of per-image id lists."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))  # [N]
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((c for row in lists for c in row), dtype=np.int64, count=int(offsets[-1]))  # [M]
    return dedupe_rows(offsets, flat)


def dedupe_rows(offsets: np.ndarray, concept_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each image's entries and drop repeats within an image; returns new (offsets, concept_ids)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    concept_ids = np.asarray(concept_ids, dtype=np.int64)
    lengths = np.diff(offsets)  # [N]
    n = lengths.size
    if n == 0 or concept_ids.size == 0:
        return offsets.copy(), concept_ids.copy()
    width = int(lengths.max())
    if np.all(lengths == width):  # uniform rows: sort dense [rows, K] blocks in place, far faster than a keyed sort
        dense = concept_ids.reshape(n, width)  # [N, K] view
        buf = np.empty(concept_ids.size, dtype=np.int64)  # [M] output, trimmed by a view at the end
        new_lengths = np.empty(n, dtype=np.int64)
        block = min(DEDUPE_BLOCK, n)
        work = np.empty((block, width), dtype=np.int64)  # reused: fresh big temporaries cost page faults
        first = np.ones((block, width), dtype=bool)  # column 0 stays True: a row's first entry is always new
        filled = 0
        for a in range(0, n, block):
            rows = min(block, n - a)
            w, f = work[:rows], first[:rows]
            w[...] = dense[a : a + rows]
            w.sort(axis=1)
            np.not_equal(w[:, 1:], w[:, :-1], out=f[:, 1:])  # True at the first copy of each entry
            new_lengths[a : a + rows] = f.sum(axis=1)
            kept = w[f]  # row-major, so rows stay in order
            buf[filled : filled + kept.size] = kept
            filled += kept.size
        flat = buf[:filled]
    else:
        rows = np.repeat(np.arange(n, dtype=np.int64), lengths)  # [M] image index per match
        order = np.lexsort((concept_ids, rows))  # [M] by image, then entry
        ids, rows = concept_ids[order], rows[order]
        first = np.ones(ids.size, dtype=bool)
        first[1:] = (ids[1:] != ids[:-1]) | (rows[1:] != rows[:-1])
        flat = ids[first]
        new_lengths = np.bincount(rows[first], minlength=n)  # [N]
    new_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=new_offsets[1:])
    return new_offsets, flat


def _row_chunks(offsets: np.ndarray, chunk: int = ROW_CHUNK):
    """Yield (row_start, row_stop, match_start, match_stop) covering all images in blocks of `chunk` rows."""
    n = offsets.size - 1
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        yield a, b, int(offsets[a]), int(offsets[b])


def _segment_reduce(ufunc: np.ufunc, values: np.ndarray, offsets: np.ndarray, empty: float) -> np.ndarray:
    """Reduce `values` [M] per CSR row with `ufunc` (add or multiply); rows without matches get `empty`."""
    lengths = np.diff(offsets)  # [n]
    out = np.full(lengths.size, empty, dtype=np.float64)
    nonempty = lengths > 0
    if values.size:  # reduceat on the starts of non-empty rows only: empty rows would break its semantics
        out[nonempty] = ufunc.reduceat(values, offsets[:-1][nonempty] - offsets[0])
    return out


# ---------------------------------------------------------------- counts and MetaCLIP probabilities


def concept_counts(concept_ids: np.ndarray, n_concepts: int) -> np.ndarray:
    """Number of images matching each entry, int64 [n_concepts]; ids must be deduplicated per image."""
    return np.bincount(np.asarray(concept_ids), minlength=n_concepts).astype(np.int64, copy=False)


def entry_probs(counts: np.ndarray, t: float) -> np.ndarray:
    """MetaCLIP per-entry probability p_e = min(1, t / count_e), float64 [n_concepts]; unseen entries get 1."""
    counts = np.asarray(counts, dtype=np.float64)
    p = np.ones(counts.size, dtype=np.float64)
    np.divide(float(t), counts, out=p, where=counts > float(t))
    return p


def metaclip_probs(offsets: np.ndarray, concept_ids: np.ndarray, counts: np.ndarray, t: float) -> np.ndarray:
    """Keep probability per image, float64 [N]: 1 - prod(1 - p_e) over its entries, 0 without a match."""
    q_entry = 1.0 - entry_probs(counts, t)  # [C] drop probability per entry; exactly 0 where p_e == 1
    out = np.empty(offsets.size - 1, dtype=np.float64)
    for a, b, lo, hi in _row_chunks(offsets):
        q = q_entry[concept_ids[lo:hi]]  # [m] per-match drop probability
        out[a:b] = 1.0 - _segment_reduce(np.multiply, q, offsets[a : b + 1], empty=1.0)
    return out


def tail_mass(counts: np.ndarray, t: float) -> float:
    """MetaCLIP 2 `t_to_p`: fraction of all matches that fall in entries with count < t (entries fully kept)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def t_for_tail_mass(counts: np.ndarray, mass: float) -> float:
    """MetaCLIP 2 `p_to_t`: smallest integer t whose `tail_mass(counts, t)` is at least `mass` (0 < mass <= 1).

    tail_mass is a non-decreasing step function of t that only moves just above an observed count, so the
    answer is 1 + (some observed count), found by a search over the cumulative sums of the sorted counts.
    """
    c = np.sort(np.asarray(counts, dtype=np.int64)[np.asarray(counts) > 0])  # [E] ascending
    if c.size == 0:
        return 1.0
    below = np.concatenate(([0], np.cumsum(c)))  # [E+1] below[j] = matches in the j smallest entries
    last_of_value = np.flatnonzero(np.append(c[1:] != c[:-1], True))  # [U] last index of each distinct count
    reachable = below[last_of_value + 1]  # [U] tail mass (in matches) once t passes that count
    j = int(np.searchsorted(reachable, mass * below[-1] * (1 - 1e-12), side="left"))
    return float(c[last_of_value[min(j, reachable.size - 1)]] + 1)


def expected_size(offsets: np.ndarray, concept_ids: np.ndarray, counts: np.ndarray, t: float) -> float:
    """Expected number of kept images under the MetaCLIP rule with threshold t."""
    return float(metaclip_probs(offsets, concept_ids, counts, t).sum())


def t_for_target_size(
    offsets: np.ndarray, concept_ids: np.ndarray, counts: np.ndarray, target: float, rtol: float = 1e-3
) -> float:
    """Threshold t whose expected kept size is within rtol of `target`, by bisection on log t.

    The expected size is non-decreasing in t (every p_e is), from ~0 as t -> 0 to the number of matched
    images at t = max count, so bisection converges; raises ValueError when the target is unreachable.
    """
    lo, hi = 1e-9, float(max(np.max(counts), 1))
    reachable = expected_size(offsets, concept_ids, counts, hi)
    if target > reachable * (1 + rtol):
        raise ValueError(f"target {target} exceeds the {reachable:.0f} images that match any entry")
    for _ in range(100):
        mid = float(np.sqrt(lo * hi))
        size = expected_size(offsets, concept_ids, counts, mid)
        if abs(size - target) <= rtol * target:
            return mid
        lo, hi = (mid, hi) if size < target else (lo, mid)
    return float(np.sqrt(lo * hi))


# ---------------------------------------------------------------- reproducible uniforms


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise to a uint64 array (a bijection with good avalanche)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN  # wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uid_hash(uids) -> np.ndarray:
    """Stable 64-bit hash per uid, uint64 [N]: integers are taken as-is, strings hashed with XXH3-64 of UTF-8."""
    arr = np.asarray(uids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.uint64)  # negative ints wrap, still a stable one-to-one map
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(str(u).encode("utf-8")) for u in arr.tolist()), dtype=np.uint64, count=arr.size
    )


def uniforms(uids, seed: int) -> np.ndarray:
    """Deterministic uniform draw per uid in the open interval (0, 1), float64 [N], a function of (uid, seed)."""
    salt = splitmix64(np.array([seed], dtype=np.uint64))[0]
    h = splitmix64(uid_hash(uids) ^ salt)  # [N] uint64
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # 53 random bits, never 0 or 1


def keep_mask(uids, probs: np.ndarray, seed: int) -> np.ndarray:
    """Bernoulli selection bool [N]: image i kept iff u(uid_i, seed) < probs_i; partition independent."""
    return uniforms(uids, seed) < np.asarray(probs, dtype=np.float64)


# ---------------------------------------------------------------- inverse-frequency weighted sampling


def inverse_frequency_weights(
    offsets: np.ndarray, concept_ids: np.ndarray, counts: np.ndarray, reduce: str = "sum", power: float = 1.0
) -> np.ndarray:
    """Image weight float64 [N]: sum (or mean) of 1/count_e^power over its entries; 0 for images without entries.
    power 1 is LLaVA-OneVision-1.5's weight; a larger power thins the head harder."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    counts = np.asarray(counts, dtype=np.float64)
    inv = np.zeros(counts.size, dtype=np.float64)
    np.divide(1.0, counts**power, out=inv, where=counts > 0)  # [C]
    out = np.empty(offsets.size - 1, dtype=np.float64)
    for a, b, lo, hi in _row_chunks(offsets):
        out[a:b] = _segment_reduce(np.add, inv[concept_ids[lo:hi]], offsets[a : b + 1], empty=0.0)
    if reduce == "mean":
        lengths = np.diff(offsets)
        np.divide(out, lengths, out=out, where=lengths > 0)
    return out


def es_keys(uids, weights: np.ndarray, seed: int, min_weight: float = 0.0) -> np.ndarray:
    """Efraimidis-Spirakis key log(u_i) / w_i, float64 [N]; weight <= 0 gives -inf (never drawn).

    Weights are first floored at `min_weight`, so a positive floor lets images without entries be drawn.
    """
    w = np.maximum(np.asarray(weights, dtype=np.float64), min_weight)  # [N]
    keys = np.full(w.size, -np.inf, dtype=np.float64)
    np.divide(np.log(uniforms(uids, seed)), w, out=keys, where=w > 0)  # log(u) < 0, larger key = drawn earlier
    return keys


def top_k_mask(keys: np.ndarray, k: int) -> np.ndarray:
    """Bool [N] marking the k largest finite keys; ValueError when fewer than k are finite."""
    keys = np.asarray(keys, dtype=np.float64)
    finite = int(np.isfinite(keys).sum())
    if k > finite:
        raise ValueError(
            f"asked for {k} images but only {finite} have a positive weight; lower the target or set min_weight"
        )
    mask = np.zeros(keys.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(keys, keys.size - k)[keys.size - k :]] = True
    return mask


def weighted_sample(uids, weights: np.ndarray, target: int, seed: int, min_weight: float = 0.0) -> np.ndarray:
    """Exactly `target` images without replacement, bool [N], with probability proportional to weight."""
    return top_k_mask(es_keys(uids, weights, seed, min_weight), target)


def select(
    uids,
    offsets: np.ndarray,
    concept_ids: np.ndarray,
    counts: np.ndarray,
    method: str,
    target: int | None = None,
    *,
    t: float | None = None,
    tail_mass: float | None = None,
    seed: int = 0,
    reduce: str = "sum",
    power: float = 1.0,
    min_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The balance decision for every image: (keep bool [N], weight float64 [N], t). metaclip: keep probability
    with t given, else set by `tail_mass`, else by the target size (1.0 without one); inverse_frequency: exactly
    `target` images drawn by weight (t None)."""
    if method == "metaclip":
        if t is None:
            t = (
                t_for_tail_mass(counts, tail_mass)
                if tail_mass
                else t_for_target_size(offsets, concept_ids, counts, target)
                if target
                else 1.0
            )
        weight = metaclip_probs(offsets, concept_ids, counts, t)
        return keep_mask(uids, weight, seed), weight, t
    weight = inverse_frequency_weights(offsets, concept_ids, counts, reduce, power)
    return weighted_sample(uids, weight, target, seed, min_weight), weight, None


# ---------------------------------------------------------------- coverage


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = all equal, -> 1 = all mass on one); 0 for an empty/zero array."""
    x = np.sort(np.asarray(values, dtype=np.float64))  # [E] ascending
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.dot(ranks, x) / (n * total) - (n + 1.0) / n)


def coverage(
    offsets: np.ndarray,
    concept_ids: np.ndarray,
    n_concepts: int,
    keep: np.ndarray | None = None,
    t: float | None = None,
) -> dict:
    """Coverage of the entries by the kept images (all images when keep is None).

    Head and tail are fixed by the counts of the whole pool, so before/after numbers compare the same
    entries: head = the top 1% of the entries present in the pool, by pool count; tail = entries with pool count < t
    (needs t).
    Shares are fractions of the kept matches. Gini is over kept per-entry counts, both over the entries
    present in the pool (`gini_present`) and over all n_concepts entries (`gini_all`, unseen ones count 0).
    """
    pool = concept_counts(concept_ids, n_concepts)  # [C]
    if keep is None:
        kept, n_images = pool, offsets.size - 1
    else:
        keep = np.asarray(keep, dtype=bool)
        per_match = np.repeat(keep, np.diff(offsets))  # [M] keep flag of each match's image
        kept = concept_counts(concept_ids[per_match], n_concepts)
        n_images = int(keep.sum())
    total = max(int(kept.sum()), 1)
    n_head = max(1, int(np.ceil(0.01 * (pool > 0).sum())))
    head = np.argpartition(pool, n_concepts - n_head)[n_concepts - n_head :]  # [n_head] entry ids
    out = {
        "n_images": int(n_images),
        "n_matches": int(kept.sum()),
        "entries_covered": int((kept > 0).sum()),
        "entries_in_pool": int((pool > 0).sum()),
        "head_share_top1pct": float(kept[head].sum() / total),
        "gini_present": gini(kept[pool > 0]),
        "gini_all": gini(kept),
    }
    if t is not None:
        tail = (pool > 0) & (pool < t)
        out["tail_entries"] = int(tail.sum())
        out["tail_share"] = float(kept[tail].sum() / total)
        out["head_share_t"] = float(kept[pool >= t].sum() / total)
        out["tail_retention"] = float(kept[tail].sum() / max(int(pool[tail].sum()), 1))
    return out
