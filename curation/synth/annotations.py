"""Boxes per image (LLaVA used COCO's): a Parquet of url and objects [{category, color, box}], normalised to 0-1, or
a COCO instances_*.json read as that table (curation.sources.coco)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.sources import coco


@dataclass
class Annotations:
    """Normalised boxes per url, and the categories and colours seen (what rules may ask about)."""

    objects: dict[str, list[dict]]
    vocab: dict[str, list[str]]

    @classmethod
    def load(cls, path: str | None, urls: pa.Array | pa.ChunkedArray | None = None) -> Annotations:
        """The boxes of `urls` (all when None); the vocabulary always from the whole file, so that what the rules
        ask does not depend on how the images were split into parts. Columnar: a part converts its own rows only
        (loading every row for every part made synthesis stages grow as N^2)."""
        if path is None:
            return cls({}, {})
        t = coco.annotations_table(path) if str(path).lower().endswith(".json") else pq.read_table(path)
        if not {"url", "objects"} <= set(t.column_names):
            raise ValueError(f"{path}: annotations need columns url and objects [{{category, color, box}}]")
        flat = pc.list_flatten(t.column("objects"))
        fields = {f.name for f in flat.type} if pa.types.is_struct(flat.type) else set()
        vocab = {k: _distinct(flat, k) if k in fields else [] for k in ("category", "color")}
        if urls is not None:
            t = t.filter(pc.is_in(t.column("url"), value_set=pc.unique(urls)))
        sized = {"width", "height"} <= set(t.column_names)
        objects = {}
        for row in t.to_pylist():
            w, h = (row["width"], row["height"]) if sized else (1, 1)
            objects[row["url"]] = [
                {
                    "category": o["category"],
                    "color": o.get("color"),
                    "box": [o["box"][0] / w, o["box"][1] / h, o["box"][2] / w, o["box"][3] / h],
                }
                for o in row["objects"] or []
            ]
        return cls(objects, vocab)

    def boxes(self, url: str) -> list[tuple[str, list[float]]]:
        return [(o["category"], o["box"]) for o in self.objects.get(url, [])]


def _distinct(objects: pa.Array, field: str) -> list[str]:
    """Sorted distinct non-empty values of one field of the flattened objects."""
    values = pc.unique(pc.struct_field(objects, field)).drop_null().to_pylist()
    return sorted(v for v in values if v)
