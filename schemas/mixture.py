"""A mixture manifest: the exact samples that went into a data set (an export, a packed build), each with a hash of
its content, so the data set can be rebuilt and checked bit for bit.

`MIXTURE.parquet` holds one row per sample, in the data set's order: id, uid, sample_hash, source. Its schema
metadata `mixture` holds the summary: samples, the digest over every (id, sample_hash) in order, and whatever the
writer adds (the spec it was drawn with, per-source counts). Exports and the trainer hash a sample the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("sample_hash", pa.string(), nullable=False),
        pa.field("source", pa.string()),
    ]
)


def sample_hash(sample_id: str, conversations: list[dict], image: bytes | memoryview | None) -> str:
    """sha256 of a sample's id, its turns (from, value) and its image's sha256 (empty for a sample without one)."""
    turns = [[t["from"], t["value"]] for t in conversations]
    img = hashlib.sha256(image).hexdigest() if image is not None else ""
    return hashlib.sha256(json.dumps([sample_id, turns, img], ensure_ascii=False).encode()).hexdigest()


def digest(ids: list[str], hashes: list[str]) -> str:
    """One hash over the data set: every (id, sample_hash) in order."""
    h = hashlib.sha256()
    for i, s in zip(ids, hashes, strict=True):
        h.update(f"{i}\t{s}\n".encode())
    return h.hexdigest()


def write_manifest(path: Path, table: pa.Table, **summary) -> dict:
    """Write MIXTURE.parquet (`table`: SCHEMA's columns, in the data set's order); return its summary."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    ids, hashes = table.column("id").to_pylist(), table.column("sample_hash").to_pylist()
    summary = {"samples": table.num_rows, "digest": digest(ids, hashes), **summary}
    table = table.replace_schema_metadata({"mixture": json.dumps(summary, default=str)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return summary


def read_manifest(path: Path) -> tuple[pa.Table, dict]:
    """A manifest's rows and its summary; a clear error for a file that is not one."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"{path}: not a mixture manifest ({e})") from None
    meta = (table.schema.metadata or {}).get(b"mixture")
    if meta is None or not set(SCHEMA.names) <= set(table.column_names):
        raise ValueError(f"{path}: not a mixture manifest (no 'mixture' summary or no {', '.join(SCHEMA.names)})")
    return table, json.loads(meta)
