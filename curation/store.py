"""A stage's directory in a run: atomic Parquet parts, rejects, per-part markers and the manifest."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import Reject, arrow_schema

REJECT_SCHEMA = arrow_schema(Reject)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temp name, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def atomic_write_parquet(table: pa.Table, path: Path) -> str:
    """Write a Parquet file atomically; return the sha256 of its bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def make_rejects(rows: pa.Table | list[dict], stage: str, reason: str | list[str], detail=None) -> pa.Table:
    """Reject rows (uid, url, caption taken from `rows`) with one reason or one per row."""
    if isinstance(rows, pa.Table):
        rows = rows.select([c for c in ("uid", "url", "caption") if c in rows.column_names]).to_pylist()
    n = len(rows)
    reasons = [reason] * n if isinstance(reason, str) else list(reason)
    details = detail if isinstance(detail, list) else [detail] * n
    return pa.Table.from_pylist(
        [
            {"uid": r.get("uid"), "url": r.get("url"), "caption": r.get("caption"), "stage": stage,
             "reason": reasons[i], "detail": details[i]}
            for i, r in enumerate(rows)
        ],
        schema=REJECT_SCHEMA,
    )


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


class StageDir:
    """Layout of RUN/<stage>/: part-*.parquet, rejects/part-*.parquet, _parts/*.json markers, _work/, _manifest.json."""

    def __init__(self, run_dir: Path, stage: str):
        self.root = Path(run_dir) / stage
        self.stage = stage

    @property
    def manifest_path(self) -> Path:
        return self.root / "_manifest.json"

    @property
    def state_path(self) -> Path:
        return self.root / "_state.json"

    @property
    def work(self) -> Path:
        return self.root / "_work"

    def part(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    def rejects(self, name: str) -> Path:
        return self.root / "rejects" / f"{name}.parquet"

    def marker(self, name: str, step: str = "process") -> Path:
        return self.root / "_parts" / step / f"{name}.json"

    def manifest(self) -> dict | None:
        return read_json(self.manifest_path)

    def done(self, name: str, step: str = "process") -> dict | None:
        return read_json(self.marker(name, step))

    def reset(self) -> None:
        """Remove everything this stage wrote (config or input changed)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def clean_temp(self) -> None:
        """Remove temp files left by a killed writer."""
        if self.root.exists():
            for p in self.root.rglob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    def commit(self, name: str, out: pa.Table, rejects: pa.Table, rows_in: int, **info) -> dict:
        """Write a part's output and rejects, then its marker (the commit point); check the accounting."""
        if rows_in != out.num_rows + rejects.num_rows:
            raise RuntimeError(
                f"stage {self.stage} part {name}: {rows_in} rows in but {out.num_rows} out + {rejects.num_rows} rejected"
            )
        marker = {
            "rows_in": rows_in,
            "rows_out": out.num_rows,
            "rejected": dict(Counter(rejects.column("reason").to_pylist())),
            "sha256": atomic_write_parquet(out, self.part(name)),
            "rejects_sha256": atomic_write_parquet(rejects, self.rejects(name)),
            **info,
        }
        atomic_write_json(self.marker(name), marker)
        return marker

    def uncommit(self, name: str) -> None:
        """Mark a part as not done (before rewriting it)."""
        self.marker(name).unlink(missing_ok=True)
