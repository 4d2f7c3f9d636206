"""decontaminate: drop images that are copies of a user-given evaluation set's images (issue 15).

The eval set (a folder of image files, or a Parquet of image bytes with an id column) is read once per run in
`prepare`: its sha256s, pHashes, 8x8 colour thumbnails and, with `min_cosine`, its image embeddings from the same
open_clip tower `embed` used go to `_work/eval_index.parquet`, which each worker loads in `setup`. An input image is
`eval_contamination` when its bytes are an eval item's, or its pHash is within `max_distance` of an eval item's and no
cell of their colour thumbnails differs by more than `max_thumb_diff` (dedup's signals and defaults; images plainer
than `min_detail` get exact matches only), or its embedding's cosine with an eval item's is >= `min_cosine`. The
output is thin (uid); the image stays in the source stage's rows."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curation.dedup.neardup import popcount64
from curation.dedup.signals import THUMB_BYTES, image_signals, is_plain, thumb_diff, thumb_matrix
from curation.engine.store import atomic_write_parquet, empty_rejects, make_rejects
from curation.ops.base import Op, Params
from schemas import Decontaminated, arrow_schema

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PAIR_CHUNK = 1 << 22  # (input image, eval item) distances computed at once
INDEX = "eval_index.parquet"


class DecontaminateParams(Params):
    eval_set: str = Field(
        description="the evaluation set: a folder of image files (an item's id is its path in the folder) or a "
        "Parquet with image bytes (`image_col`) and ids (`id_col`)"
    )
    id_col: str = Field("id", description="Parquet eval set: the column naming each item")
    image_col: str = Field("image", description="Parquet eval set: the image bytes (or a datasets Image struct)")
    max_distance: int = Field(6, ge=0, le=32, description="pHash Hamming distance at or under which an image matches")
    max_thumb_diff: int | None = Field(
        20,
        ge=0,
        le=255,
        description="a pHash match must also look alike everywhere: no cell of the two 8x8 RGB thumbnails may "
        "differ by more than this in any channel (0-255); null: pHash alone decides",
    )
    min_detail: float = Field(
        2.0,
        ge=0,
        description="images whose 8x8 grey thumbnail varies less (standard deviation, 0-255) are too plain for a "
        "perceptual hash: exact copies only",
    )
    min_cosine: float | None = Field(
        None,
        gt=0,
        le=1,
        description="also match on image embeddings (needs `embed` before this stage, with the same model): cosine "
        "at or over this is a match; null: hashes only",
    )
    model: str = Field("ViT-H-14-quickgelu", description="min_cosine: embed's open_clip model name")
    pretrained: str | None = Field("metaclip_fullcc", description="min_cosine: embed's tag or local checkpoint path")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="min_cosine: as embed's")
    batch_size: int = Field(32, ge=1, description="min_cosine: eval images per forward pass")

    def hashed(self) -> dict[str, Any]:
        """The params plus a fingerprint of the eval set's files (names, sizes, mtimes): a changed set reruns."""
        return {**super().hashed(), "eval_set_files": _files_fingerprint(Path(self.eval_set))}


def _eval_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _files_fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else _eval_files(path) if path.is_dir() else []
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest() if files else "missing"


def load_eval_set(p: DecontaminateParams) -> tuple[list[str], list[bytes]]:
    """(ids, encoded images) of the eval set; a missing, unreadable or empty set is a ValueError saying what to give."""
    path = Path(p.eval_set)
    what = "give a folder of image files or a Parquet with image bytes and ids"
    if path.is_dir():
        files = _eval_files(path)
        if not files:
            raise ValueError(
                f"decontaminate: eval_set {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [f.relative_to(path).as_posix() for f in files], [f.read_bytes() for f in files]
    if not path.is_file():
        raise ValueError(f"decontaminate: eval_set {path} does not exist; {what}")
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise ValueError(
            f"decontaminate: eval_set {path} is not a folder or a readable Parquet ({e}); {what}"
        ) from None
    missing = [c for c in (p.id_col, p.image_col) if c not in schema.names]
    if missing:
        raise ValueError(
            f"decontaminate: eval_set {path} has no column(s) {missing} (columns: {schema.names}); "
            "set id_col / image_col"
        )
    t = pq.read_table(path, columns=[p.id_col, p.image_col])
    images = t.column(p.image_col)
    if pa.types.is_struct(images.type):  # a datasets Image feature: {bytes, path}
        images = pc.struct_field(images, "bytes")
    ids, data = [str(i) for i in t.column(p.id_col).to_pylist()], images.to_pylist()
    if not ids:
        raise ValueError(f"decontaminate: eval_set {path} has no rows")
    if (bad := next((i for i, d in zip(ids, data) if not d), None)) is not None:
        raise ValueError(f"decontaminate: eval_set {path}: item {bad!r} has no image bytes")
    return ids, data


def build_index(p: DecontaminateParams) -> pa.Table:
    """The eval set's ids, sha256s, pHashes, thumbnails and (with min_cosine) embeddings, one row per item."""
    ids, data = load_eval_set(p)
    hashes, thumbs = [], []
    for i, d in zip(ids, data):
        try:
            h, thumb = image_signals(d)
        except Exception as e:
            raise ValueError(f"decontaminate: eval item {i!r} does not decode: {type(e).__name__}: {e}") from None
        hashes.append(h)
        thumbs.append(thumb)
    cols = {
        "id": pa.array(ids, pa.string()),
        "sha256": pa.array([hashlib.sha256(d).hexdigest() for d in data], pa.string()),
        "phash": pa.array(hashes, pa.uint64()),
        "thumb": pa.array(thumbs, pa.binary(THUMB_BYTES)),
    }
    meta = {}
    if p.min_cosine is not None:
        from curation.concepts.clip import load_clip

        clip = load_clip(p.model, p.pretrained, precision=p.precision)
        emb, _, errors = clip.encode_images(data, p.batch_size)
        if errors:
            i, err = next(iter(sorted(errors.items())))
            raise ValueError(f"decontaminate: eval item {ids[i]!r} does not preprocess for {clip.model_id}: {err}")
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), clip.dim)
        meta = {b"model_id": clip.model_id.encode()}
    return pa.table(cols).replace_schema_metadata(meta)


def _same_tower(a: str, b: str) -> bool:
    """Model ids name, weights and precision (`name/weights@precision`); the cosines compare if name and weights do."""
    return a.rsplit("@", 1)[0] == b.rsplit("@", 1)[0]


class Decontaminate(Op):
    """Per part: each image against the whole eval set (loaded once per worker); matches are rejected."""

    name = "decontaminate"
    version = "1"
    Params = DecontaminateParams
    output = Decontaminated

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index: pa.Table | None = None

    @classmethod
    def required_columns(cls, params: DecontaminateParams) -> set[str]:
        cols = {"uid", "image", "sha256"}
        return cols | {"image_embedding", "model"} if params.min_cosine is not None else cols

    @property
    def index_path(self) -> Path:
        return self.work / INDEX

    def prepare(self) -> None:
        """Read, hash (and embed) the eval set once per run; errors name the eval set and what is wrong."""
        atomic_write_parquet(build_index(self.params), self.index_path)

    def setup(self) -> None:
        t = pq.read_table(self.index_path) if self.index_path.exists() else build_index(self.params)
        self.index = t
        self.ids = t.column("id").to_pylist()
        self.sha = dict(zip(t.column("sha256").to_pylist(), range(t.num_rows)))
        self.hashes = t.column("phash").to_numpy()  # [E] uint64
        self.thumbs = thumb_matrix(t.column("thumb"))  # [E, 192] uint8
        self.plain = is_plain(self.thumbs, self.params.min_detail)  # [E]
        self.emb = None
        if self.params.min_cosine is not None:
            col = t.column("embedding").combine_chunks()
            self.emb = col.flatten().to_numpy().reshape(len(col), -1)  # [E, D] unit rows
            self.model_id = (t.schema.metadata or {}).get(b"model_id", b"").decode()

    def report(self) -> dict | None:
        meta = pq.read_metadata(self.index_path) if self.index_path.exists() else None
        return {"eval_items": meta.num_rows, "cosine": self.params.min_cosine is not None} if meta else None

    def match_hashes(self, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Nearest verified eval item by pHash per image: (eval index or -1 [N], distance [N])."""
        p, n = self.params, len(images)
        sig = [image_signals(d) for d in images]
        h = np.array([s[0] for s in sig], np.uint64)  # [N]
        rgb = np.frombuffer(b"".join(s[1] for s in sig), np.uint8).reshape(n, THUMB_BYTES)  # [N, 192]
        plain = is_plain(rgb, p.min_detail)  # [N]
        best, dist = np.full(n, -1, np.int64), np.full(n, 255, np.int64)
        step = max(1, PAIR_CHUNK // max(1, len(self.hashes)))
        for s in range(0, n, step):
            d = popcount64(h[s : s + step, None] ^ self.hashes[None, :])  # [c, E] uint8
            ok = (d <= p.max_distance) & ~plain[s : s + step, None] & ~self.plain[None, :]
            rows, cols = np.nonzero(ok)
            if p.max_thumb_diff is not None and rows.size:
                alike = thumb_diff(rgb[s + rows], self.thumbs[cols]) <= p.max_thumb_diff
                rows, cols = rows[alike], cols[alike]
            masked = np.full(d.shape, 255, np.uint8)
            masked[rows, cols] = d[rows, cols]
            j = masked.argmin(axis=1)  # nearest; ties: the first eval item in id order
            hit = masked[np.arange(len(j)), j] <= p.max_distance
            best[s : s + step] = np.where(hit, j, -1)
            dist[s : s + step] = np.where(hit, masked[np.arange(len(j)), j], 255)
        return best, dist

    def match_cosine(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Most similar eval item by embedding per row: (eval index or -1 [N], cosine [N])."""
        ids = set(table.column("model").drop_null().to_pylist())  # embed's model ids
        if bad := next((m for m in sorted(ids) if not _same_tower(m, self.model_id)), None):
            raise ValueError(
                f"decontaminate: the rows were embedded with {bad} and the eval set with {self.model_id}; "
                "set this stage's model / pretrained to embed's"
            )
        col = table.column("image_embedding").combine_chunks()
        n, e = table.num_rows, self.emb.shape[0]
        best, cos = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        valid = np.flatnonzero(~col.is_null().to_numpy(zero_copy_only=False))
        if valid.size == 0:
            return best, cos
        emb = col.take(pa.array(valid)).flatten().to_numpy().reshape(valid.size, -1)  # [V, D]
        step = max(1, PAIR_CHUNK // max(1, e))
        for s in range(0, valid.size, step):
            sims = emb[s : s + step] @ self.emb.T  # [c, E]
            j = sims.argmax(axis=1)
            c = sims[np.arange(len(j)), j]
            rows = valid[s : s + step]
            hit = c >= self.params.min_cosine
            best[rows] = np.where(hit, j, -1)
            cos[rows] = c
        return best, cos

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.num_rows == 0:
            return arrow_schema(Decontaminated).empty_table(), empty_rejects()
        if self.index is None:
            self.setup()
        table = table.sort_by("uid")
        exact = np.array([self.sha.get(s, -1) for s in table.column("sha256").to_pylist()], np.int64)
        near, dist = self.match_hashes(table.column("image").to_pylist())
        sem, cos = self.match_cosine(table) if self.emb is not None else (np.full(table.num_rows, -1), None)
        details = []
        for i in range(table.num_rows):  # exact copy, then pHash, then cosine
            if exact[i] >= 0:
                details.append(f"matches eval item {self.ids[exact[i]]} (exact copy, sha256)")
            elif near[i] >= 0:
                details.append(f"matches eval item {self.ids[near[i]]} (phash distance {dist[i]})")
            elif sem[i] >= 0:
                details.append(f"matches eval item {self.ids[sem[i]]} (cosine {cos[i]:.3f})")
            else:
                details.append(None)
        hit = np.array([d is not None for d in details])
        out = pa.table({"uid": table.filter(pa.array(~hit)).column("uid")}, schema=arrow_schema(Decontaminated))
        dropped = table.filter(pa.array(hit))
        return out, make_rejects(dropped, self.stage, "eval_contamination", [d for d in details if d is not None])
