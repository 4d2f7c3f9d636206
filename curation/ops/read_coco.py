"""read_coco: a COCO-format set (an images folder, captions_*.json, instances_*.json) as Image rows with all their
captions, no download: what LLaVA's instruction recipe starts from. The boxes reach the synthesis stages through
their `annotations` param, given the same instances_*.json (curation.sources.coco keys both by url)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from pydantic import Field, model_validator

from curation.ops.local_source import LocalSource, LocalSourceParams, Sample
from curation.sources import coco
from schemas import CocoImage


class ReadCocoParams(LocalSourceParams):
    images: str = Field(description="the folder of the images (their file_name is relative to it)")
    captions: list[str] = Field([], description="captions_*.json files: every caption of an image is kept")
    instances: list[str] = Field(
        [], description="instances_*.json files: their images are read too, and a box of an image not there is a reject"
    )

    @model_validator(mode="after")
    def _some_json(self):
        if not self.captions and not self.instances:
            raise ValueError("give captions (captions_*.json) or instances (instances_*.json), or both")
        return self


class ReadCoco(LocalSource):
    """One row per image (caption: its first, captions: all); an image whose file is missing, and an annotation of
    an image the file does not list, are rejects (missing_file, orphan_annotation)."""

    name = "read_coco"
    version = "1"
    Params = ReadCocoParams
    output = CocoImage
    plan_schema = pa.schema(
        [
            ("file", pa.string()),
            ("url", pa.string()),
            ("coco_id", pa.int64()),
            ("captions", pa.list_(pa.string())),
            ("meta", pa.string()),
            ("error", pa.string()),
        ]
    )

    def inputs(self) -> list[Path]:
        return sorted(Path(f) for f in {*self.params.captions, *self.params.instances})

    def list_samples(self) -> Iterator[pa.Table]:
        images: dict = {}
        captions: dict = {}
        rows = []
        for path in [*self.params.captions, *self.params.instances]:
            data = coco.load(path)
            for im in data["images"]:
                images.setdefault(im["id"], im)
            grouped, orphans = coco.by_image(data.get("annotations", []), {im["id"] for im in data["images"]})
            if path in self.params.captions:
                for image_id, anns in grouped.items():
                    captions.setdefault(image_id, []).extend(a.get("caption") or "" for a in anns)
            for a in orphans:
                image_id = a.get("image_id")
                why = f"{Path(path).name}: annotation {a.get('id')} of image_id {image_id}, an image it does not list"
                rows.append({"coco_id": image_id if isinstance(image_id, int) else None, "error": why})
        for image_id in sorted(images):
            im = images[image_id]
            meta = json.dumps({k: im.get(k) for k in self.params.metadata})
            texts = [c.strip() for c in captions.get(image_id, []) if c.strip()]
            rows.append(
                {
                    "file": im.get("file_name"),
                    "url": coco.image_url(im),
                    "coco_id": image_id,
                    "captions": texts,
                    "meta": meta,
                }
            )
        yield pa.Table.from_pylist(rows, self.plan_schema)

    def read(self, plan: pa.Table) -> Iterator[Sample]:
        root = Path(self.params.images)
        for r in plan.to_pylist():
            if r["error"]:
                yield Sample(None, error=("orphan_annotation", r["error"]))
                continue
            texts = r["captions"]
            if not r["file"]:
                yield Sample(
                    r["url"], texts[0] if texts else None, error=("missing_file", "the image has no file_name")
                )
                continue
            s = Sample(r["url"], texts[0] if texts else None, str(root / r["file"]), meta=json.loads(r["meta"] or "{}"))
            s.extra = {"coco_id": r["coco_id"], "captions": texts}
            try:
                s.data = (root / r["file"]).read_bytes()
            except FileNotFoundError:
                s.error = ("missing_file", f"{r['file']}: listed in the COCO file, not in {root}")
            except OSError as e:
                s.error = ("unreadable_file", str(e)[:200])
            yield s
