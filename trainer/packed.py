"""Offline packing for training: encode every sample once, pack, write packed shards, read them back resumably.

Packed shard layout (`DIR/packed-NNNNN.parquet`, one row per training sequence, rows in packing order):

    seq_id      string            seq-00000001 ...
    sample_ids  list<string>      the samples in the sequence, in order
    lengths     list<int32>       their token lengths (the per-sample boundaries; cu_seqlens = cumsum)
    input_ids   list<int32>       concatenated token ids (each <image> already expanded to image_tokens copies)
    labels      list<int32>       concatenated labels, -100 where no loss
    images      list<binary>      the encoded images of the sequence's samples, in reading order

plus `DIR/_report.json` (counts, fill ratio, compression, rejects by reason, the key it was built for).
With packing off each row holds one sample (the padded baseline). Rows hold no padding: collate pads.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from trainer.data import COLUMNS, pixels, shard_files
from trainer.model import IGNORE_INDEX, positions_from_lens
from trainer.pack import pack
from trainer.template import EncodeError, encode

ROWS_PER_FILE = 4096
ROW_GROUP = 64
SCHEMA = pa.schema([
    ("seq_id", pa.string()), ("sample_ids", pa.list_(pa.string())), ("lengths", pa.list_(pa.int32())),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("images", pa.list_(pa.binary())),
])


def resolve_shards(shards) -> list[Path]:
    """Instruction shard files from files and/or directories (each directory's part-*.parquet, sorted), in order."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    return [f for item in items for f in shard_files(item)]


def _key_hash(key: dict, files: list[Path]) -> str:
    """Hash of the build key plus each shard's path, size and mtime."""
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps([key, stats], sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_all(files: list[Path], tokenizer, template: str, image_tokens: int, max_len: int,
               system: str | None = None) -> tuple[list[dict], Counter]:
    """Every trainable sample {id, input_ids, labels, images} of the shards in order, and rejects by reason."""
    samples, rejects = [], Counter()
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=COLUMNS):
            for rec in batch.to_pylist():
                try:
                    enc = encode(rec["conversations"], tokenizer, template, image_tokens, system, max_len)
                except EncodeError as e:  # no_labels, too_long, template_mismatch, bad_turns
                    rejects[e.reason] += 1
                    continue
                if enc.n_images > 1:  # an Instruction row carries one image
                    rejects["image_count"] += 1
                    continue
                images = []
                if enc.n_images:
                    try:
                        Image.open(io.BytesIO(rec["image"])).size  # header check; decoded at collate time
                    except Exception:  # noqa: BLE001 - an unreadable image is a reject, not a crash
                        rejects["bad_image"] += 1
                        continue
                    images = [rec["image"]]
                samples.append({"id": rec["id"], "input_ids": enc.input_ids, "labels": enc.labels, "images": images})
    return samples, rejects


def build_packed(shards, out_dir: str | Path, tokenizer, template: str, image_tokens: int, max_len: int,
                 packing: bool = True, system: str | None = None, key: dict | None = None,
                 method: str = "gap_aware") -> dict:
    """Write packed shards to `out_dir` (reused when built for the same key and shard files); return the report."""
    out_dir, files = Path(out_dir), resolve_shards(shards)
    digest = _key_hash({**(key or {}), "template": template, "image_tokens": image_tokens, "max_len": max_len,
                        "packing": packing, "system": system, "method": method}, files)
    report_path = out_dir / "_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("key") == digest:
            return report
    samples, rejects = encode_all(files, tokenizer, template, image_tokens, max_len, system)
    ids = [s["id"] for s in samples]
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    if packing:
        res = pack(ids, lengths, max_len, method)
        rejects.update(Counter(f"pack_{r}" for _, r, _ in res.rejects))  # pack_too_long: cannot happen after encode
        by_id = {s["id"]: s for s in samples}
        seqs = [[by_id[i] for i in sids] for sids, _ in res.sequences]
    else:
        seqs = [[s] for s in samples]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part, start in enumerate(range(0, max(len(seqs), 1), ROWS_PER_FILE)):
        chunk = seqs[start:start + ROWS_PER_FILE]
        cols = {
            "seq_id": [f"seq-{start + i + 1:08d}" for i in range(len(chunk))],
            "sample_ids": [[s["id"] for s in q] for q in chunk],
            "lengths": [[len(s["input_ids"]) for s in q] for q in chunk],
            "input_ids": [[t for s in q for t in s["input_ids"]] for q in chunk],
            "labels": [[t for s in q for t in s["labels"]] for q in chunk],
            "images": [[b for s in q for b in s["images"]] for q in chunk],
        }
        pq.write_table(pa.table(cols, schema=SCHEMA), tmp / f"packed-{part:05d}.parquet", row_group_size=ROW_GROUP)
    tokens = int(lengths.sum())
    n_rows = len(seqs)
    longest = [max((len(s["input_ids"]) for s in q), default=0) for q in seqs]
    report = {
        "key": digest, "packing": packing, "max_len": max_len, "template": template, "image_tokens": image_tokens,
        "samples_in": len(samples) + sum(rejects.values()), "samples": len(samples), "rows": n_rows,
        "tokens": tokens, "rejects": dict(sorted(rejects.items())),
        "fill_ratio": tokens / (n_rows * max_len) if n_rows else 0.0,  # of max_len-long rows
        "compression": len(samples) / n_rows if n_rows else 0.0,  # samples per row
        "longest_row": max(longest, default=0),
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
            raise ValueError(f"reader state for {state['rows']} rows / seed {state['seed']} does not match "
                             f"{len(self)} rows / seed {self.seed}: the packed data changed since the checkpoint")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None

    def _row(self, i: int) -> dict:
        fi, g, r = self._index[i]
        if (fi, g) not in self._cache:
            if len(self._cache) >= self.cache_groups:
                self._cache.pop(next(iter(self._cache)))
            self._cache[fi, g] = pq.ParquetFile(self.files[fi]).read_row_group(g).to_pylist()
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


def collate(rows: list[dict], image_processor: Callable | None, pad_id: int = 0) -> dict:
    """LlavaLite.forward inputs for rows, padded to the longest row: input_ids, labels, position_ids [B, T],
    seq_lens, pixel_values [n_images, C, H, W] or None; plus token counts (tokens = B x T, useful = non-pad)."""
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
    pixel_values = None
    if images:
        if image_processor is None:
            raise ValueError("rows hold images but no image processor was given")
        pixel_values = torch.stack([pixels(image_processor, Image.open(io.BytesIO(b)).convert("RGB"))
                                    for b in images])  # [n_images, C, H, W]
    useful = sum(sum(r["lengths"]) for r in rows)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions_from_lens(seq_lens, T),
            "seq_lens": seq_lens, "pixel_values": pixel_values, "tokens": B * T, "useful_tokens": useful,
            "samples": sum(len(r["lengths"]) for r in rows)}
