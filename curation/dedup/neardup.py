"""Near-duplicate grouping of 64-bit perceptual hashes by Hamming distance."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

HASH_BITS = 64
MAX_DENSE_KEY_BITS = 24  # a block key this wide or narrower gets a dense lookup table (<= 64 MiB)
PAIR_CHUNK = 1 << 22  # candidate pairs materialised at once (~100 MiB of temporaries)
LINK_BATCH = 1 << 20  # verified edges queued before the union-find merges them

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


class UnionFind:
    """Union-find over n nodes, fed edge batches; every root is the smallest node of its component."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)  # [n] parent[x] <= x; fully compressed after each merge
        self.merges = 0  # how many batches were merged so far
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._held = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Queue edges (a[k], b[k]); they are merged once LINK_BATCH edges are waiting."""
        if a.size:
            self._pending.append((a, b))
            self._held += a.size
        if self._held >= LINK_BATCH:
            self.merge()

    def merge(self) -> None:
        """Merge the queued edges: hook each larger root under the smaller, then compress all paths."""
        if not self._pending:
            return
        a = np.concatenate([e[0] for e in self._pending]).astype(np.int64)  # [E]
        b = np.concatenate([e[1] for e in self._pending]).astype(np.int64)  # [E]
        self._pending, self._held = [], 0
        parent = self.parent
        while True:
            ra, rb = parent[a], parent[b]  # roots, as parent is compressed here
            differ = ra != rb
            if not differ.any():
                break
            a, b = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
            np.minimum.at(parent, b, a)  # each larger root moves under the smallest root it touches
            while not np.array_equal(grand := parent[parent], parent):  # pointer jumping to the roots
                parent = grand
        self.parent = parent
        self.merges += 1

    def roots(self) -> np.ndarray:
        """Merge what is queued and return the root (component minimum) of every node, int64 [n]."""
        self.merge()
        return self.parent


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
    union = UnionFind(h.size)
    for a, b in _pairwise_edges(h, int(max_distance)):
        union.add(a, b)
    return union.roots()


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


def choose_plan(n_unique: int, max_distance: int, n_blocks: int | None = None, method: str = "auto") -> Plan:
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
        sum(1 << i for i in combo) for k in range(1, radius + 1) for combo in itertools.combinations(range(width), k)
    ]
    return np.array(masks, dtype=np.uint64)


def _expand(a: np.ndarray, b_start: np.ndarray, b_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a[k], b_start[k] + r) for r < b_size[k], where every b_size >= 1."""
    total = int(b_size.sum())
    if total == b_size.size:  # the common case: every run has length 1, nothing to expand
        return a, b_start
    first = np.cumsum(b_size) - b_size  # [K] flat offset of each run
    return np.repeat(a, b_size), np.repeat(b_start - first, b_size) + np.arange(total)


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


class _BlockIndex:
    """The distinct hashes sorted by one block's key, grouped into buckets (runs of equal keys)."""

    def __init__(self, u: np.ndarray, blk: Block) -> None:
        keys = (u >> np.uint64(blk.shift)) & np.uint64((1 << blk.width) - 1)  # [U] uint64
        self.order = np.argsort(keys, kind="stable")  # [U] int64, sorted position -> distinct-hash index
        self.keys, self.hashes = keys[self.order], u[self.order]  # [U], [U] in sorted order
        self.starts = np.flatnonzero(np.r_[True, self.keys[1:] != self.keys[:-1]])  # [K] bucket starts
        self.sizes = np.diff(np.r_[self.starts, u.size])  # [K]
        self.bucket_of = np.repeat(np.arange(self.starts.size), self.sizes)  # [U] bucket of each position
        self._seen_merges = -1
        self._comp = self._bucket_comp = np.empty(0, dtype=np.int64)

    def _components(self, union: UnionFind) -> tuple[np.ndarray, np.ndarray]:
        """Component of each sorted position [U] and of each bucket [K] (-1 where its members differ)."""
        if self._seen_merges != union.merges:
            self._comp = union.parent[self.order]
            low = np.minimum.reduceat(self._comp, self.starts)
            high = np.maximum.reduceat(self._comp, self.starts)
            self._bucket_comp = np.where(low == high, low, -1)
            self._seen_merges = union.merges
        return self._comp, self._bucket_comp

    def link(
        self,
        items: np.ndarray,
        buckets: np.ndarray,
        b_start: np.ndarray,
        b_size: np.ndarray,
        max_distance: int,
        union: UnionFind,
    ) -> None:
        """Verify the pairs (items[k], positions b_start[k] + r < b_start[k] + b_size[k] of buckets[k])."""
        ends = np.cumsum(b_size)  # [R]
        cuts = np.searchsorted(ends, np.arange(PAIR_CHUNK, int(ends[-1]) if ends.size else 0, PAIR_CHUNK))
        for lo, hi in itertools.pairwise([0, *np.unique(cuts).tolist(), items.size]):  # ~PAIR_CHUNK pairs
            p, start, size = items[lo:hi], b_start[lo:hi], b_size[lo:hi]
            n_pairs = (ends[hi - 1] if hi else 0) - (ends[lo - 1] if lo else 0)
            if union.merges and n_pairs > 2 * p.size:  # big buckets: skip those already in p's component
                comp, bucket_comp = self._components(union)
                keep = comp[p] != bucket_comp[buckets[lo:hi]]
                p, start, size = p[keep], start[keep], size[keep]
            ia, ib = _expand(p, start, size)  # [T], [T] sorted positions
            close = popcount64(self.hashes[ia] ^ self.hashes[ib]) <= max_distance
            union.add(self.order[ia[close]], self.order[ib[close]])


def _mih_link(u: np.ndarray, max_distance: int, blocks: tuple[Block, ...], union: UnionFind) -> None:
    """Feed `union` every pair of the distinct hashes `u` within max_distance, block by block."""
    for blk in blocks:
        index = _BlockIndex(u, blk)
        bucket_end = (index.starts + index.sizes)[index.bucket_of]  # [U]
        later = bucket_end - np.arange(u.size) - 1  # [U] positions after each one in its bucket
        shared = np.flatnonzero(later > 0)  # same key on this block: pair each item with the later ones
        index.link(shared, index.bucket_of[shared], shared + 1, later[shared], max_distance, union)
        if blk.radius == 0:
            continue
        for items, buckets in _neighbour_probes(index.keys, index.keys[index.starts], blk.width, blk.radius):
            index.link(items, buckets, index.starts[buckets], index.sizes[buckets], max_distance, union)


def distinct_hashes(
    hashes: np.ndarray, max_distance: int, method: str = "auto", n_blocks: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Plan]:
    """Checked hashes h [N], their distinct values u [U] (first index of each [U], index into u of each [N]) and the
    plan to search u (None for no hashes)."""
    h = _as_hashes(hashes, max_distance)  # [N] uint64
    u, first, inverse = np.unique(h, return_index=True, return_inverse=True)  # [U], [U], [N]
    plan = choose_plan(u.size, int(max_distance), n_blocks=n_blocks, method=method) if h.size else None
    return h, u, first, inverse, plan


def near_duplicate_groups(
    hashes: np.ndarray, max_distance: int, *, method: str = "auto", n_blocks: int | None = None
) -> np.ndarray:
    """Label N 64-bit hashes by connected component of 'Hamming distance <= max_distance'.

    Returns int64 labels [N]; each label is the smallest index in its component. Exact hashes are merged
    first, then the distinct hashes are searched with multi-index hashing (or all pairs when that is cheaper).
    `method` ('auto', 'mih', 'pairwise') and `n_blocks` force a search plan, for tests and benchmarks.
    """
    h, u, first, inverse, plan = distinct_hashes(hashes, max_distance, method, n_blocks)
    if h.size == 0:
        return np.empty(0, dtype=np.int64)
    max_distance = int(max_distance)
    if plan.method == "exact":
        return first[inverse].astype(np.int64)
    union = UnionFind(u.size)
    if plan.method == "pairwise":
        for a, b in _pairwise_edges(u, max_distance):
            union.add(a, b)
    else:
        _mih_link(u, max_distance, plan.blocks, union)
    root = union.roots()  # [U] smallest distinct-hash index of each component
    smallest = np.full(u.size, h.size, dtype=np.int64)  # [U] smallest input index per root
    np.minimum.at(smallest, root, first)
    return smallest[root][inverse]
