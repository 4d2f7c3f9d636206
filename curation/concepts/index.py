"""Top-K concept search over a vocabulary of concept embeddings with FAISS (flat or IVF, inner product)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "ivf"]
SIDECAR_SUFFIX = ".json"  # sidecar metadata lives at `<index path>.json`
DEFAULT_SEED = 1234  # k-means seed for IVF training (FAISS's own default, made explicit)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Return `x` as C-contiguous float32 with unit-L2 rows (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # [N, D]
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [N, 1]
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def clustered_vectors(n: int, d: int, n_clusters: int, spread: float, seed: int = 0) -> np.ndarray:
    """Return `n` unit vectors in `d` dims drawn around `n_clusters` random centres (real-embedding-like)."""
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((n_clusters, d)))  # [K, D]
    labels = rng.integers(0, n_clusters, size=n)  # [N]
    noise = rng.standard_normal((n, d)).astype(np.float32) * np.float32(spread / np.sqrt(d))  # [N, D]
    return normalize_rows(centres[labels] + noise)  # [N, D]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / k, with k the width of `exact_ids`; -1 ids never count."""
    approx_ids = np.asarray(approx_ids)  # [N, k]
    exact_ids = np.asarray(exact_ids)  # [N, k]
    if approx_ids.shape != exact_ids.shape or approx_ids.ndim != 2:
        raise ValueError(
            f"recall_at_k needs two [N, k] arrays of equal shape, got {approx_ids.shape} and {exact_ids.shape}"
        )
    n, k = exact_ids.shape
    if n == 0 or k == 0:
        return 1.0
    hits = (approx_ids[:, :, None] == exact_ids[:, None, :]) & (approx_ids[:, :, None] >= 0)  # [N, k, k]
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


def cache_key(model_id: str, vocab_hash: str) -> str:
    """Key that identifies a concept index: the embedding model and the vocabulary it embedded."""
    return f"{model_id}|{vocab_hash}"


class ConceptIndex:
    """Inner-product top-K search over L2-normalised concept embeddings (cosine similarity).

    Concept vectors (and queries) are normalised defensively, so scores are cosines whatever the
    caller passes. `kind="ivf"` trains an IndexIVFFlat on the concept vectors themselves with a fixed
    k-means seed; `nlist` is clamped to the number of concepts. On a machine where
    `faiss.get_num_gpus() > 0` the index is copied to all GPUs (FAISS GPU search caps k at 2048);
    thread count is the caller's business (`faiss.omp_set_num_threads`).
    """

    def __init__(
        self,
        concepts: np.ndarray,
        kind: IndexKind = "flat",
        nlist: int = 1024,
        nprobe: int = 8,
        key: str = "",
        seed: int = DEFAULT_SEED,
        use_gpu: bool | None = None,
    ) -> None:
        """Build the index from concept embeddings [C, D]; `key` is stored in the save sidecar."""
        concepts = np.asarray(concepts)
        if concepts.ndim != 2 or concepts.shape[0] == 0 or concepts.shape[1] == 0:
            raise ValueError(f"concepts must be a non-empty [C, D] array, got shape {concepts.shape}")
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        vectors = normalize_rows(concepts)  # [C, D]
        count, d = vectors.shape
        self.kind: IndexKind = kind
        self.d = int(d)
        self.key = key
        self.seed = int(seed)
        self.nlist = int(min(max(nlist, 1), count)) if kind == "ivf" else 0
        self.nprobe = int(min(max(nprobe, 1), self.nlist)) if kind == "ivf" else 0
        if kind == "flat":
            cpu = faiss.IndexFlatIP(self.d)
        else:
            quantizer = faiss.IndexFlatIP(self.d)
            cpu = faiss.IndexIVFFlat(quantizer, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            cpu.cp.seed = self.seed
            cpu.train(vectors)
            cpu.nprobe = self.nprobe
        cpu.add(vectors)
        self._attach(cpu, use_gpu)

    def _attach(self, cpu: faiss.Index, use_gpu: bool | None) -> None:
        """Keep the CPU index (for saving) and pick the search index: all GPUs if present, else CPU."""
        if isinstance(cpu, faiss.IndexIVF):
            cpu.nprobe = self.nprobe  # copied to the GPU index by the cloner
        self._cpu = cpu
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.on_gpu = bool(gpus > 0 if use_gpu is None else use_gpu and gpus > 0)
        self._search = faiss.index_cpu_to_all_gpus(cpu) if self.on_gpu else cpu

    @property
    def count(self) -> int:
        """Number of concepts in the index."""
        return int(self._cpu.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k concepts per query, best first: (scores float32 [N, k], ids int64 [N, k]).

        A 1-D query [D] is treated as [1, D]; an empty [0, D] batch gives [0, k] arrays. `k` is
        clamped to the number of concepts. IVF may find fewer than k concepts in its `nprobe` lists;
        those slots hold id -1 and score -FLT_MAX (about -3.4e38).
        """
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]  # [1, D]
        if q.ndim != 2:
            raise ValueError(f"queries must be [N, D] or [D], got shape {np.asarray(queries).shape}")
        if q.shape[1] != self.d:
            raise ValueError(f"query dimension {q.shape[1]} does not match the concept index dimension {self.d}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.count)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, ids = self._search.search(normalize_rows(q), k)  # [N, k], [N, k]
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def metadata(self) -> dict:
        """Sidecar contents: what the index is and which (model, vocabulary) it was built from."""
        return {
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "d": self.d,
            "count": self.count,
            "seed": self.seed,
            "key": self.key,
        }

    def save(self, path: str | Path) -> Path:
        """Write the index with faiss.write_index and its JSON sidecar at `<path>.json`; return the sidecar path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu, str(path))
        sidecar = sidecar_path(path)
        sidecar.write_text(json.dumps(self.metadata(), indent=2, sort_keys=True))
        return sidecar

    @classmethod
    def load(cls, path: str | Path, expected_key: str | None = None, use_gpu: bool | None = None) -> ConceptIndex:
        """Read an index saved by `save`; raise ValueError if the sidecar key differs from `expected_key`."""
        path = Path(path)
        sidecar = sidecar_path(path)
        if not path.exists() or not sidecar.exists():
            raise FileNotFoundError(
                f"concept index needs both {path} and {sidecar}; rebuild it with ConceptIndex(...).save()"
            )
        meta = json.loads(sidecar.read_text())
        if expected_key is not None and meta.get("key") != expected_key:
            raise ValueError(
                f"concept index {path} was built for key {meta.get('key')!r}, expected {expected_key!r}: "
                "the model or vocabulary changed, rebuild the index"
            )
        cpu = faiss.read_index(str(path))
        if cpu.d != meta["d"] or cpu.ntotal != meta["count"]:
            raise ValueError(
                f"concept index {path} holds {cpu.ntotal} x {cpu.d} but its sidecar {sidecar} says "
                f"{meta['count']} x {meta['d']}: the two files are out of sync, rebuild the index"
            )
        self = cls.__new__(cls)
        self.kind, self.d, self.key = meta["kind"], int(meta["d"]), meta["key"]
        self.nlist, self.nprobe, self.seed = int(meta["nlist"]), int(meta["nprobe"]), int(meta["seed"])
        self._attach(cpu, use_gpu)
        return self


def sidecar_path(path: str | Path) -> Path:
    """Path of the JSON sidecar that goes with the index file at `path`."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def load_or_build(
    path: str | Path, key: str, concepts_fn, kind: IndexKind = "flat", nlist: int = 1024, nprobe: int = 8
) -> ConceptIndex:
    """Load the cached index at `path` if its key matches, else build from `concepts_fn()` [C, D] and save it."""
    path = Path(path)
    if path.exists() and sidecar_path(path).exists():
        meta = json.loads(sidecar_path(path).read_text())
        if meta.get("key") == key and meta.get("kind") == kind:
            return ConceptIndex.load(path, expected_key=key)
    index = ConceptIndex(concepts_fn(), kind=kind, nlist=nlist, nprobe=nprobe, key=key)
    index.save(path)
    return index
