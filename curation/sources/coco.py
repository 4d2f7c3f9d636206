"""COCO's JSON read directly (pycocotools is not needed): images, captions per image (captions_*.json) and boxes
(instances_*.json) as this project's annotations table (url, width, height, objects [{category, color, box}] with
boxes in pixels, as the synthesis stages read it). An image's url is its coco_url, else its file_name: read_coco and
the annotations table agree on it, so boxes find their images."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

OBJECT = pa.struct([("category", pa.string()), ("color", pa.string()), ("box", pa.list_(pa.float32()))])
ANNOTATIONS_SCHEMA = pa.schema(
    [("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("objects", pa.list_(OBJECT))]
)


def load(path: str | Path) -> dict:
    """A COCO JSON file's top level, checked for the keys every COCO file has."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO file (no 'images' list)")
    if bad := [i for i, im in enumerate(data["images"]) if not isinstance(im, dict) or "id" not in im][:3]:
        raise ValueError(f"{path}: not a COCO file (images {bad} have no 'id')")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: not a COCO file ('annotations' is not a list)")
    return data


def image_url(image: dict) -> str:
    """The url an image's rows and boxes are keyed by: coco_url, else file_name."""
    return image.get("coco_url") or image.get("file_name") or f"coco:{image.get('id')}"


def by_image(annotations: list[dict], ids: set) -> tuple[dict, list[dict]]:
    """Annotations grouped by image id, in annotation id order; and those whose image is not in `ids`."""
    grouped: dict = {}
    orphans = []
    for a in sorted(annotations, key=lambda a: (a.get("id") is None, a.get("id") or 0)):
        if a.get("image_id") in ids:
            grouped.setdefault(a["image_id"], []).append(a)
        else:
            orphans.append(a)
    return grouped, orphans


def boxes(annotations: list[dict], categories: dict) -> list[dict]:
    """COCO's [x, y, width, height] boxes as objects with [x1, y1, x2, y2] in pixels."""
    out = []
    for a in annotations:
        x, y, w, h = (a.get("bbox") or [0, 0, 0, 0])[:4]
        name = categories.get(a.get("category_id"))
        if name and w > 0 and h > 0:
            out.append({"category": name, "color": None, "box": [x, y, x + w, y + h]})
    return out


def annotations_table(path: str | Path) -> pa.Table:
    """An instances_*.json as the annotations table the synthesis stages read (cached per process and file)."""
    st = os.stat(path)
    return _annotations_table(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _annotations_table(path: str, size: int, mtime: int) -> pa.Table:
    data = load(path)
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    images = data["images"]
    grouped, _ = by_image(data.get("annotations", []), {im["id"] for im in images})
    rows = [
        {
            "url": image_url(im),
            "width": im.get("width"),
            "height": im.get("height"),
            "objects": boxes(grouped.get(im["id"], []), categories),
        }
        for im in images
    ]
    return pa.Table.from_pylist(rows, ANNOTATIONS_SCHEMA)
