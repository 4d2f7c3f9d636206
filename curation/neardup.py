"""Near-duplicate grouping of 64-bit perceptual hashes by Hamming distance."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
MAX_DENSE_KEY_BITS = 24  # a block key this wide or narrower gets a dense lookup table (<= 64 MiB)
PAIR_CHUNK = 1 << 22  # candidate pairs materialised at once (~100 MiB of temporaries)
EDGE_BUFFER = 1 << 24  # verified edges held before they are folded into a star forest

# Rough costs on 2 cores for the planner, fitted to timings of this module at 5K to 1M hashes.
_NS_PER_ITEM_BLOCK = 150.0  # sort one hash by one block key and build its buckets
_NS_PER_PROBE_DENSE = 10.0  # probe one flipped key through a dense table
_NS_PER_PROBE_SORTED = 40.0  # probe one flipped key through np.searchsorted
_NS_PER_CANDIDATE = 10.0  # expand, gather, popcount and compare one candidate pair
_NS_PER_PASS = 50_000.0  # fixed numpy overhead of one flip mask
_NS_PER_PAIRWISE = 3.0  # one pair in the chunked all-pairs scan

Pairs = Iterator[tuple[np.ndarray, np.ndarray]]  # stream of (index array, index array) chunks


def phash_u64(img: Image.Image) -> int:
    """Return the 8x8 DCT pHash of `img` as an unsigned 64-bit int.

    Bit order: the 64 bits of imagehash's 8x8 boolean array in row-major order, first bit = most
    significant bit, so `phash_u64(img) == int(str(imagehash.phash(img)), 16)`.
    """
    bits = imagehash.phash(img, hash_size=8).hash.reshape(-1)  # [64] bool
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of a uint64 array, as uint8."""
    return np.bitwise_count(np.asarray(x, dtype=np.uint64))


def _as_hashes(hashes: np.ndarray | list[int], max_distance: int) -> np.ndarray:
    """Validate the inputs and return the hashes as a 1-D uint64 array (int64 input is reinterpreted)."""
    if not 0 <= int(max_distance) <= HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS}, got {max_distance}")
    if isinstance(hashes, np.ndarray):
        arr = hashes
    else:
        try:
            arr = np.array(hashes, dtype=np.uint64)  # Python ints such as phash_u64 results
        except OverflowError:
            arr = np.array(hashes, dtype=np.int64)  # signed ints, e.g. an Arrow int64 column's to_pylist()
    if arr.ndim != 1:
        raise ValueError(f"hashes must be a 1-D array of 64-bit ints, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"hashes must be integers (uint64 or int64 bit patterns), got dtype {arr.dtype}")
    if arr.dtype.itemsize == 8:
        return arr.view(np.uint64)  # same bits; int64 comes from Arrow/Parquet columns
    return arr.astype(np.uint64)


def _union_find_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Components of edges (a[k], b[k]) over n nodes; each label is its component's smallest node."""
    parent = np.arange(n, dtype=np.int64)  # [n] parent[x] <= x always, so roots are component minima
    a, b = a.astype(np.int64), b.astype(np.int64)
    while True:
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)  # hook each larger root under the smallest root it touches
        a, b = lo, hi


def _pairwise_edges(h: np.ndarray, max_distance: int) -> Pairs:
    """Yield index pairs (i < j) of `h` within `max_distance`, scanning all pairs a row chunk at a time."""
    n = h.size
    chunk = max(1, PAIR_CHUNK // max(n, 1))  # rows per step, so each step holds about PAIR_CHUNK pairs
    for start in range(0, n, chunk):
        rows = h[start : start + chunk]  # [c]
        dist = popcount64(rows[:, None] ^ h[None, start:])  # [c, n - start]
        i, j = np.nonzero(dist <= max_distance)
        i, j = i + start, j + start
        keep = i < j
        yield i[keep], j[keep]


def brute_force_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Reference O(N^2) grouping: int64 labels, the smallest index of each Hamming-distance component."""
    h = _as_hashes(hashes, max_distance)  # [N] uint64
    pairs = list(_pairwise_edges(h, int(max_distance)))
    a = np.concatenate([p[0] for p in pairs]) if pairs else np.empty(0, np.int64)
    b = np.concatenate([p[1] for p in pairs]) if pairs else np.empty(0, np.int64)
    return _union_find_labels(h.size, a, b)


@dataclass(frozen=True)
class Block:
    """One slice of the 64 bits: candidates agree on it up to `radius` flipped bits."""

    shift: int
    width: int
    radius: int


@dataclass(frozen=True)
class Plan:
    """How near_duplicate_groups will search: 'exact', 'pairwise' or 'mih' (multi-index hashing)."""

    method: str
    blocks: tuple[Block, ...] = ()
    est_seconds: float = 0.0

    def describe(self) -> str:
        """Short human-readable form, e.g. 'mih 22/21/21 bits, radii 2/1/1'."""
        if self.method != "mih":
            return self.method
        widths = "/".join(str(b.width) for b in self.blocks)
        radii = "/".join(str(b.radius) for b in self.blocks)
        return f"mih {widths} bits, radii {radii}"


def _ball(width: int, radius: int) -> int:
    """Number of keys within `radius` flipped bits of a `width`-bit key (itself included)."""
    return sum(math.comb(width, k) for k in range(radius + 1))


def _blocks(n_blocks: int, max_distance: int) -> tuple[Block, ...]:
    """Split 64 bits into n_blocks near-equal blocks with radii summing to max_distance - n_blocks + 1.

    Pigeonhole: if every block differed in more than its radius, the total distance would be at least
    sum(radius + 1) = max_distance + 1, so any pair within max_distance matches some block within its radius.
    """
    base, extra = divmod(HASH_BITS, n_blocks)
    widths = [base + 1] * extra + [base] * (n_blocks - extra)  # widest first
    spare, more = divmod(max_distance - n_blocks + 1, n_blocks)
    radii = [spare + 1] * more + [spare] * (n_blocks - more)  # larger radius on the wider blocks
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return tuple(Block(s, w, r) for s, w, r in zip(shifts, widths, radii))


def _mih_seconds(n_unique: int, blocks: tuple[Block, ...]) -> float:
    """Estimated run time of multi-index hashing over n_unique uniformly spread hashes."""
    total_ns = 0.0
    for blk in blocks:
        passes = _ball(blk.width, blk.radius) - 1  # one per non-zero flip mask
        per_probe = _NS_PER_PROBE_DENSE if blk.width <= MAX_DENSE_KEY_BITS else _NS_PER_PROBE_SORTED
        candidates = _ball(blk.width, blk.radius) * n_unique**2 / 2 ** (blk.width + 1)  # unordered pairs
        total_ns += n_unique * _NS_PER_ITEM_BLOCK + passes * (_NS_PER_PASS + n_unique / 2 * per_probe)
        total_ns += candidates * _NS_PER_CANDIDATE
    return total_ns * 1e-9


def choose_plan(
    n_unique: int, max_distance: int, n_blocks: int | None = None, method: str = "auto"
) -> Plan:
    """Pick the cheapest exact search for n_unique distinct hashes (or the forced method / block count)."""
    if max_distance == 0 or n_unique < 2:
        return Plan("exact")
    pairwise = Plan("pairwise", est_seconds=n_unique**2 / 2 * _NS_PER_PAIRWISE * 1e-9)
    if method == "pairwise":
        return pairwise
    counts = [n_blocks] if n_blocks else range(1, min(max_distance + 1, HASH_BITS) + 1)
    options = []
    for m in counts:
        if not 1 <= m <= max_distance + 1:
            raise ValueError(f"n_blocks must be in 1..{max_distance + 1} for this max_distance, got {m}")
        blocks = _blocks(m, max_distance)
        if sum(_ball(b.width, b.radius) for b in blocks) > 5_000_000:
            continue  # flip-mask enumeration alone would be prohibitive
        options.append(Plan("mih", blocks, _mih_seconds(n_unique, blocks)))
    if method == "mih":
        if not options:
            raise ValueError(f"no practical multi-index plan for max_distance {max_distance}; use 'pairwise'")
        return min(options, key=lambda p: p.est_seconds)
    if method != "auto":
        raise ValueError(f"method must be 'auto', 'mih' or 'pairwise', got {method!r}")
    return min([*options, pairwise], key=lambda p: p.est_seconds)


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """All non-zero width-bit masks with at most `radius` set bits, as uint64."""
    masks = [
        sum(1 << i for i in combo)
        for k in range(1, radius + 1)
        for combo in itertools.combinations(range(width), k)
    ]
    return np.array(masks, dtype=np.uint64)


def _expand(a: np.ndarray, b_start: np.ndarray, b_size: np.ndarray) -> Pairs:
    """Yield pairs (a[k], b_start[k] + r) for r < b_size[k] (every b_size >= 1), PAIR_CHUNK-ish at a time."""
    total = int(b_size.sum())
    if total == b_size.size:  # the common case: every run has length 1, nothing to expand
        yield a, b_start
        return
    ends = np.cumsum(b_size)  # [K]
    cuts = np.searchsorted(ends, np.arange(PAIR_CHUNK, total, PAIR_CHUNK))
    for lo, hi in itertools.pairwise([0, *np.unique(cuts).tolist(), b_size.size]):
        counts = b_size[lo:hi]
        n = int(counts.sum())
        if n:
            first = ends[lo:hi] - counts - (ends[lo - 1] if lo else 0)  # [k] flat offset of each run
            yield np.repeat(a[lo:hi], counts), np.repeat(b_start[lo:hi] - first, counts) + np.arange(n)


def _neighbour_probes(sorted_keys: np.ndarray, bucket_keys: np.ndarray, width: int, radius: int) -> Pairs:
    """Yield (item positions, bucket ids) whose keys differ in 1..radius bits, each unordered pair once."""
    n_buckets = bucket_keys.size
    if width <= MAX_DENSE_KEY_BITS:
        sorted_keys, bucket_keys = sorted_keys.astype(np.uint32), bucket_keys.astype(np.uint32)
        table = np.full(1 << width, -1, dtype=np.int32)  # [2^width] key -> bucket id, -1 for empty
        table[bucket_keys] = np.arange(n_buckets, dtype=np.int32)

        def lookup(target: np.ndarray) -> np.ndarray:
            return table[target]

    else:

        def lookup(target: np.ndarray) -> np.ndarray:
            pos = np.searchsorted(bucket_keys, target)
            pos[pos == n_buckets] = 0
            return np.where(bucket_keys[pos] == target, pos, -1)

    one = sorted_keys.dtype.type(1)
    clear: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # bit -> (items with that bit 0, their keys)
    for mask in _flip_masks(width, radius).astype(sorted_keys.dtype):
        top = int(mask).bit_length() - 1
        if top not in clear:  # key < key ^ mask iff the mask's top bit is 0 in key: one side of each pair
            bit = (sorted_keys >> sorted_keys.dtype.type(top)) & one  # [U]
            items = np.flatnonzero(bit == 0).astype(np.int32)
            clear[top] = items, sorted_keys[items]
        items, keys = clear[top]
        buckets = lookup(keys ^ mask)  # [U/2] bucket id or -1
        hit = np.flatnonzero(buckets >= 0)
        yield items[hit], buckets[hit]


def _mih_edges(u: np.ndarray, max_distance: int, blocks: tuple[Block, ...]) -> Pairs:
    """Yield index pairs of the distinct hashes `u` within max_distance (repeats possible), block by block."""
    positions = np.arange(u.size)  # [U]
    for blk in blocks:
        keys = (u >> np.uint64(blk.shift)) & np.uint64((1 << blk.width) - 1)  # [U] uint64
        order = np.argsort(keys, kind="stable")  # [U] int64
        sorted_keys, sorted_hashes = keys[order], u[order]  # [U], [U]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])  # [K] bucket starts
        sizes = np.diff(np.r_[starts, u.size])  # [K]

        def verified(ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            close = popcount64(sorted_hashes[ia] ^ sorted_hashes[ib]) <= max_distance
            return order[ia[close]], order[ib[close]]

        later = np.repeat(starts + sizes, sizes) - positions - 1  # [U] items after each one in its bucket
        shared = np.flatnonzero(later > 0)  # same key on this block: pair each item with the later ones
        for ia, ib in _expand(shared, shared + 1, later[shared]):
            yield verified(ia, ib)
        if blk.radius == 0:
            continue
        probes = _neighbour_probes(sorted_keys, sorted_keys[starts], blk.width, blk.radius)
        for items, buckets in probes:
            for ia, ib in _expand(items, starts[buckets], sizes[buckets]):
                yield verified(ia, ib)


def _components(n: int, edges: Pairs) -> np.ndarray:
    """Component id per node for a stream of edges, folding the buffer into a star forest when it grows."""
    buf_a: list[np.ndarray] = []
    buf_b: list[np.ndarray] = []
    held = 0

    def fold() -> np.ndarray:
        a, b = np.concatenate(buf_a), np.concatenate(buf_b)
        graph = coo_matrix((np.ones(a.size, dtype=np.float32), (a, b)), shape=(n, n)).tocsr()
        return connected_components(graph, directed=False)[1].astype(np.int64)  # [n]

    for a, b in edges:
        buf_a.append(a)
        buf_b.append(b)
        held += a.size
        if held > EDGE_BUFFER:
            comp = fold()
            first = np.full(comp.max() + 1, n, dtype=np.int64)
            np.minimum.at(first, comp, np.arange(n))
            rep = first[comp]  # [n] smallest node of each node's component
            linked = np.flatnonzero(rep != np.arange(n))
            buf_a, buf_b, held = [linked], [rep[linked]], linked.size  # star forest, at most n edges
    if not buf_a:
        return np.arange(n, dtype=np.int64)
    return fold()


def near_duplicate_groups(
    hashes: np.ndarray, max_distance: int, *, method: str = "auto", n_blocks: int | None = None
) -> np.ndarray:
    """Label N 64-bit hashes by connected component of 'Hamming distance <= max_distance'.

    Returns int64 labels [N]; each label is the smallest index in its component. Exact hashes are merged
    first, then the distinct hashes are searched with multi-index hashing (or all pairs when that is cheaper).
    `method` ('auto', 'mih', 'pairwise') and `n_blocks` force a search plan, for tests and benchmarks.
    """
    h = _as_hashes(hashes, max_distance)  # [N] uint64
    max_distance = int(max_distance)
    if h.size == 0:
        return np.empty(0, dtype=np.int64)
    u, first, inverse = np.unique(h, return_index=True, return_inverse=True)  # [U], [U], [N]
    plan = choose_plan(u.size, max_distance, n_blocks=n_blocks, method=method)
    if plan.method == "exact":
        return first[inverse].astype(np.int64)
    if plan.method == "pairwise":
        comp = _components(u.size, _pairwise_edges(u, max_distance))  # [U]
    else:
        comp = _components(u.size, _mih_edges(u, max_distance, plan.blocks))  # [U]
    smallest = np.full(comp.max() + 1, h.size, dtype=np.int64)  # [C]
    np.minimum.at(smallest, comp, first)
    return smallest[comp][inverse]
