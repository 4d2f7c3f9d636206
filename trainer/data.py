"""Streaming loader over Instruction Parquet shards: seeded shuffle buffer, encoded samples, exact resume."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from schemas import Row, RowContractError, TrainSample, arrow_schema
from schemas.rundir import available, join_columns, read_file
from trainer.template import EncodeError, Template, encode

COLUMNS = arrow_schema(TrainSample).names  # what the trainer reads of a sample, from the contract


def check_columns(path: Path, model: type[Row], have: set[str] | None = None) -> None:
    """Raise RowContractError naming the file and the model's columns it lacks (pyarrow skips missing ones silently);
    `have`: the columns the file holds or is given (default: its own)."""
    have = set(pq.read_schema(path).names) if have is None else have
    missing = [c for c in arrow_schema(model).names if c not in have]
    if missing:
        raise RowContractError(f"{path}: missing columns {missing} of {model.__name__}, which the trainer reads")


def joined_columns(path: Path) -> list[str]:
    """The TrainSample columns a shard lacks that a run dir's stages before it wrote, read by uid (an instruct
    stage's part: the image, stored once by the source stage); RowContractError naming the file and the columns
    neither gives. A shard holding its own images (users' data, LLaVA-style) needs no uid."""
    have = set(pq.read_schema(path).names)
    have |= {"uid"} if "image" in have else set()
    lacking = [c for c in COLUMNS if c not in have]
    found = [c for c in available(path, lacking) if c not in have] if lacking and "uid" in have else []
    check_columns(path, TrainSample, have | set(found))
    return found


def shard_files(src: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shard list: the given files in order, or a directory's part-*.parquet sorted by name; each checked to
    hold TrainSample's columns, or (a run dir's stage part) to find them in the stages before it."""
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        files = sorted(Path(src).glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"no part-*.parquet in {src}: point the loader at an instruct stage's directory")
    else:
        files = [Path(p) for p in ([src] if isinstance(src, (str, Path)) else src)]
    for f in files:
        joined_columns(f)
    return files


class Shard:
    """One shard file's TrainSample rows by row group: its own columns, plus the joined ones (joined_columns), read
    by uid through schemas.rundir for the whole part when its first rows are read, so one part is held at a time."""

    def __init__(self, path: Path):
        self.path, self.joined, self.pf = path, joined_columns(path), pq.ParquetFile(path)
        self.own = [c for c in COLUMNS if c in self.pf.schema_arrow.names]
        md = self.pf.metadata
        self.ends = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])  # row after each group
        self._extra: pa.Table | None = None

    def _join(self, rows: pa.Table) -> pa.Table:
        if self.joined and self._extra is None:
            self._extra = read_file(self.path, ["uid", *self.joined])
        return join_columns(rows, self._extra, self.joined) if self.joined else rows

    def _group(self, row: int) -> tuple[int, int]:
        """The row group holding `row` and that group's first row."""
        g = int(np.searchsorted(self.ends, row, side="right"))
        return g, int(self.ends[g - 1]) if g else 0

    def batches(self, batch_rows: int, from_row: int = 0) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, rows) batch by batch, from the row group holding `from_row` on."""
        first, row = self._group(from_row)
        if first < len(self.ends):
            for batch in self.pf.iter_batches(
                batch_size=batch_rows, row_groups=range(first, len(self.ends)), columns=self.own
            ):
                for rows in self._join(pa.Table.from_batches([batch])).combine_chunks().to_batches():
                    yield row, rows  # a RecordBatch: its columns are Arrays, the joined images not copied again
                    row += rows.num_rows

    def rows(self, rows: list[int]) -> list[dict]:
        """Given rows as records, reading only the row groups that hold them."""
        out = {}
        for g, start in sorted({self._group(r) for r in rows}):
            recs = self._join(self.pf.read_row_group(g, columns=self.own)).to_pylist()
            out.update({r: recs[r - start] for r in rows if start <= r < start + len(recs)})
        return [out[r] for r in rows]


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

    def __init__(
        self,
        shards,
        tokenizer,
        image_processor: Callable,
        template: Template,
        image_tokens: int,
        system: str | None = None,
        max_len: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 0,
        batch_rows: int = 256,
    ):
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
        return {
            "shard": self.shard,
            "offset": self.offset,
            "buffer": [[s, r] for s, r, _ in self.buffer],
            "rng": self.rng.bit_generator.state,
            "rejects": dict(self.rejects),
            "files": [str(f) for f in self.files],
        }

    def load_state(self, state: dict) -> None:
        """Resume at a state() taken from a loader over the same shards; buffered rows are re-read from their shards."""
        if state["files"] != [str(f) for f in self.files]:
            raise ValueError(
                "state was saved over a different shard list; resume with the same shards in the same order"
            )
        self.shard, self.offset = state["shard"], state["offset"]
        self.rng.bit_generator.state = state["rng"]
        self.rejects = Counter(state["rejects"])
        wanted: dict[int, list[int]] = {}
        for s, r in state["buffer"]:
            wanted.setdefault(s, []).append(r)
        rows = {(s, r): rec for s, rs in wanted.items() for r, rec in zip(rs, Shard(self.files[s]).rows(rs))}
        self.buffer = [(s, r, rows[s, r]) for s, r in state["buffer"]]

    def _rows(self) -> Iterator[tuple[int, int, dict]]:
        """Rows from the cursor on, batch by batch, one shard open at a time; the cursor advances per row."""
        while self.shard < len(self.files):
            for row, batch in Shard(self.files[self.shard]).batches(self.batch_rows, self.offset):
                for rec in batch.to_pylist():
                    if row >= self.offset:
                        shard, self.offset = self.shard, row + 1
                        yield shard, row, rec
                    row += 1
            self.shard, self.offset = self.shard + 1, 0

    def _sample(self, rec: dict) -> dict | None:
        """One encoded sample, or None (counted in rejects by reason) when it cannot be trained on."""
        try:
            enc = encode(
                rec["conversations"], self.tokenizer, self.template, self.image_tokens, self.system, self.max_len
            )
        except EncodeError as e:
            self.rejects[e.reason] += 1
            return None
        if enc.n_images != 1:
            self.rejects["image_count"] += 1
            return None
        try:
            image = Image.open(io.BytesIO(rec["image"])).convert("RGB")
        except Exception:
            self.rejects["bad_image"] += 1
            return None
        return {
            "id": rec["id"],
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixels(self.processor, image),
            "n_images": enc.n_images,
        }

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
