"""AnyRes (LLaVA-NeXT): a downscaled base view plus tiles of the tower's size on the grid that fits the image best.

An image of (H, W) gets the grid pinpoint (h, w) of most effective resolution, then least waste
(`select_best_resolution`); it is resized into it keeping its aspect, padded, and cut into (h/t) x (w/t) tiles of the
tower's size t. The tiles' features are laid out as one feature map, the padding is cut off again (`unpad_image`),
and a learned image-newline embedding ends each row of it; the base view's features come first:

    tokens(H, W) = side^2 + h' * (w' + 1)      side = features per tile side; (h', w') the unpadded map

With `max_tiles` (LLaVA-OneVision's anyres_max_N) a map of more than N tiles' worth of features (by over 1.1x in
area) is bilinearly pooled down to about N tiles' worth. The pixel side is transformers' LlavaNextImageProcessor
itself and the layout its modelling functions, so an exported checkpoint sees what training saw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import LlavaNextImageProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

# LLaVA-NeXT's grids, in tiles (rows, cols): 1x2, 2x1, 2x2, 3x1, 1x3 (672x672, 336x1344 ... at 336 px)
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


class AnyRes(BaseModel):
    """AnyRes settings of a training config: the grid pinpoints (height, width in pixels, multiples of the tower's
    size; default LLaVA-NeXT's grids at the tower's size) and OneVision's token budget in tiles (None: no pooling)."""

    model_config = ConfigDict(extra="forbid")

    grid_pinpoints: list[tuple[int, int]] | None = None
    max_tiles: int | None = Field(None, ge=1)

    def pinpoints(self, tile: int) -> list[list[int]]:
        """The pinpoints in pixels for a tower of `tile` px; a clear error for one that is not a whole grid."""
        points = self.grid_pinpoints or [(r * tile, c * tile) for r, c in NEXT_GRIDS]
        bad = [p for p in points if p[0] % tile or p[1] % tile or min(p) <= 0]
        if bad:
            raise ValueError(f"anyres grid_pinpoints {bad} are not positive multiples of the tower's {tile} px")
        return [list(p) for p in points]


def grid_shape(size: Sequence[int], pinpoints: list[list[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of size (H, W)."""
    h, w = select_best_resolution(tuple(int(s) for s in size), pinpoints)
    return h // tile, w // tile


def feature_map_shape(size: Sequence[int], rows: int, cols: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """(h', w') of the tiles' feature map after unpadding (and pooling): shapes only, by transformers' unpad_image."""
    h, w = unpad_image(torch.empty(1, rows * side, cols * side, device="meta"), [int(s) for s in size]).shape[1:]
    if max_tiles is not None:
        ratio = math.sqrt(h * w / (max_tiles * side**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return h, w


def image_tokens(size: Sequence[int], pinpoints: list[list[int]], tile: int, side: int, max_tiles: int | None) -> int:
    """Features of one image of size (H, W): the base view, then each row of the tiles' map plus its newline."""
    rows, cols = grid_shape(size, pinpoints, tile)
    h, w = feature_map_shape(size, rows, cols, side, max_tiles)
    return side * side + h * (w + 1)


def pack_features(
    feats: torch.Tensor,
    size: Sequence[int],
    pinpoints: list[list[int]],
    tile: int,
    newline: torch.Tensor,
    max_tiles: int | None,
) -> torch.Tensor:
    """One image's tile features [1 + rows*cols, side^2, D] (base view first) -> its tokens [N, D] in LLaVA-NeXT's
    order (as LlavaNextModel.pack_image_features; with max_tiles as LlavaOnevisionModel's)."""
    side = math.isqrt(feats.shape[1])
    rows, cols = grid_shape(size, pinpoints, tile)
    if feats.shape[0] != 1 + rows * cols:
        raise ValueError(f"image of size {tuple(size)}: {feats.shape[0]} views, its grid needs 1 + {rows}x{cols}")
    base, tiles = feats[0], feats[1:]  # [side^2, D], [rows*cols, side^2, D]
    fmap = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, H', W']
    fmap = unpad_image(fmap, [int(s) for s in size])  # [D, h', w']
    h, w = feature_map_shape(size, rows, cols, side, max_tiles)
    if (h, w) != tuple(fmap.shape[1:]):
        fmap = F.interpolate(fmap[None], [h, w], mode="bilinear")[0]  # OneVision's anyres_max pooling
    fmap = torch.cat((fmap, newline[:, None, None].expand(-1, h, 1).to(fmap)), dim=-1)  # [D, h, w + 1]
    return torch.cat((base, fmap.flatten(1, 2).transpose(0, 1)), dim=0)  # [side^2 + h*(w+1), D]


def next_processor(processor, pinpoints: list[list[int]]) -> LlavaNextImageProcessor:
    """transformers' LlavaNextImageProcessor with the tower processor's size, crop, mean and std."""
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    return LlavaNextImageProcessor(
        size=dict(size),
        crop_size=dict(crop) or None,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
        image_grid_pinpoints=pinpoints,
        do_center_crop=bool(getattr(processor, "do_center_crop", True)),
    )


def image_views(processor: LlavaNextImageProcessor, image: Image.Image | bytes) -> tuple[torch.Tensor, list[int]]:
    """The views [1 + rows*cols, C, t, t] of one image and its (H, W)."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    out = processor(image.convert("RGB"), return_tensors="pt")
    return out["pixel_values"][0], [int(s) for s in out["image_sizes"][0]]


class ImageInputs:
    """A model's pixel inputs for a list of images (bytes or PIL): (pixel_values [n_views, C, t, t], image_sizes).

    Fixed resolution: one view each, padded to a square in the mean colour first (LLaVA-1.5's `pad`; `pad=False`:
    the processor's resize and centre crop), no sizes; AnyRes: LlavaNextImageProcessor's views and each (H, W)."""

    def __init__(self, processor, pinpoints: list[list[int]] | None = None, pad: bool = True):
        self.processor, self.pinpoints, self.pad = processor, pinpoints, pad
        self.next = next_processor(processor, pinpoints) if pinpoints else None

    def __call__(self, images: Sequence) -> tuple[torch.Tensor | None, list[list[int]] | None]:
        from trainer.data import pixels

        if not images:
            return None, None
        pil = [Image.open(io.BytesIO(b)) if isinstance(b, bytes) else b for b in images]
        if self.next is None:
            return torch.stack([pixels(self.processor, im.convert("RGB"), self.pad) for im in pil]), None
        views = [image_views(self.next, im) for im in pil]
        return torch.cat([v for v, _ in views]), [s for _, s in views]
