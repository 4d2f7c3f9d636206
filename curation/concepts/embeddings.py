"""Concept vocabulary embeddings and their FAISS index, cached by (model, vocabulary hash, template)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np

from curation.concepts.index import ConceptIndex, IndexKind, load_or_build
from curation.concepts.vocab import read_vocab, vocab_hash
from curation.engine.store import atomic_write_bytes, atomic_write_json, read_json

CHUNK = 50_000  # entries embedded per cached chunk: a killed build resumes from the last finished chunk


def default_cache_dir() -> Path:
    """$CURATION_CACHE, else ~/.cache/curation: shared by runs, since a 500K vocabulary takes long to embed."""
    return Path(os.environ.get("CURATION_CACHE") or Path.home() / ".cache" / "curation")


def cache_key(model_id: str, vhash: str, template: str) -> str:
    """What identifies a set of concept embeddings: model (with weights and precision), vocabulary, text template."""
    return f"{model_id}|{vhash}|{template}"


def concept_dir(cache_dir: str | Path, model_id: str, vhash: str, template: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:80]
    tag = hashlib.sha256(cache_key(model_id, vhash, template).encode()).hexdigest()[:12]
    return Path(cache_dir) / "concepts" / f"{vhash}-{slug}-{tag}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def embed_vocab(texts: list[str], clip, template: str, out: Path, batch_size: int = 256, progress=None) -> np.ndarray:
    """Text-tower embeddings float32 [C, D] of `template.format(text)`, computed chunk by chunk under `out`."""
    chunks = []
    for start in range(0, len(texts), CHUNK):
        path = out / f"chunk-{start // CHUNK:05d}.npy"
        if not path.exists():
            batch = [template.format(t) for t in texts[start : start + CHUNK]]
            atomic_write_bytes(path, _npy_bytes(clip.encode_texts(batch, batch_size=batch_size)))
        chunks.append(np.load(path))
        if progress:
            progress(min(start + CHUNK, len(texts)), len(texts))
    return np.concatenate(chunks) if chunks else np.zeros((0, clip.dim), np.float32)


class ConceptCache:
    """The embeddings and index of one (vocabulary, model, template), built once and loaded by every worker."""

    def __init__(
        self, vocab_path: str | Path, model_id: str, template: str = "{}", cache_dir: str | Path | None = None
    ):
        self.vocab = read_vocab(vocab_path)
        self.vhash = vocab_hash(self.vocab)
        self.model_id, self.template = model_id, template
        self.key = cache_key(model_id, self.vhash, template)
        self.dir = concept_dir(cache_dir or default_cache_dir(), model_id, self.vhash, template)

    @property
    def embeddings_path(self) -> Path:
        return self.dir / "embeddings.npy"

    def index_path(self, kind: IndexKind, nlist: int, nprobe: int) -> Path:
        return self.dir / ("flat.faiss" if kind == "flat" else f"ivf-{nlist}-{nprobe}.faiss")

    def ready(self) -> bool:
        meta = read_json(self.dir / "meta.json")
        return bool(meta) and meta.get("key") == self.key and self.embeddings_path.exists()

    def build(self, clip, batch_size: int = 256, progress=None) -> np.ndarray:
        """Embed the vocabulary with `clip` (its model_id must be this cache's) unless cached; return [C, D]."""
        if clip.model_id != self.model_id:
            raise ValueError(f"concept cache is for model {self.model_id!r}, got {clip.model_id!r}")
        if self.ready():
            return self.embeddings()
        texts = self.vocab.column("text").to_pylist()
        vectors = embed_vocab(texts, clip, self.template, self.dir / "_chunks", batch_size, progress)
        atomic_write_bytes(self.embeddings_path, _npy_bytes(vectors))
        atomic_write_json(
            self.dir / "meta.json",
            {
                "key": self.key,
                "model": self.model_id,
                "vocab": self.vhash,
                "template": self.template,
                "count": int(vectors.shape[0]),
                "dim": int(vectors.shape[1]),
            },
        )
        for chunk in (self.dir / "_chunks").glob("*.npy"):
            chunk.unlink()
        return vectors

    def embeddings(self) -> np.ndarray:
        """The cached embeddings [C, D] (memory-mapped)."""
        if not self.ready():
            raise FileNotFoundError(
                f"no concept embeddings for {self.key} in {self.dir}; run `curate vocab embed` "
                "or the match_concepts stage, which builds them"
            )
        return np.load(self.embeddings_path, mmap_mode="r")

    def index(self, kind: IndexKind = "flat", nlist: int = 1024, nprobe: int = 8) -> ConceptIndex:
        """The FAISS index over the cached embeddings, built and saved on first use."""
        return load_or_build(self.index_path(kind, nlist, nprobe), self.key, self.embeddings, kind, nlist, nprobe)

    def describe(self) -> dict:
        return {"dir": str(self.dir), **(read_json(self.dir / "meta.json") or {})}
