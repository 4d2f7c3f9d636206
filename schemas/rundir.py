"""Reading a run dir: a stage's rows with the columns that earlier stages wrote, joined by uid.

Each image is stored once: the source stage (ingest) writes the bytes, and a stage that only decides writes a thin
table (uid plus what it adds). A column of a stage's rows is read from the nearest stage that wrote it: the stage
itself, then its inputs (`after`) in order, depth first. Parts keep their names down a chain of stages, so a part
of a later stage is a subset, by uid, of the same part of every stage before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def resolve(
    starts: list[str],
    columns: Iterable[str],
    columns_of: Callable[[str], set[str]],
    inputs_of: Callable[[str], list[str]],
) -> dict[str, str]:
    """Column -> the nearest stage that wrote it, searching `starts` in order, each then its inputs, depth first;
    columns no stage wrote are left out."""
    found: dict[str, str] = {}
    todo = set(columns)
    seen: set[str] = set()

    def visit(s: str) -> None:
        if s in seen or not todo:
            return
        seen.add(s)
        for c in sorted(todo & columns_of(s)):
            found[c] = s
            todo.discard(c)
        for dep in inputs_of(s):
            visit(dep)

    for s in starts:
        visit(s)
    return found


def join_columns(rows: pa.Table, other: pa.Table, columns: Iterable[str]) -> pa.Table:
    """`rows` with `other`'s columns added, matched by uid (null where other has no such uid)."""
    idx = pc.index_in(rows.column("uid"), value_set=other.column("uid"))
    for name in columns:
        if name not in rows.column_names:
            rows = rows.append_column(other.schema.field(name), other.column(name).take(idx))
    return rows


def read_resolved(rows: pa.Table, lineage: dict[str, str], read: Callable[[str, list[str]], pa.Table]) -> pa.Table:
    """Add the columns `lineage` names to `rows`, each read (with uid) from its stage by `read(stage, columns)`."""
    by_stage: dict[str, list[str]] = {}
    for column, stage in lineage.items():
        if column not in rows.column_names:
            by_stage.setdefault(stage, []).append(column)
    for stage, cols in sorted(by_stage.items()):
        rows = join_columns(rows, read(stage, ["uid", *sorted(cols)]), sorted(cols))
    return rows


class RunDir:
    """A finished (or partly finished) run dir, read through the stages' manifests and part files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def inputs(self, stage: str) -> list[str]:
        """The stage's `after` list, from its manifest."""
        path = self.root / stage / "_manifest.json"
        return json.loads(path.read_text()).get("after", []) if path.exists() else []

    def parts(self, stage: str) -> list[Path]:
        return sorted((self.root / stage).glob("part-*.parquet"))

    def columns(self, stage: str) -> set[str]:
        files = self.parts(stage)
        return set(pq.read_schema(files[0]).names) if files else set()

    def lineage(self, stage: str, columns: Iterable[str]) -> dict[str, str]:
        return resolve([stage], columns, self.columns, self.inputs)

    def read_part(self, stage: str, part: str, columns: Iterable[str]) -> pa.Table:
        """One part of a stage with the given columns (uid always), read from wherever each was written."""
        columns = list(dict.fromkeys(["uid", *columns]))
        lineage = self.lineage(stage, columns)
        if missing := [c for c in columns if c not in lineage]:
            raise KeyError(f"{self.root / stage}: no column {missing} in this stage or any stage before it")
        own = [c for c in columns if lineage[c] == stage]
        rows = pq.read_table(self.root / stage / f"{part}.parquet", columns=own)
        rows = read_resolved(
            rows, lineage, lambda s, cols: pq.read_table(self.root / s / f"{part}.parquet", columns=cols)
        )
        return rows.select(columns)

    def read(self, stage: str, columns: Iterable[str]) -> pa.Table:
        """Every part of a stage, concatenated (for reports and exports of bounded size)."""
        columns = list(columns)
        tables = [self.read_part(stage, p.stem, columns) for p in self.parts(stage)]
        return pa.concat_tables(tables) if tables else pa.table({c: [] for c in ["uid", *columns]})


def _in_run(path: Path) -> bool:
    """Whether a Parquet file is a stage's part in a run dir (RUN/<stage>/part-*.parquet beside a manifest)."""
    return (path.parent / "_manifest.json").exists()


def available(path: str | Path, columns: Iterable[str]) -> list[str]:
    """The columns asked for that a Parquet file holds, or, for a stage's part in a run dir, that the stages
    before it wrote (in the order asked)."""
    path = Path(path)
    columns = list(columns)
    have = set(pq.read_schema(path).names)
    if (lacking := set(columns) - have) and _in_run(path):
        have |= set(RunDir(path.parent.parent).lineage(path.parent.name, lacking))
    return [c for c in columns if c in have]


def read_file(path: str | Path, columns: Iterable[str]) -> pa.Table:
    """A Parquet file's columns: from the file itself, or, for a stage's part in a run dir, from the stages before
    it where the file lacks them; KeyError naming the file and the columns neither has."""
    path = Path(path)
    columns = list(columns)
    if missing := [c for c in columns if c not in available(path, columns)]:
        raise KeyError(f"{path}: no column {missing} in the file or in a stage of its run dir before it")
    if set(columns) <= set(pq.read_schema(path).names):
        return pq.read_table(path, columns=columns)
    return RunDir(path.parent.parent).read_part(path.parent.name, path.stem, columns)
