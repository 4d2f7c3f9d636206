"""SemDeDup over per-part files, so that no task holds every embedding (NeMo Curator's layout: k-means, then the
rows spilled by cluster, then the pairwise step one cluster group at a time).

1. One task reads every part's uid and pixel count (a few numbers a row) for the priority order (most pixels,
   then smallest uid), and the k-means sample's embeddings (at most `sample` rows) to train the centroids.
2. A task per part assigns its rows to their nearest centroid and spills them into `buckets` files by cluster
   (cluster c goes to bucket c mod buckets; buckets = the embeddings' bytes / bucket_bytes).
3. A task per bucket runs greedy leaders within each of its clusters (curation.dedup.semantic, the same code and
   order as the one-array path, so the same decisions) and writes them under decisions/<part>/.

The tasks run on Ray when it is up (the engine runs the global step in a Ray task), else one after another.
Memory: step 1 holds N uids and the sample; step 2 one part; step 3 one bucket (a cluster bigger than
bucket_bytes is still held whole by its task; its cosines are computed in bounded chunks)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.dedup.semantic import assign, n_clusters_for, sample_rows, semantic_dedup, train_centroids
from curation.engine.store import atomic_write_parquet


def semantic_dedup_parts(
    files: dict[str, Path],
    out: Path,
    eps: float,
    *,
    n_clusters: int | None = None,
    rows_per_cluster: int = 1000,
    sample: int = 65536,
    seed: int = 0,
    niter: int = 20,
    bucket_bytes: int = 1 << 30,
    chunk_floats: int = 1 << 24,
) -> dict:
    """Decide over part files of (uid, embedding, pixels); write out/<part>/b<bucket>.parquet of (uid, kept_uid
    (null when kept), cosine, sem_cluster, sem_dup_count). Returns a summary (rows, clusters, buckets)."""
    parts = sorted(files)
    meta = [pq.read_table(files[p], columns=["uid", "pixels"]) for p in parts]
    sizes = np.array([t.num_rows for t in meta], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    shutil.rmtree(out, ignore_errors=True)
    if n == 0:
        return {"rows": 0, "clusters": 0, "buckets": 0}
    both = pa.concat_tables(meta)
    del meta
    priority = (
        pc.sort_indices(both, sort_keys=[("pixels", "descending"), ("uid", "ascending")]).to_numpy().astype(np.int64)
    )
    del both
    rank = np.empty(n, dtype=np.int64)
    rank[priority] = np.arange(n)
    d = _dim(files[parts[int(np.flatnonzero(sizes)[0])]])
    k = n_clusters_for(n, rows_per_cluster, n_clusters)
    centroids = None
    if k > 1 and n > 1:
        rows = priority[sample_rows(n, k, sample, seed)]  # global row numbers, in the order training sees them
        centroids = train_centroids(_gather(files, parts, offsets, rows, d), k, seed=seed, niter=niter)
    del priority
    buckets = int(min(k, max(1, -(-n * d * 4 // bucket_bytes))))
    spill = out.parent / f"{out.name}.spill"
    shutil.rmtree(spill, ignore_errors=True)
    centroids = _shared(centroids)  # one copy in Ray's object store, not one per task
    _map(
        _spill_part,
        [(p, files[p], rank[offsets[i] : offsets[i + 1]], centroids, buckets, spill, d) for i, p in enumerate(parts)],
    )
    del rank
    _map(_decide_bucket, [(spill / f"b{b:05d}", out, eps, chunk_floats) for b in range(buckets)])
    shutil.rmtree(spill, ignore_errors=True)
    return {"rows": n, "clusters": k, "buckets": buckets}


def _map(fn: Callable, calls: list[tuple]) -> list:
    """fn over the calls: Ray tasks of one CPU each when Ray is up, else in this process."""
    import ray

    if not ray.is_initialized():
        return [fn(*c) for c in calls]
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(*c) for c in calls])


def _shared(value):
    """A value every task reads: put in Ray's object store once when Ray is up (a task gets it back resolved)."""
    import ray

    return ray.put(value) if ray.is_initialized() and value is not None else value


def _embeddings(path: Path, d: int | None = None) -> np.ndarray:
    col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    lengths = pc.list_value_length(col)
    lo, hi = (pc.min_max(lengths)[m].as_py() for m in ("min", "max"))
    if col.null_count or lo != hi or (d is not None and len(col) and lo != d):
        raise ValueError("semdedup: null image embeddings, or of different lengths, in the input")
    if len(col) == 0:
        return np.zeros((0, d or 0), dtype=np.float32)
    return np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), lo)


def _dim(path: Path) -> int:
    """The embeddings' length, off a part's first row."""
    first = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=["embedding"]))
    return len(first.column(0)[0])


def _gather(files: dict, parts: list[str], offsets: np.ndarray, rows: np.ndarray, d: int) -> np.ndarray:
    """The embeddings of global rows `rows`, in that order, read one part at a time."""
    out = np.empty((rows.size, d), dtype=np.float32)
    part_of = np.searchsorted(offsets, rows, side="right") - 1
    for i in np.unique(part_of):
        at = np.flatnonzero(part_of == i)
        out[at] = _embeddings(files[parts[i]], d)[rows[at] - offsets[i]]
    return out


def _spill_part(part: str, path: Path, rank: np.ndarray, centroids, buckets: int, spill: Path, d: int) -> None:
    emb = _embeddings(path, d)
    labels = assign(emb, centroids)
    uid = pq.read_table(path, columns=["uid"]).column("uid").combine_chunks()
    bucket = labels % buckets
    for b in np.unique(bucket):
        at = np.flatnonzero(bucket == b)
        table = pa.table(
            {
                "uid": uid.take(pa.array(at)),
                "rank": pa.array(rank[at], pa.int64()),
                "cluster": pa.array(labels[at], pa.int64()),
                "part": pa.array([part] * at.size, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb[at].ravel(), pa.float32()), d),
            }
        )
        atomic_write_parquet(table, spill / f"b{int(b):05d}" / f"{part}.parquet")


def _decide_bucket(folder: Path, out: Path, eps: float, chunk_floats: int) -> None:
    if not folder.is_dir():
        return  # no cluster of this bucket has rows
    t = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    col = t.column("embedding").combine_chunks()
    emb = col.flatten().to_numpy().reshape(len(col), -1)
    r = semantic_dedup(
        emb,
        eps,
        labels=t.column("cluster").to_numpy(),
        priority=np.argsort(t.column("rank").to_numpy(), kind="stable"),
        chunk_floats=chunk_floats,
    )
    uid = np.array(t.column("uid").to_pylist(), dtype=object)
    decisions = pa.table(
        {
            "uid": t.column("uid"),
            "kept_uid": pa.array(np.where(r.kept, None, uid[r.leader]).tolist(), pa.string()),
            "cosine": pa.array(r.cosine, pa.float32()),
            "sem_cluster": pa.array(r.cluster, pa.int32()),
            "sem_dup_count": pa.array(r.dup_count(), pa.int32()),
            "part": t.column("part"),
        }
    )
    for part in pc.unique(decisions.column("part")).to_pylist():
        rows = decisions.filter(pc.equal(decisions.column("part"), part)).drop_columns(["part"])
        atomic_write_parquet(rows, out / part / f"{folder.name}.parquet")
