"""Instruction sets regenerated from changed prompts (LLaVA's JSON export is curation/export/llava_json.py)."""

from __future__ import annotations

from pathlib import Path

from curation.engine.store import StageDir, atomic_write_json
from schemas import Reject, conform
from schemas.rundir import available, read_file


def regenerate(op, inputs: list[Path], out: Path) -> dict:
    """Run one synthesis op over image shards into `out` (parts, rejects, manifest); the request cache pays only for
    changes. A shard may be a run dir's stage part (RUN/balance/part-*.parquet): the columns it lacks are read from
    the stages before it."""
    op.setup()
    try:
        sd = StageDir(out.parent, out.name)
        counts = {"in": 0, "out": 0, "rejected": 0, "rejected_by_reason": {}}
        wanted = op.required_columns(op.params) | op.optional_columns(op.params) | {"uid", "url", "caption"}
        for i, f in enumerate(sorted(map(Path, inputs))):
            columns = available(f, sorted(wanted))
            if missing := op.required_columns(op.params) - set(columns):
                raise ValueError(f"{f}: not an image shard for {op.name} (no {', '.join(sorted(missing))})")
            table = read_file(f, columns)
            part = f"part-{i:05d}"
            rows, rejects = op.process(part, table)
            marker = sd.commit(
                part,
                conform(rows, op.output, f"{f}"),
                conform(rejects, Reject, f"{f} rejects"),
                table.num_rows,
                source=str(f.resolve()),  # where export finds the images
            )
            counts["in"] += table.num_rows
            counts["out"] += marker["rows_out"]
            for r, n in marker["rejected"].items():
                counts["rejected_by_reason"][r] = counts["rejected_by_reason"].get(r, 0) + n
                counts["rejected"] += n
        report = {
            "op": op.name,
            "params": op.params.model_dump(mode="json"),
            "prompt_version": op.prompt.version,
            "counts": counts,
            "report": op.report(),
            "status": "complete",
            "usage": op.client.usage() if op.client else None,
        }
    finally:
        op.teardown()
    atomic_write_json(sd.manifest_path, report)
    return report
