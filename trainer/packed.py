"""Offline packing for training: encode the samples, pack, write packed shards (streaming), read them back resumably.

Packed shard layout: `DIR/packed-NNNNN.parquet`, one schemas.TrainSequence row per training sequence (seq_id,
sample_ids, lengths, input_ids, labels, images), rows in packing order; plus `DIR/_report.json` (counts, fill
ratio, compression, rejects by reason, the key it was built for). With packing off each row holds one sample (the
padded baseline). Rows hold no padding: collate pads.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from schemas import TrainSequence, arrow_schema
from schemas.mixture import sample_hash, write_manifest
from trainer.anyres import ImageInputs
from trainer.data import Shard, check_columns, shard_files
from trainer.model import IGNORE_INDEX, positions_from_lens
from trainer.pack import pack
from trainer.template import EncodeError, encode

ROWS_PER_FILE = 4096
FILE_BYTES = 256 << 20  # a packed file ends past this many bytes of samples (tokens and images) or ROWS_PER_FILE rows
ROW_GROUP = 64
MIXTURE = "mixture.parquet"
SCHEMA = arrow_schema(TrainSequence)


def resolve_shards(shards) -> list[Path]:
    """Instruction shard files from files and/or directories (each directory's part-*.parquet, sorted), in order."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    return [f for item in items for f in shard_files(item)]


def _key_hash(key: dict, files: list[Path]) -> str:
    """Hash of the build key plus each shard's path, size and mtime."""
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps([key, stats], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_size(image: pa.Scalar) -> tuple[int, int] | None:
    """(H, W) from the header, without copying the bytes (decoded at collate time); None for a null or unreadable
    image."""
    if not image.is_valid:
        return None
    try:
        w, h = Image.open(pa.BufferReader(image.as_buffer())).size
    except Exception:
        return None
    return h, w


def encoded_batches(
    files: list[Path],
    tokenizer,
    template: str,
    image_tokens: int | Callable[[tuple[int, int]], int],
    max_len: int,
    system: str | None,
    rejects: Counter,
    hashed: bool = False,
) -> Iterator[tuple[list[dict], pa.Array]]:
    """Per batch of shard rows, in order: the trainable samples {id, input_ids, labels, image} (image: the sample's
    row in the batch's image column, -1 for none) and that column, the images left in Arrow memory; the other rows
    are counted in `rejects` by reason. A run dir's part lacking the image has it read by uid (trainer.data.Shard).
    `image_tokens`: copies of each `<image>`, or a function of the image's (H, W) (AnyRes: LlavaLite.tokens_for).
    `hashed`: each sample also has its uid, source file and sample_hash (schemas.mixture)."""
    fixed = isinstance(image_tokens, int)  # else the count needs the image's size first (AnyRes)
    for f in files:
        for _, batch in Shard(f).batches(256):
            images, out = batch.column("image"), []
            uids = batch.column("uid").to_pylist() if hashed else None
            for row, (sid, conv) in enumerate(
                zip(batch.column("id").to_pylist(), batch.column("conversations").to_pylist())
            ):
                size = None if fixed else _image_size(images[row])
                n_tokens = image_tokens if fixed else image_tokens(size) if size else 1
                try:
                    enc = encode(conv, tokenizer, template, n_tokens, system, max_len)
                except EncodeError as e:  # no_labels, too_long, template_mismatch, bad_turns
                    rejects[e.reason] += 1
                    continue
                if enc.n_images > 1:  # an Instruction row carries one image
                    rejects["image_count"] += 1
                    continue
                if enc.n_images and size is None and (not fixed or _image_size(images[row]) is None):
                    rejects["bad_image"] += 1
                    continue
                out.append(
                    {"id": sid, "input_ids": enc.input_ids, "labels": enc.labels, "image": row if enc.n_images else -1}
                )
                if hashed:
                    image = images[row].as_buffer() if enc.n_images else None
                    out[-1].update(uid=uids[row], source=str(f), sample_hash=sample_hash(sid, conv, image))
            yield out, images


def encoded(
    files: list[Path],
    tokenizer,
    template: str,
    image_tokens: int | Callable[[tuple[int, int]], int],
    max_len: int,
    system: str | None,
    rejects: Counter,
) -> Iterator[dict]:
    """Every trainable sample {id, input_ids, labels, images (bytes)} of the shards in order (see encoded_batches)."""
    for samples, images in encoded_batches(files, tokenizer, template, image_tokens, max_len, system, rejects):
        for s in samples:
            yield {
                "id": s["id"],
                "input_ids": s["input_ids"],
                "labels": s["labels"],
                "images": [images[s["image"]].as_py()] if s["image"] >= 0 else [],
            }


SPILL = pa.schema(  # per sample; the packed columns concatenate these lists, so their types are the contract's
    [pa.field("slot", pa.int64(), nullable=False), *(SCHEMA.field(c) for c in ("input_ids", "labels", "images"))]
)
SPILL_BYTES = 256 << 20  # bytes of samples held in memory, over all packed files, before they go to the spill files
RAW = {"compression": "none", "use_dictionary": False}  # spill files: temporary, written and read once


def _file_parts(offsets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[S] packed file of each sequence: consecutive sequences, a new file past FILE_BYTES of samples (`weights`,
    in sequence order) or ROWS_PER_FILE rows, so one file's samples bound the memory of its assembly."""
    seq = np.arange(len(offsets) - 1)
    before = np.concatenate([[0], np.cumsum(weights)])[offsets[:-1]]  # [S] bytes of the sequences before
    key = (before // FILE_BYTES) * (len(seq) + 1) + seq // ROWS_PER_FILE  # non-decreasing
    return np.unique(key, return_inverse=True)[1].reshape(-1) if len(seq) else seq


def _spill(
    batches: Iterator[tuple[list[dict], pa.Array]], slot: np.ndarray, part_of_slot: np.ndarray, tmp: Path
) -> None:
    """Append the k-th sample, under its slot (`slot[k]`; -1: not packed), to the spill file of the packed file it
    lands in; at most SPILL_BYTES of samples wait in memory, their images never copied out of Arrow."""
    writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[pa.Table]] = {}
    waiting, k = 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one spill file open per packed file
    need = int(part_of_slot.max(initial=0)) + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))

    def flush() -> None:
        for part, tables in buffers.items():
            if part not in writers:
                writers[part] = pq.ParquetWriter(tmp / f"spill-{part:05d}.parquet", SPILL, **RAW)
            writers[part].write_table(pa.concat_tables(tables))
        buffers.clear()
        pa.default_memory_pool().release_unused()

    for samples, images in batches:
        slots = slot[k : k + len(samples)]
        k += len(samples)
        by_part: dict[int, list[int]] = {}
        for j, i in enumerate(slots.tolist()):
            if i >= 0:  # else rejected by pack
                by_part.setdefault(int(part_of_slot[i]), []).append(j)
        for part, js in by_part.items():
            rows = [samples[j] for j in js]
            with_image = [s["image"] for s in rows if s["image"] >= 0]
            table = pa.table(
                {
                    "slot": pa.array(slots[js], pa.int64()),
                    "input_ids": pa.array([s["input_ids"] for s in rows], pa.list_(pa.int32())),
                    "labels": pa.array([s["labels"] for s in rows], pa.list_(pa.int32())),
                    "images": pa.ListArray.from_arrays(
                        pa.array(np.concatenate([[0], np.cumsum([s["image"] >= 0 for s in rows])]), pa.int32()),
                        images.take(pa.array(with_image, pa.int64())).cast(pa.binary()),
                    ),
                },
                schema=SPILL,
            )
            buffers.setdefault(part, []).append(table)
            waiting += table.nbytes
        if waiting >= SPILL_BYTES:
            flush()
            waiting = 0
    flush()
    for w in writers.values():
        w.close()


def _assemble(spill: pa.Table, first_slot: int, bounds: np.ndarray, ids: list[str], first_seq: int) -> pa.Table:
    """Packed rows from one file's spill: sequence j holds slots first_slot + bounds[j] .. first_slot + bounds[j+1]."""
    spill = spill.take(pc.sort_indices(spill["slot"]))
    if spill.num_rows != bounds[-1] or (spill.num_rows and spill["slot"][0].as_py() != first_slot):
        raise RuntimeError(
            f"packed build: spill for slots from {first_slot} holds {spill.num_rows} samples, "
            f"expected {bounds[-1]}: the shards changed during the build"
        )

    def per_sequence(col: str) -> pa.ListArray:  # concatenate the samples' lists of each sequence
        counts = pc.list_value_length(spill[col]).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(counts)])[bounds].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pc.list_flatten(spill[col]).combine_chunks())

    starts = pa.array(bounds.astype(np.int32))
    lengths = pc.list_value_length(spill["input_ids"]).cast(pa.int32()).combine_chunks()
    return pa.table(
        {
            "seq_id": [f"seq-{first_seq + j + 1:08d}" for j in range(len(bounds) - 1)],
            "sample_ids": pa.ListArray.from_arrays(starts, pa.array(ids, pa.string())),
            "lengths": pa.ListArray.from_arrays(starts, lengths),
            "input_ids": per_sequence("input_ids"),
            "labels": per_sequence("labels"),
            "images": per_sequence("images"),
        },
        schema=SCHEMA,
    )


def build_packed(
    shards,
    out_dir: str | Path,
    tokenizer,
    template: str,
    image_tokens: int | Callable[[tuple[int, int]], int],
    max_len: int,
    packing: bool = True,
    system: str | None = None,
    key: dict | None = None,
    method: str = "gap_aware",
) -> dict:
    """Write packed shards to `out_dir` (reused when built for the same key and shard files); return the report.

    Two streaming passes over the shards: the first encodes every sample for its length alone and the lengths are
    packed; the second encodes again and spills each sample to the spill file of the packed file it lands in; each
    packed file is then assembled from its own spill. Memory: ids and lengths, plus a few times FILE_BYTES (measured:
    peak about 8x FILE_BYTES above the start, whatever the data set's size; bench/bench_build_packed.py).
    A callable `image_tokens` (AnyRes) is not part of the reuse key: `key` must name what it depends on."""
    out_dir, files = Path(out_dir), resolve_shards(shards)
    digest = _key_hash(
        {
            **(key or {}),
            "template": template,
            "image_tokens": image_tokens if isinstance(image_tokens, int) else "per image size",  # key: how (AnyRes)
            "max_len": max_len,
            "packing": packing,
            "system": system,
            "method": method,
        },
        files,
    )
    report_path = out_dir / "_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("key") == digest:
            return report
    rejects: Counter = Counter()
    ids, lens, weights = [], [], []  # weights: bytes of int32 ids and labels plus the encoded image
    mixture = []  # per sample: uid, source, sample_hash (the mixture manifest)
    for samples, images in encoded_batches(files, tokenizer, template, image_tokens, max_len, system, rejects, True):
        sizes = pc.binary_length(images).fill_null(0).to_numpy(zero_copy_only=False)
        for s in samples:
            mixture.append((s["uid"], s["source"], s["sample_hash"]))
            ids.append(s["id"])
            lens.append(len(s["input_ids"]))
            weights.append(8 * len(s["input_ids"]) + (int(sizes[s["image"]]) if s["image"] >= 0 else 0))
    lengths = np.array(lens, dtype=np.int64)
    if packing:
        res = pack(ids, lengths, max_len, method)
        rejects.update(Counter(f"pack_{r}" for _, r, _ in res.rejects))  # pack_too_long: cannot happen after encode
        order, offsets = res.ids.tolist(), res.offsets  # sample ids in sequence order; sequence q: offsets[q:q+2]
        index = {sid: k for k, sid in enumerate(ids)}  # unique: pack checked
        pos = np.array([index[sid] for sid in order], dtype=np.int64)  # [P] place in `order` -> k-th sample
    else:
        order, offsets, pos = ids, np.arange(len(ids) + 1), np.arange(len(ids))
    slot = np.full(len(ids), -1, dtype=np.int64)  # [N] k-th sample -> its place in `order` (-1: rejected by pack)
    slot[pos] = np.arange(len(pos))
    n_rows = len(offsets) - 1
    part_of_seq = _file_parts(offsets, np.asarray(weights, dtype=np.int64)[pos])  # [S]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _spill(
        encoded_batches(files, tokenizer, template, image_tokens, max_len, system, Counter()),
        slot,
        np.repeat(part_of_seq, np.diff(offsets)),
        tmp,
    )
    first_seqs = np.flatnonzero(np.diff(part_of_seq, prepend=-1)) if n_rows else np.zeros(1, dtype=np.int64)
    for part, (q0, q1) in enumerate(zip(first_seqs, [*first_seqs[1:], n_rows])):
        spill = tmp / f"spill-{part:05d}.parquet"
        table = pq.read_table(spill) if spill.exists() else SPILL.empty_table()
        lo, hi = int(offsets[q0]), int(offsets[q1])
        packed = _assemble(table, lo, np.asarray(offsets[q0 : q1 + 1]) - lo, order[lo:hi], int(q0))
        pq.write_table(packed, tmp / f"packed-{part:05d}.parquet", row_group_size=ROW_GROUP, use_dictionary=["seq_id"])
        spill.unlink(missing_ok=True)
        del table, packed
        pa.default_memory_pool().release_unused()
    picked = [mixture[k] for k in pos.tolist()]  # in training order: sequence by sequence
    manifest = pa.table(
        {
            "id": pa.array(order, pa.string()),
            "uid": pa.array([m[0] for m in picked], pa.string()),
            "sample_hash": pa.array([m[2] for m in picked], pa.string()),
            "source": pa.array([m[1] for m in picked], pa.string()),
        }
    )
    mix = write_manifest(tmp / MIXTURE, manifest, shards=[str(f) for f in files])
    del mixture, picked, manifest
    tokens = int(lengths.sum())
    longest = int(np.add.reduceat(lengths[pos], offsets[:-1]).max()) if n_rows else 0  # tokens of the longest row
    report = {
        "key": digest,
        "packing": packing,
        "max_len": max_len,
        "template": template,
        "image_tokens": image_tokens if isinstance(image_tokens, int) else "per image size",
        "samples_in": len(ids) + sum(rejects.values()),
        "samples": len(ids),
        "rows": n_rows,
        "tokens": tokens,
        "rejects": dict(sorted(rejects.items())),
        "fill_ratio": tokens / (n_rows * max_len) if n_rows else 0.0,  # of max_len-long rows
        "compression": len(ids) / n_rows if n_rows else 0.0,  # samples per row
        "longest_row": longest,
        "mixture": MIXTURE,  # every sample packed, in order, with its content hash (schemas.mixture)
        "mixture_digest": mix["digest"],
    }
    (tmp / "_report.json").write_text(json.dumps(report, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return report


class PackedReader:
    """Rows of packed shards in a seeded per-epoch permutation; `state()`/`load_state()` resume exactly."""

    def __init__(self, packed_dir: str | Path, seed: int = 0, shuffle: bool = True, cache_groups: int = 16):
        self.files = sorted(Path(packed_dir).glob("packed-*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"no packed-*.parquet in {packed_dir}: run build_packed first")
        self.seed, self.shuffle, self.cache_groups = seed, shuffle, cache_groups
        self._index: list[tuple[int, int, int]] = []  # global row -> (file, row group, row in group)
        for fi, f in enumerate(self.files):
            check_columns(f, TrainSequence)
            md = pq.ParquetFile(f).metadata
            for g in range(md.num_row_groups):
                self._index += [(fi, g, r) for r in range(md.row_group(g).num_rows)]
        self.epoch, self.position = 0, 0  # the next row is order(epoch)[position]
        self._order: np.ndarray | None = None
        self._cache: dict[tuple[int, int], list[dict]] = {}

    def __len__(self) -> int:
        return len(self._index)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a permutation seeded by (seed, epoch), or identity without shuffle."""
        if not self.shuffle:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rows": len(self), "seed": self.seed}

    def load_state(self, state: dict) -> None:
        if state["rows"] != len(self) or state["seed"] != self.seed:
            raise ValueError(
                f"reader state for {state['rows']} rows / seed {state['seed']} does not match "
                f"{len(self)} rows / seed {self.seed}: the packed data changed since the checkpoint"
            )
        self.epoch, self.position, self._order = state["epoch"], state["position"], None

    def _row(self, i: int) -> dict:
        fi, g, r = self._index[i]
        if (fi, g) not in self._cache:
            if len(self._cache) >= self.cache_groups:
                self._cache.pop(next(iter(self._cache)))
            self._cache[fi, g] = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=SCHEMA.names).to_pylist()
        return self._cache[fi, g][r]

    def next_rows(self, n: int) -> list[dict]:
        """The next n rows (fewer at the end of an epoch: a step never spans two epochs); each row gets its `epoch`."""
        out = []
        while len(out) < n:
            if self.position >= len(self):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = self.order(self.epoch)
            row = dict(self._row(int(self._order[self.position])), epoch=self.epoch)
            self.position += 1
            out.append(row)
            if self.position >= len(self):
                break
        return out

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_rows(1)[0]


def collate(rows: list[dict], image_processor: Callable | ImageInputs | None, pad_id: int = 0) -> dict:
    """LlavaLite.forward inputs for rows, padded to the longest row: input_ids, labels, position_ids [B, T],
    seq_lens, pixel_values [n_views, C, H, W] or None, image_sizes (AnyRes) or None; plus token counts (tokens =
    B x T, useful = non-pad). `image_processor`: the model's ImageInputs (LlavaLite.image_inputs), or a tower
    processor for one fixed-resolution view per image."""
    T = max(sum(r["lengths"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
    seq_lens = [list(r["lengths"]) for r in rows]
    images = [b for r in rows for b in r["images"]]
    pixel_values = image_sizes = None
    if images:
        if image_processor is None:
            raise ValueError("rows hold images but no image processor was given")
        if not isinstance(image_processor, ImageInputs):
            image_processor = ImageInputs(image_processor)
        pixel_values, image_sizes = image_processor(images)
    useful = sum(sum(r["lengths"]) for r in rows)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions_from_lens(seq_lens, T),
        "seq_lens": seq_lens,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "tokens": B * T,
        "useful_tokens": useful,
        "samples": sum(len(r["lengths"]) for r in rows),
    }
