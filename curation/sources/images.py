"""Image bytes read from a local source checked and measured once: refused before decoding when empty, not an
image or too big (the download's sniff), decoded to prove they are whole, optionally resized as ingest resizes."""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field

from curation.download.reasons import decode_reason, sniff


class ImageOptions(BaseModel):
    """How a source checks and stores its images (fields shared by every read_* op's params)."""

    image_size: int | None = Field(
        None, ge=8, description="resize as ingest does (img2dataset's resizer); null keeps the bytes as they are"
    )
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_quality: int = Field(95, ge=1, le=100)
    max_pixels: int = Field(89_478_485, ge=1, description="refuse images whose header claims more pixels")
    verify: Literal["decode", "header"] = Field(
        "decode",
        description="decode: every image is decoded once (a JPEG at 1/8 scale), so a corrupt one is a reject here, "
        "not a failure in a later stage; header: only its header is read (for archives decoded when they were "
        "written, e.g. by img2dataset)",
    )


class ImageReader:
    """bytes -> the Image row's image fields, or (reason, detail)."""

    def __init__(self, options: ImageOptions):
        self.options = options
        self.resizer = None
        if options.image_size is not None:
            from curation.download.shard import make_resizer  # cv2: imported by the workers that resize

            self.resizer = make_resizer(options)

    def __call__(self, data: bytes, sha256: str | None = None) -> dict | tuple[str, str]:
        """`sha256`: the hash the source already has (img2dataset's, of the bytes as downloaded)."""
        if self.resizer is not None:
            if refused := sniff(data, self.options.max_pixels):
                return refused
            image, w, h, ow, oh, err = self.resizer(io.BytesIO(data))
            if err:
                reason, _, detail = err.partition(": ")
                return (reason, detail) if " " not in reason and reason else ("decode_error", err)
            sizes = {"width": w, "height": h, "original_width": ow, "original_height": oh}
        else:
            try:
                w, h = _checked_size(data, self.options.max_pixels, self.options.verify == "decode")
            except Exception:  # the reason, from the download's checks (read again: failures only)
                return sniff(data, self.options.max_pixels) or decode_reason(data)
            image, sizes = data, {"width": w, "height": h, "original_width": w, "original_height": h}
        return {"image": image, "sha256": sha256 or hashlib.sha256(data).hexdigest(), **sizes}


def _checked_size(data: bytes, max_pixels: int, decode: bool) -> tuple[int, int]:
    """The image's size from one open: its header, and, with `decode`, the whole image decoded (a JPEG at 1/8
    scale: every byte of its entropy-coded data is still read, so a truncated or corrupt one fails, at a fraction
    of a full decode's cost). Raises on anything the download's sniff would refuse too."""
    if not data:
        raise ValueError("empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if size[0] * size[1] > max_pixels:
                raise ValueError("too many pixels")
            if decode:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
    return size
