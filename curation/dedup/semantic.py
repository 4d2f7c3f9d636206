"""Semantic dedup (SemDeDup, Abbas et al. 2023, as NeMo Curator ships it) over L2-normalised image embeddings.

k-means (FAISS, spherical, trained on a seeded random sample so its memory is bounded) splits the embeddings into
clusters; within each cluster the pairwise cosines are computed in chunks (a big cluster is bounded in memory too)
and duplicates are marked by greedy leaders in priority order, as curation.dedup.leaders does for pHashes: the
best item not yet taken keeps itself and takes every item not yet taken whose cosine with it is >= 1 - eps. So no
item is dropped against a kept item farther than eps (NeMo's "max similarity to any earlier item" chains A~B~C).
Pairs split across two clusters are not compared: the price of SemDeDup's speed, measured in bench_semdedup."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SemDedupResult:
    """Per input row: `leader` the row index of the item kept for it (itself when kept), `cosine` its cosine with
    that item (1.0 when kept), `cluster` its k-means cluster."""

    leader: np.ndarray  # int64 [N]
    cosine: np.ndarray  # float32 [N]
    cluster: np.ndarray  # int64 [N]

    @property
    def kept(self) -> np.ndarray:
        return self.leader == np.arange(self.leader.size)

    def dup_count(self) -> np.ndarray:
        """Per row: the size of its leader's group (itself included)."""
        return np.bincount(self.leader, minlength=self.leader.size)[self.leader]


def _as_embeddings(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
    return emb


def n_clusters_for(n: int, rows_per_cluster: int, n_clusters: int | None = None) -> int:
    k = n_clusters if n_clusters is not None else -(-n // max(1, rows_per_cluster))
    return int(max(1, min(k, n)))


def kmeans_assign(
    emb: np.ndarray,
    k: int,
    *,
    sample: int = 65536,
    seed: int = 0,
    niter: int = 20,
    batch: int = 65536,
    priority: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster labels [N] (int64): spherical k-means trained on at most `sample` rows (seeded, drawn by position
    in `priority` order, so the same rows in another order train the same centroids), then every row assigned
    to its nearest centroid in batches of `batch` rows."""
    emb = _as_embeddings(emb)
    n = emb.shape[0]
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    idx = sample_rows(n, k, sample, seed)
    if priority is not None:
        idx = np.asarray(priority, dtype=np.int64)[idx]
    return assign(emb, train_centroids(emb[idx], k, seed=seed, niter=niter), batch=batch)


def sample_rows(n: int, k: int, sample: int, seed: int) -> np.ndarray:
    """Positions (in priority order) of the rows the k-means trains on: a seeded sample, ascending."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, max(sample, k)), replace=False))


def train_centroids(train: np.ndarray, k: int, *, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids [k, D] (FAISS) of the training rows."""
    import faiss

    train = _as_embeddings(train)
    d = train.shape[1]  # max_points_per_centroid: train on every sampled row
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False, max_points_per_centroid=1 << 30)
    km.train(train)
    return km.centroids


def assign(emb: np.ndarray, centroids: np.ndarray | None, batch: int = 65536) -> np.ndarray:
    """Each row's nearest centroid by inner product (what spherical k-means assigns by); all 0 without centroids."""
    emb = _as_embeddings(emb)
    if centroids is None or len(centroids) <= 1:
        return np.zeros(emb.shape[0], dtype=np.int64)
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(emb.shape[0], dtype=np.int64)
    for s in range(0, emb.shape[0], batch):
        labels[s : s + batch] = index.search(emb[s : s + batch], 1)[1][:, 0]
    return labels


def _cluster_leaders(
    e: np.ndarray, thr: float, chunk_floats: int, leader: np.ndarray, cosine: np.ndarray, members: np.ndarray
) -> None:
    """Greedy leaders among `members` (global row indices in priority order, ascending); e = emb[members]."""
    s = members.size
    taken = np.zeros(s, dtype=bool)
    rows = max(1, chunk_floats // s)  # a chunk of `rows` x s cosines at most
    pos = np.arange(s)
    for c0 in range(0, s, rows):
        c1 = min(s, c0 + rows)
        sims = e[c0:c1] @ e.T  # [c, s] float32
        hit = (sims >= thr) & (pos[None, :] > pos[c0:c1, None])  # later items only
        r, c = np.nonzero(hit)  # row-major: rows in priority order
        if r.size == 0:
            continue
        starts = np.searchsorted(r, np.arange(c1 - c0 + 1))
        for i in np.unique(r):
            if taken[c0 + i]:
                continue
            cand = c[starts[i] : starts[i + 1]]
            cand = cand[~taken[cand]]
            if cand.size:
                leader[members[cand]] = members[c0 + i]
                cosine[members[cand]] = sims[i, cand]
                taken[cand] = True


def semantic_dedup(
    emb: np.ndarray,
    eps: float,
    *,
    n_clusters: int | None = None,
    rows_per_cluster: int = 1000,
    sample: int = 65536,
    seed: int = 0,
    niter: int = 20,
    chunk_floats: int = 1 << 24,
    labels: np.ndarray | None = None,
    priority: np.ndarray | None = None,
) -> SemDedupResult:
    """Semantic duplicates of N L2-normalised embeddings [N, D]. `priority`: the row indices best first (the one
    to keep first: e.g. by size then uid); default: the rows' order. Deterministic for the same rows in the same
    priority order (given as `priority`, the rows are not copied into that order).

    k = n_clusters, or ceil(N / rows_per_cluster); `labels` skips the k-means (a given clustering, for tests).
    chunk_floats bounds the cosines held at once for one cluster (64 MiB at the default).
    """
    emb = _as_embeddings(emb)
    n = emb.shape[0]
    rank = _rank(priority, n)
    if labels is None:
        k = n_clusters_for(n, rows_per_cluster, n_clusters)
        labels = kmeans_assign(emb, k, sample=sample, seed=seed, niter=niter, priority=priority)
    labels = np.asarray(labels, dtype=np.int64)
    leader = np.arange(n, dtype=np.int64)
    cosine = np.ones(n, dtype=np.float32)
    thr = np.float32(1.0 - eps)
    order = np.lexsort((rank, labels))  # by cluster, each cluster's rows in priority order
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if members.size > 1:
            _cluster_leaders(emb[members], thr, chunk_floats, leader, cosine, members)
    return SemDedupResult(leader, cosine, labels)


def _rank(priority: np.ndarray | None, n: int) -> np.ndarray:
    """Each row's position in priority order."""
    if priority is None:
        return np.arange(n, dtype=np.int64)
    priority = np.asarray(priority, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    rank[priority] = np.arange(priority.size)
    if priority.size != n or (rank < 0).any():
        raise ValueError("priority must be a permutation of the row indices")
    return rank


def brute_force_semantic(emb: np.ndarray, eps: float, priority: np.ndarray | None = None) -> SemDedupResult:
    """Reference: all N^2 cosines at once, one leader at a time in priority order (no clusters)."""
    emb = _as_embeddings(emb)
    n = emb.shape[0]
    sims = emb @ emb.T
    leader = np.full(n, -1, dtype=np.int64)
    cosine = np.ones(n, dtype=np.float32)
    for i in np.argsort(_rank(priority, n)):
        if leader[i] < 0:
            leader[i] = i
            cand = np.flatnonzero((leader < 0) & (sims[i] >= np.float32(1.0 - eps)))
            leader[cand], cosine[cand] = i, sims[i, cand]
    return SemDedupResult(leader, cosine, np.zeros(n, dtype=np.int64))
