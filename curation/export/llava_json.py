"""Instruction shards out to LLaVA's JSON format: [{id, image, conversations}] plus each image once, as a file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.engine.store import atomic_write_bytes
from curation.export.mixture import Collector, keep, sources
from curation.export.samples import part_files, read_rows
from schemas import Instruction


def instruction_rows(f: Path) -> pa.Table:
    """An instruction shard's id, uid, conversations and image: the image from the file itself, the run dir's stages
    before it (schemas.rundir), or, for a `curate regenerate` part, the image shard it was made from."""
    if missing := set(Instruction.model_fields) - set(pq.read_schema(f).names):
        raise ValueError(f"{f}: not an instruction shard (no {', '.join(sorted(missing))})")
    rows = read_rows(f, ["id", "uid", "conversations", "image"])
    if "image" not in rows.column_names:
        raise ValueError(f"{f}: no image for its rows (neither in the file nor in a stage before it)")
    return rows.select(["id", "uid", "conversations", "image"])


def instruction_parts(paths: list[Path]) -> list[Path]:
    """Part files of instruction shards: a run dir (every instruct stage), stage dirs, or Parquet files."""
    return part_files(paths)


def manifest_path(out: Path) -> Path:
    """Where an export's mixture manifest goes: data.json -> data.mixture.parquet."""
    return out.with_name(out.stem + ".mixture.parquet")


def export_llava_json(paths: list[Path], out: Path, image_dir: Path | None = None, mixture: Path | None = None) -> dict:
    """Write LLaVA's JSON ([{id, image, conversations: [{from, value}]}]), each image once as images/<uid>.jpg, and
    the mixture manifest of the samples written (schemas.mixture). `mixture`: a spec or a manifest choosing them."""
    image_dir = image_dir or out.parent / "images"
    selections, summary = sources(paths, mixture, lambda p: instruction_parts([p]))
    manifest = Collector(selections, manifest_path(out), summary)
    records, images = [], 0
    for k, src in enumerate(selections):
        for f in instruction_parts([src.path]):
            for row in keep(instruction_rows(f), "id", src).to_pylist():
                manifest.add(k, row["id"], row["uid"], row["conversations"], row["image"])
                target = image_dir / f"{row['uid']}.jpg"
                if not target.exists():
                    atomic_write_bytes(target, row["image"])
                    images += 1
                records.append(
                    {
                        "id": row["id"],
                        "image": str(target.relative_to(out.parent))
                        if target.is_relative_to(out.parent)
                        else str(target),
                        "conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]],
                    }
                )
    records.sort(key=lambda r: r["id"])
    mix = manifest.finish(sort=True)
    atomic_write_bytes(out, json.dumps(records, ensure_ascii=False, indent=1).encode())
    return {"out": str(out), "samples": len(records), "images_written": images, "image_dir": str(image_dir), **mix}
