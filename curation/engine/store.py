"""A stage's directory in a run: atomic Parquet parts, rejects, per-part markers and the manifest."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import Reject, arrow_schema

REJECT_SCHEMA = arrow_schema(Reject)


_STORAGE_HINTS = {
    errno.ENOSPC: "the disk is full: free space or point --run-dir at a bigger disk",
    errno.EDQUOT: "the disk quota is used up: free space or point --run-dir at another disk",
    errno.EROFS: "the run dir is on a read-only file system: remount it read-write or choose another --run-dir",
    errno.EACCES: "the run dir is not writable by this user: fix its permissions or choose another --run-dir",
    errno.EPERM: "the run dir is not writable by this user: fix its permissions or choose another --run-dir",
    errno.ENOTDIR: "a parent of that path is a file, not a directory: choose another --run-dir",
}


def storage_error(exc: BaseException) -> str | None:
    """One line for a disk-full or unwritable-path error (itself or one it was raised from), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if isinstance(exc, OSError) and code is None:  # pyarrow's IO errors carry the text, not the errno
            code = next((c for c in _STORAGE_HINTS if os.strerror(c) in str(exc)), None)
        if code in _STORAGE_HINTS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{os.strerror(code)}{where}: {_STORAGE_HINTS[code]}, then rerun (finished parts are kept)"
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temp name, fsync, then rename over the target; on failure no temp file is left."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a partial temp file would keep a full disk full
            tmp.unlink()
        if e.filename is None:  # write() and fsync() errors name no file
            e.filename = str(path)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def atomic_write_parquet(table: pa.Table, path: Path) -> str:
    """Write a Parquet file atomically; return the sha256 of its bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_per_part(table: pa.Table, folder: Path) -> None:
    """A global step's decisions split by their `part` column: folder/<part>.parquet each, without the column (what
    the op's `process` reads back for its part)."""
    table = table.sort_by("part")
    start = 0
    for item in pc.value_counts(table.column("part")).to_pylist():  # first-seen order = sorted order
        n = item["counts"]
        atomic_write_parquet(table.slice(start, n).drop_columns(["part"]), folder / f"{item['values']}.parquet")
        start += n


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
            {
                "uid": r.get("uid"),
                "url": r.get("url"),
                "caption": r.get("caption"),
                "stage": stage,
                "reason": reasons[i],
                "detail": details[i],
            }
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

    @property
    def plan_path(self) -> Path:
        """A source's part names, fixed at the first run."""
        return self.work / "plan.json"

    def analysis(self, name: str) -> Path:
        """A part's summary from the global step's analyze phase."""
        return self.work / "analyze" / f"{name}.parquet"

    @property
    def aggregate_path(self) -> Path:
        """Written once the global step's aggregate phase is done."""
        return self.work / "aggregate.json"

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

    def bytes_written(self) -> dict[str, int]:
        """Bytes on disk: output rows, rejects, and everything the stage wrote (markers, work files) in all."""
        sizes = {"rows": 0, "rejects": 0, "all": 0}
        for p in self.root.rglob("*"):
            if p.is_file() and p != self.manifest_path:
                n = p.stat().st_size
                sizes["all"] += n
                if p.parent == self.root and p.suffix == ".parquet":
                    sizes["rows"] += n
                elif p.parent == self.root / "rejects":
                    sizes["rejects"] += n
        return sizes

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
                f"stage {self.stage} part {name}: {rows_in} rows in but {out.num_rows} out + {rejects.num_rows} "
                f"rejected"
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
