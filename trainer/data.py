"""Streaming loader over Instruction Parquet shards: seeded shuffle buffer, encoded samples, exact resume."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from trainer.template import EncodeError, Template, encode

COLUMNS = ["id", "conversations", "image"]


def shard_files(src: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shard list: the given files in order, or a directory's part-*.parquet sorted by name."""
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        files = sorted(Path(src).glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"no part-*.parquet in {src}: point the loader at an instruct stage's directory")
        return files
    return [Path(p) for p in ([src] if isinstance(src, (str, Path)) else src)]


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: centre the image on a square of its longer side, filled with `fill`."""
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, fill)
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def pixels(processor: Callable, image: Image.Image, pad: bool = True) -> torch.Tensor:
    """Pixel tensor [C, H, W] from an image processor callable (a torchvision transform or an HF image processor).

    pad: first pad to a square in the processor's mean colour (LLaVA-1.5's `image_aspect_ratio: pad`), so a
    centre-cropping processor keeps the whole image: an object near the long side's edge is still there to count."""
    if pad:
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        image = pad_to_square(image, tuple(int(255 * m) for m in mean[:3]))
    out = processor(image)
    if hasattr(out, "keys") and "pixel_values" in out:
        out = out["pixel_values"]
    out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out)
    return out[0] if out.ndim == 4 else out  # [C, H, W]


class InstructionLoader:
    """Iterates encoded samples {id, input_ids, labels, pixel_values, n_images} from Instruction shards, resumable."""

    def __init__(self, shards, tokenizer, image_processor: Callable, template: Template, image_tokens: int,
                 system: str | None = None, max_len: int | None = None, seed: int = 0, shuffle_buffer: int = 0,
                 batch_rows: int = 256):
        self.files = shard_files(shards)
        self.tokenizer, self.processor, self.template = tokenizer, image_processor, template
        self.image_tokens, self.system, self.max_len = image_tokens, system, max_len
        self.buffer_size, self.batch_rows = shuffle_buffer, batch_rows
        self.rng = np.random.default_rng(seed)
        self.shard, self.offset = 0, 0  # the next row not yet read into the buffer
        self.buffer: list[tuple[int, int, dict]] = []  # (shard, row, record)
        self.rejects: Counter = Counter()

    def state(self) -> dict:
        """JSON-able position after the last yielded sample: shard, row offset, buffered rows, rng state, rejects."""
        return {"shard": self.shard, "offset": self.offset, "buffer": [[s, r] for s, r, _ in self.buffer],
                "rng": self.rng.bit_generator.state, "rejects": dict(self.rejects),
                "files": [str(f) for f in self.files]}

    def load_state(self, state: dict) -> None:
        """Resume at a state() taken from a loader over the same shards; buffered rows are re-read from their shards."""
        if state["files"] != [str(f) for f in self.files]:
            raise ValueError("state was saved over a different shard list; resume with the same shards in the same order")
        self.shard, self.offset = state["shard"], state["offset"]
        self.rng.bit_generator.state = state["rng"]
        self.rejects = Counter(state["rejects"])
        wanted: dict[int, list[int]] = {}
        for s, r in state["buffer"]:
            wanted.setdefault(s, []).append(r)
        rows = {(s, r): rec for s, rs in wanted.items() for r, rec in zip(rs, self._read_rows(s, rs))}
        self.buffer = [(s, r, rows[s, r]) for s, r in state["buffer"]]

    def _read_rows(self, shard: int, rows: list[int]) -> list[dict]:
        """Given rows of one shard, reading only the row groups that hold them."""
        pf, out = pq.ParquetFile(self.files[shard]), {}
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        for g in sorted({int(np.searchsorted(ends, r, side="right")) for r in rows}):
            start, recs = int(ends[g - 1]) if g else 0, pf.read_row_group(g, columns=COLUMNS).to_pylist()
            out.update({r: recs[r - start] for r in rows if start <= r < start + len(recs)})
        return [out[r] for r in rows]

    def _rows(self) -> Iterator[tuple[int, int, dict]]:
        """Rows from the cursor on, batch by batch, one shard open at a time; the cursor advances per row."""
        while self.shard < len(self.files):
            pf = pq.ParquetFile(self.files[self.shard])
            ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
            first = int(np.searchsorted(ends, self.offset, side="right"))  # the row group holding the cursor
            groups, row = list(range(first, len(ends))), int(ends[first - 1]) if first else 0
            if groups:
                for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=COLUMNS):
                    for rec in batch.to_pylist():
                        if row >= self.offset:
                            shard, self.offset = self.shard, row + 1
                            yield shard, row, rec
                        row += 1
            self.shard, self.offset = self.shard + 1, 0

    def _sample(self, rec: dict) -> dict | None:
        """One encoded sample, or None (counted in rejects by reason) when it cannot be trained on."""
        try:
            enc = encode(rec["conversations"], self.tokenizer, self.template, self.image_tokens, self.system, self.max_len)
        except EncodeError as e:
            self.rejects[e.reason] += 1
            return None
        if enc.n_images != 1:
            self.rejects["image_count"] += 1
            return None
        try:
            image = Image.open(io.BytesIO(rec["image"])).convert("RGB")
        except Exception:  # noqa: BLE001 - any undecodable image is one reject, not a crash
            self.rejects["bad_image"] += 1
            return None
        return {"id": rec["id"], "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                "pixel_values": pixels(self.processor, image), "n_images": enc.n_images}

    def _pop(self) -> tuple[int, int, dict]:
        """A uniformly drawn buffered row (the oldest when there is no shuffle buffer)."""
        if self.buffer_size <= 1:
            return self.buffer.pop(0)
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def __iter__(self) -> Iterator[dict]:
        for item in self._rows():
            self.buffer.append(item)
            while len(self.buffer) >= max(self.buffer_size, 1):
                sample = self._sample(self._pop()[2])
                if sample is not None:
                    yield sample
        while self.buffer:
            sample = self._sample(self._pop()[2])
            if sample is not None:
                yield sample
