"""Offline packing of samples into fixed-length training sequences: best-fit-decreasing (`bfd`) or its gap-aware
variant (`gap_aware`, the default: it fills about 2 points more of each row on LLaVA-like mixes, bench/RESULTS.md)."""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from heapq import heappop, heappush
from typing import Literal

import numpy as np
import pyarrow as pa

from schemas import PackedSequence, Reject, conform

STAGE = "pack"
METHODS = ("gap_aware", "bfd")
Method = Literal["gap_aware", "bfd"]


def sample_length(n_text_tokens: int, n_images: int, image_tokens: int) -> int:
    """Tokens of one sample: text tokens with each `<image>` token (counted once) widened to image_tokens."""
    if n_images < 0 or n_text_tokens < n_images or image_tokens < 1:
        raise ValueError(
            f"sample_length: need 0 <= n_images <= n_text_tokens and image_tokens >= 1, got "
            f"n_text_tokens={n_text_tokens}, n_images={n_images}, image_tokens={image_tokens}"
        )
    return int(n_text_tokens + n_images * (image_tokens - 1))


def sample_lengths(n_text_tokens: np.ndarray, n_images: np.ndarray, image_tokens: int | np.ndarray) -> np.ndarray:
    """Vectorised sample_length: int64 [N] from text-token and image counts [N]; `image_tokens` per image, or [N]
    per sample (AnyRes: each image's count depends on its size, LlavaLite.tokens_for)."""
    text = np.asarray(n_text_tokens, dtype=np.int64)  # [N] tokens, one per <image> token included
    imgs = np.asarray(n_images, dtype=np.int64)  # [N] images
    per = np.asarray(image_tokens, dtype=np.int64)  # [] or [N]
    if per.size == 0 or per.min() < 1:
        raise ValueError(f"sample_lengths: image_tokens must be >= 1, got {image_tokens}")
    bad = np.flatnonzero((imgs < 0) | (text < imgs))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample_lengths: row {i} has n_text_tokens={text[i]} < n_images={imgs[i]} or negative images")
    return text + imgs * (per - 1)


@dataclass
class PackResult:
    """Packed sequences (sample ids and lengths, boundaries kept) and the rejected samples."""

    max_len: int
    ids: np.ndarray  # [P] str, packed samples in sequence order
    lengths: np.ndarray  # [P] int64 tokens, aligned with ids
    offsets: np.ndarray  # [S+1] int64, sequence s holds ids[offsets[s]:offsets[s+1]]
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reason, detail)

    @cached_property
    def sequences(self) -> list[tuple[list[str], list[int]]]:
        """Each sequence as (sample ids, their token lengths), in placement order."""
        ids, lens, off = self.ids.tolist(), self.lengths.tolist(), self.offsets.tolist()
        return [(ids[a:b], lens[a:b]) for a, b in itertools.pairwise(off)]

    def totals(self) -> np.ndarray:
        """Tokens per sequence, int64 [S]."""
        cum = np.concatenate([[0], np.cumsum(self.lengths)])  # [P+1]
        return cum[self.offsets[1:]] - cum[self.offsets[:-1]]

    def cu_lengths(self, s: int) -> np.ndarray:
        """Cumulative sample boundaries of sequence s, int64 [k+1] starting at 0 (varlen attention's cu_seqlens)."""
        return np.concatenate([[0], np.cumsum(self.lengths[self.offsets[s] : self.offsets[s + 1]])])

    def report(self) -> dict:
        """Counts, fill ratio (packed tokens / (sequences * max_len)) and compression (samples per sequence)."""
        n_seq, n_packed = len(self.offsets) - 1, len(self.ids)
        tokens = int(self.lengths.sum())
        return {
            "samples": n_packed + len(self.rejects),
            "packed": n_packed,
            "sequences": n_seq,
            "rejected": len(self.rejects),
            "tokens": tokens,
            "fill_ratio": tokens / (n_seq * self.max_len) if n_seq else 0.0,
            "compression": n_packed / n_seq if n_seq else 0.0,
            "max_len": self.max_len,
        }


def _best_fit(desc: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Bin index [N] for lengths sorted descending (best fit, ties to the lowest bin), and the number of bins."""
    bin_of = np.empty(desc.size, dtype=np.int64)  # [N]
    buckets: list[list[int]] = [[] for _ in range(max_len + 1)]  # remaining capacity -> min-heap of bin ids
    caps: list[int] = []  # sorted capacities whose bucket is non-empty

    def put(cap: int, b: int) -> None:
        if cap:  # a full bin takes nothing more: lengths are >= 1
            if not buckets[cap]:
                insort(caps, cap)
            heappush(buckets[cap], b)

    starts = np.flatnonzero(np.diff(desc, prepend=-1))  # [G] first index of each run of equal lengths
    ends = np.append(starts[1:], desc.size)  # [G]
    n_bins = 0
    for length, pos, end in zip(desc[starts].tolist(), starts.tolist(), ends.tolist()):
        while pos < end:  # fill open bins, smallest fitting capacity first
            i = bisect_left(caps, length)
            if i == len(caps):
                break
            cap = caps[i]
            heap = buckets[cap]
            b = heappop(heap)
            if not heap:
                del caps[i]
            # cap - length < cap is again the smallest fitting capacity while it still fits: take m at once
            m = min(end - pos, cap // length)
            bin_of[pos : pos + m] = b
            pos += m
            put(cap - m * length, b)
        if pos < end:  # nothing open fits: new bins, each filled with as many of this length as fit
            per = max_len // length
            r = end - pos
            bin_of[pos:end] = n_bins + np.arange(r) // per
            full, rest = divmod(r, per)
            for b in range(n_bins, n_bins + full):
                put(max_len - per * length, b)
            if rest:
                put(max_len - rest * length, n_bins + full)
            n_bins += full + (rest > 0)
    return bin_of, n_bins


def _gap_aware(desc: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Bin index [N] for lengths sorted descending, and the number of bins. Fills one sequence at a time with the
    largest sample that fits (the first of equal lengths), unless that would leave a gap smaller than every
    remaining sample: then it takes the largest sample that still leaves room for the smallest one. With ~600-token
    image samples, BFD's rows often end with a room no remaining sample fits; this avoids making such rooms."""
    bin_of = np.empty(desc.size, dtype=np.int64)  # [N]
    starts = np.flatnonzero(np.diff(desc, prepend=-1))  # [G] first index of each run of equal lengths
    ends = np.append(starts[1:], desc.size)  # [G]
    sizes = desc[starts][::-1].tolist()  # ascending lengths with samples left
    nxt = dict(zip(sizes, starts[::-1].tolist()))  # length -> its next unplaced index
    stop = dict(zip(sizes, ends[::-1].tolist()))
    n_bins = 0
    while sizes:
        room = max_len
        while sizes and sizes[0] <= room:
            i = bisect_right(sizes, room) - 1
            if 0 < room - sizes[i] < sizes[0]:  # the largest fit would strand a gap nothing fills
                j = bisect_right(sizes, room - sizes[0]) - 1  # the largest that leaves room for the smallest
                i = j if j >= 0 else i
            size = sizes[i]
            k = nxt[size]
            bin_of[k], nxt[size], room = n_bins, k + 1, room - size
            if k + 1 == stop[size]:
                sizes.pop(i)
        n_bins += 1
    return bin_of, n_bins


def pack(ids: Sequence[str], lengths: np.ndarray, max_len: int, method: Method = "gap_aware") -> PackResult:
    """Pack samples into sequences of at most max_len tokens (`method`: gap_aware or bfd, both deterministic,
    largest first, ties by id); too-long and empty samples are rejected."""
    lens = np.asarray(lengths)
    if lens.ndim != 1 or lens.dtype.kind not in "iu":
        raise TypeError(f"pack: lengths must be a 1-D integer array, got dtype {lens.dtype} shape {lens.shape}")
    lens = lens.astype(np.int64, copy=False)  # [N] tokens
    idv = np.asarray(ids, dtype=str) if len(ids) else np.empty(0, dtype="<U1")  # [N]
    if idv.shape != lens.shape:
        raise ValueError(f"pack: {idv.size} ids but {lens.size} lengths")
    if max_len < 1:
        raise ValueError(f"pack: max_len must be >= 1, got {max_len}")
    if method not in METHODS:
        raise ValueError(f"pack: method must be one of {METHODS}, got {method!r}")
    if lens.size and lens.min() < 0:
        i = int(np.argmin(lens))
        raise ValueError(f"pack: sample {str(idv[i])!r} has negative length {int(lens[i])}")
    by_id = np.argsort(idv, kind="stable")  # [N]
    dup = np.flatnonzero(idv[by_id[1:]] == idv[by_id[:-1]])
    if dup.size:
        raise ValueError(f"pack: duplicate sample id {str(idv[by_id[dup[0]]])!r}; ids must be unique")
    rank = np.empty(lens.size, dtype=np.int64)
    rank[by_id] = np.arange(lens.size)  # [N] position in id order
    order = np.lexsort((rank, -lens))  # [N] length descending, ties by id

    bad = order[(lens[order] > max_len) | (lens[order] == 0)]  # in deterministic order
    rejects = [
        (i, "too_long", f"length {n} > max_len {max_len}") if n > max_len else (i, "empty", "length 0")
        for i, n in zip(idv[bad].tolist(), lens[bad].tolist())
    ]
    keep = order[(lens[order] <= max_len) & (lens[order] > 0)]  # [P]
    bin_of, n_bins = (_best_fit if method == "bfd" else _gap_aware)(lens[keep], max_len)
    by_bin = np.argsort(bin_of, kind="stable")  # [P] sequence order, placement order inside
    offsets = np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=n_bins))]).astype(np.int64)  # [S+1]
    packed = keep[by_bin]
    return PackResult(max_len, idv[packed], lens[packed], offsets, rejects)


def to_table(result: PackResult, where: str = "pack") -> pa.Table:
    """PackedSequence rows, seq_id `seq-00000001`... in packing order, checked against the row contract."""
    n_seq = len(result.offsets) - 1
    off = pa.array(result.offsets, type=pa.int32())
    table = pa.table(
        {
            "seq_id": [f"seq-{s + 1:08d}" for s in range(n_seq)],
            "sample_ids": pa.ListArray.from_arrays(off, pa.array(result.ids.tolist(), type=pa.string())),
            "lengths": pa.ListArray.from_arrays(off, pa.array(result.lengths, type=pa.int64())),
            "total_tokens": pa.array(result.totals(), type=pa.int64()),
        }
    )
    return conform(table, PackedSequence, where)


def rejects_table(result: PackResult, where: str = "pack rejects") -> pa.Table:
    """Reject rows (stage `pack`, uid = sample id) for the samples that were not packed."""
    n = len(result.rejects)
    uid, reason, detail = (list(c) for c in zip(*result.rejects)) if n else ([], [], [])
    table = pa.table(
        {
            "uid": pa.array(uid, pa.string()),
            "url": pa.nulls(n, pa.string()),
            "caption": pa.nulls(n, pa.string()),
            "stage": pa.array([STAGE] * n, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "detail": pa.array(detail, pa.string()),
        }
    )
    return conform(table, Reject, where)
