"""Greedy leader clustering of 64-bit perceptual hashes: groups in which every member is near its leader.

Connected components (neardup.near_duplicate_groups) chain A~B~C into one group however far A is from C; here the
best item not yet grouped leads and takes the free items near it, optionally checked by a second signal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from curation.dedup.neardup import Plan, _as_hashes, _mih_link, _pairwise_edges, distinct_hashes, popcount64


class EdgeList:
    """Collects the verified pairs the searches find (UnionFind's `add`, without merging: `merges` stays 0, so the
    searches skip no pair as already joined)."""

    merges = 0

    def __init__(self) -> None:
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            self._a.append(np.asarray(a, np.int64))
            self._b.append(np.asarray(b, np.int64))

    def pairs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each unordered pair once, as (smaller, larger) index arrays."""
        if not self._a:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        a, b = np.concatenate(self._a), np.concatenate(self._b)
        key = np.unique(np.minimum(a, b) * n + np.maximum(a, b))  # a pair found through several blocks, once
        return key // n, key % n


def _hash_graph(u: np.ndarray, max_distance: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The distinct hashes `u` within max_distance of each other, as CSR: k's are dst[starts[k] : starts[k + 1]]."""
    edges = EdgeList()
    if plan.method == "pairwise":
        for a, b in _pairwise_edges(u, max_distance):
            edges.add(a, b)
    elif plan.method == "mih":
        _mih_link(u, max_distance, plan.blocks, edges)
    a, b = edges.pairs(u.size)
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])  # both directions
    by = np.argsort(src, kind="stable")
    return np.searchsorted(src[by], np.arange(u.size + 1)), dst[by]


Verify = Callable[[int, np.ndarray], np.ndarray]  # (leader, candidates) input indices -> which to take


def leader_groups(
    hashes: np.ndarray,
    max_distance: int,
    *,
    verify: Verify | None = None,
    method: str = "auto",
    n_blocks: int | None = None,
) -> np.ndarray:
    """Group N 64-bit hashes by greedy leader clustering in input order (put the best image first).

    Each item not yet in a group leads a new one, and takes every item not yet in a group within max_distance of
    it (that `verify(leader, candidates)` also accepts, when given: a second signal, so that equal or close hashes
    of different images are not merged). So every member is within max_distance of its leader (no chaining A~B~C
    of images far apart); without `verify`, no two leaders are within max_distance of each other either. Returns
    int64 labels [N]: the index of each item's leader, the smallest index of its group. The pair search is
    near_duplicate_groups' (method, n_blocks).
    """
    h, u, first, inverse, plan = distinct_hashes(hashes, max_distance, method, n_blocks)
    if h.size == 0:
        return np.empty(0, dtype=np.int64)
    max_distance = int(max_distance)
    starts, dst = _hash_graph(u, max_distance, plan)
    if verify is None:  # equal hashes are one item: group the distinct hashes, in order of first occurrence
        leader = np.arange(u.size, dtype=np.int64)  # [U] distinct hashes without neighbours lead themselves
        linked = np.flatnonzero(np.diff(starts))
        taken = np.zeros(u.size, dtype=bool)
        for k in linked[np.argsort(first[linked], kind="stable")]:
            if taken[k]:
                continue
            near = dst[starts[k] : starts[k + 1]]
            near = near[~taken[near]]
            leader[near], taken[near], taken[k] = k, True, True
        return first[leader][inverse].astype(np.int64)
    members = np.argsort(inverse, kind="stable")  # [N] items by distinct hash, each hash's in input order
    m_starts = np.searchsorted(inverse[members], np.arange(u.size + 1))  # [U + 1]
    label = np.arange(h.size, dtype=np.int64)
    taken = np.zeros(h.size, dtype=bool)
    shared = np.diff(m_starts) > 1  # [U] hashes held by several items
    busy = np.flatnonzero((np.diff(starts) > 0) | shared)  # distinct hashes with a candidate for someone
    for i in np.sort(members[np.isin(inverse[members], busy)]):  # items in input order (= priority)
        if taken[i]:
            continue
        k = inverse[i]
        near = [k, *dst[starts[k] : starts[k + 1]].tolist()]
        cand = np.concatenate([members[m_starts[x] : m_starts[x + 1]] for x in near])
        cand = cand[(cand > i) & ~taken[cand]]
        if cand.size:
            cand = cand[np.asarray(verify(int(i), cand), dtype=bool)]
            label[cand], taken[cand] = i, True
        taken[i] = True
    return label


def brute_force_leaders(hashes: np.ndarray, max_distance: int, verify: Verify | None = None) -> np.ndarray:
    """Reference O(N^2) leader clustering (leader_groups' definition, one item at a time)."""
    h = _as_hashes(hashes, max_distance)
    label = np.full(h.size, -1, dtype=np.int64)
    for i in range(h.size):
        if label[i] < 0:
            label[i] = i
            cand = np.flatnonzero((label < 0) & (popcount64(h ^ h[i]) <= max_distance))
            if verify is not None and cand.size:
                cand = cand[np.asarray(verify(i, cand), dtype=bool)]
            label[cand] = i
    return label
