"""The per-image signals that hash-based decisions share (dedup, decontaminate): the 64-bit pHash, an 8x8 RGB
thumbnail that verifies a pHash match, and the plainness test that keeps too-plain images out of hash decisions."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image as PILImage

from curation.dedup.neardup import phash_u64

THUMB = 8  # side of the colour thumbnail that verifies pHash matches: 192 bytes per image
THUMB_BYTES = THUMB * THUMB * 3
GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L"


def image_signals(data: bytes) -> tuple[int, bytes]:
    """(pHash as an unsigned 64-bit int, 8x8 RGB thumbnail bytes) of one encoded image."""
    with PILImage.open(io.BytesIO(data)) as im:
        return phash_u64(im), im.convert("RGB").resize((THUMB, THUMB), PILImage.BOX).tobytes()


def thumb_matrix(thumbs: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary(192) Arrow array of thumbnails -> uint8 [N, 192] (a view where the array allows)."""
    arr = thumbs.combine_chunks() if isinstance(thumbs, pa.ChunkedArray) else thumbs
    flat = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * THUMB_BYTES : (arr.offset + len(arr)) * THUMB_BYTES]
    return flat.reshape(len(arr), THUMB_BYTES)


def is_plain(rgb: np.ndarray, min_detail: float) -> np.ndarray:
    """uint8 [N, 192] thumbnails -> bool [N]: grey thumbnail's standard deviation under min_detail (0-255)."""
    grey = rgb.reshape(len(rgb), -1, 3) @ GREY  # [N, 64]
    return grey.std(axis=1) < min_detail


def thumb_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest cell/channel difference of thumbnails a [N, 192] and b [N, 192] (or [192]) -> int16 [N]."""
    return np.abs(a.astype(np.int16) - b).max(axis=1)
