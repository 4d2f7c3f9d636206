"""Instruction shards out to LLaVA's JSON format, and instruction sets regenerated from changed prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from curation.store import StageDir, atomic_write_bytes, atomic_write_json
from schemas import Instruction, Reject, conform


def instruction_parts(paths: list[Path]) -> list[Path]:
    """Part files of instruction shards: a run dir (every instruct-like stage), stage dirs, or Parquet files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif (p / "_manifest.json").exists():
            files += sorted(p.glob("part-*.parquet"))
        else:
            for stage in sorted(d for d in p.iterdir() if (d / "_manifest.json").exists()):
                if json.loads((stage / "_manifest.json").read_text()).get("op") == "instruct":
                    files += sorted(stage.glob("part-*.parquet"))
    return files


def export_llava_json(paths: list[Path], out: Path, image_dir: Path | None = None) -> dict:
    """Write LLaVA's JSON ([{id, image, conversations: [{from, value}]}]) and each image once, as images/<uid>.jpg."""
    image_dir = image_dir or out.parent / "images"
    records, images = [], 0
    for f in instruction_parts(paths):
        table = pq.read_table(f)
        missing = set(Instruction.model_fields) - set(table.column_names)
        if missing:
            raise ValueError(f"{f}: not an instruction shard (no {', '.join(sorted(missing))})")
        for row in table.to_pylist():
            name = f"{row['uid']}.jpg"
            target = image_dir / name
            if not target.exists():
                atomic_write_bytes(target, row["image"])
                images += 1
            records.append({"id": row["id"], "image": str(target.relative_to(out.parent)) if target.is_relative_to(out.parent) else str(target),
                            "conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]})
    records.sort(key=lambda r: r["id"])
    atomic_write_bytes(out, json.dumps(records, ensure_ascii=False, indent=1).encode())
    return {"out": str(out), "samples": len(records), "images_written": images, "image_dir": str(image_dir)}


def regenerate(op, inputs: list[Path], out: Path) -> dict:
    """Run one synthesis op over image shards into `out` (parts, rejects, manifest); the request cache pays only for changes."""
    op.setup()
    sd = StageDir(out.parent, out.name)
    counts = {"in": 0, "out": 0, "rejected": 0, "rejected_by_reason": {}}
    for i, f in enumerate(sorted(map(Path, inputs))):
        table = pq.read_table(f)
        part = f"part-{i:05d}"
        rows, rejects = op.process(part, table)
        marker = sd.commit(part, conform(rows, op.output, f"{f}"), conform(rejects, Reject, f"{f} rejects"), table.num_rows,
                           source=str(f))
        counts["in"] += table.num_rows
        counts["out"] += marker["rows_out"]
        for r, n in marker["rejected"].items():
            counts["rejected_by_reason"][r] = counts["rejected_by_reason"].get(r, 0) + n
            counts["rejected"] += n
    report = {"op": op.name, "params": op.params.model_dump(mode="json"), "prompt_version": op.prompt.version,
              "counts": counts, "report": op.report(), "status": "complete",
              "usage": op.client.usage() if op.client else None}
    atomic_write_json(sd.manifest_path, report)
    return report

