"""Tabular files read as a stream of Arrow tables in bounded memory: Parquet (by row groups), CSV and TSV (plain
or gzipped, by blocks), JSONL (plain or gzipped, by lines). A malformed CSV row or JSON line is not fatal: it comes
out as a row of nulls with its error in the `_invalid` column, so that it can be rejected with a reason."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curation.sources.files import suffix

INVALID = "_invalid"  # the error of a row that could not be parsed, else null
BATCH_ROWS = 65_536


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
        if str(path).endswith(".gz")
        else (open(path, encoding="utf-8", errors="replace", newline=""))
    )


def header(path: Path, column_names: list[str] | None = None) -> list[str]:
    """A file's column names (read from its first row or schema), or `column_names` for a CSV/TSV without one."""
    kind = suffix(path)
    if kind == ".parquet":
        return pq.read_schema(path).names
    if column_names is not None:
        return list(column_names)
    if kind.startswith((".csv", ".tsv")):
        with _open_text(path) as f:
            return next(csv.reader(f, delimiter="\t" if kind.startswith(".tsv") else ","), [])
    keys: dict[str, None] = {}
    with _open_text(path) as f:  # JSONL: the keys of its first 1,000 lines, in order of appearance
        for _, line in zip(range(1000), f):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            keys |= dict.fromkeys(obj) if isinstance(obj, dict) else {}
    return list(keys)


def iter_tables(path: Path, schema: pa.Schema, column_names: list[str] | None = None) -> Iterator[pa.Table]:
    """The columns of `schema` (those the file has; the others null) as tables, plus INVALID. Values are cast to
    the schema's types; a value that does not cast makes its row invalid rather than failing the file."""
    kind = suffix(path)
    if kind == ".parquet":
        yield from _parquet(path, schema)
    elif kind.startswith((".csv", ".tsv")):
        yield from _csv(path, schema, "\t" if kind.startswith(".tsv") else ",", column_names)
    elif kind.startswith((".jsonl", ".json")):
        yield from _jsonl(path, schema)
    else:
        raise ValueError(f"{path}: cannot read {kind} files as a table")


def _finish(columns: dict[str, pa.Array], schema: pa.Schema, n: int, invalid: list[str | None]) -> pa.Table:
    """Cast each column to its type; values that do not cast null their row and mark it invalid."""
    out = {}
    for field in schema:
        col = columns.get(field.name)
        if col is None:
            out[field.name] = pa.nulls(n, field.type)
            continue
        if field.type == pa.string() and (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            col = _utf8(col)
        try:
            out[field.name] = col.cast(field.type)
        except pa.ArrowException:  # any value that does not cast: judged one by one
            values = []
            for i, v in enumerate(col.to_pylist()):
                try:
                    values.append(pa.scalar(v).cast(field.type).as_py() if v is not None else None)
                except pa.ArrowException as e:
                    values.append(None)
                    invalid[i] = invalid[i] or f"column {field.name}: {v!r} is not {field.type}: {e}"[:300]
            out[field.name] = pa.array(values, field.type)
    out[INVALID] = pa.array(invalid, pa.string())
    return pa.table(out)


def _utf8(col: pa.Array) -> pa.Array:
    """Bytes as text; bytes that are not UTF-8 become U+FFFD, which filter rejects as caption_encoding (a cast
    would fail the whole file on one bad row)."""
    try:
        return col.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()], pa.string())


def _parquet(path: Path, schema: pa.Schema) -> Iterator[pa.Table]:
    f = pq.ParquetFile(path)
    have = [n for n in schema.names if n in f.schema_arrow.names]
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=have):
        cols = {n: batch.column(n) for n in have}
        yield _finish(cols, schema, batch.num_rows, [None] * batch.num_rows)


def _csv(path: Path, schema: pa.Schema, delimiter: str, column_names: list[str] | None) -> Iterator[pa.Table]:
    """Streamed by pyarrow's CSV reader, every column read as bytes (types are cast per block, not inferred from the
    first block: a later block with another type does not fail the file); rows with the wrong number of fields are
    reported in order as invalid rows."""
    names = header(path, column_names)
    wanted = [n for n in schema.names if n in names]
    bad: list[str] = []

    def invalid_row(row) -> str:
        bad.append(f"line {row.number}: expected {row.expected_columns} fields, got {row.actual_columns}")
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=column_names, block_size=1 << 22),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=invalid_row, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted,
            column_types={n: pa.binary() for n in wanted},  # text checked as UTF-8 per column, not per file
            null_values=[""],  # an empty field is a null caption (as pyarrow writes one), "NA" stays text
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    for batch in reader:
        yield _finish({n: batch.column(n) for n in wanted}, schema, batch.num_rows, [None] * batch.num_rows)
        if bad:
            yield _finish({}, schema, len(bad), bad[:])
            bad.clear()
    if bad:
        yield _finish({}, schema, len(bad), bad[:])


def _jsonl(path: Path, schema: pa.Schema) -> Iterator[pa.Table]:
    """One JSON object per line, parsed line by line (a bad line is an invalid row, the rest of the file is read)."""
    names = schema.names
    rows: dict[str, list] = {n: [] for n in names}
    invalid: list[str | None] = []

    def flush() -> pa.Table:
        table = _finish({n: _column(v) for n, v in rows.items()}, schema, len(invalid), invalid[:])
        for v in rows.values():
            v.clear()
        invalid.clear()
        return table

    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}, not an object")
                error = None
            except ValueError as e:
                obj, error = {}, f"line {number}: not a JSON object: {e}"[:300]
            for n in names:
                v = obj.get(n)
                rows[n].append(v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v))
            invalid.append(error)
            if len(invalid) >= BATCH_ROWS:
                yield flush()
    if invalid:
        yield flush()


def _column(values: list) -> pa.Array:
    """JSON values as an Arrow array: their own type where they agree, else as text (cast later, value by value)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def read_text_table(path: Path) -> pa.Table:
    """A whole small table (a captions sidecar), every column as text, with INVALID."""
    schema = pa.schema([(n, pa.string()) for n in header(path)])
    return pa.concat_tables(
        [schema.empty_table().append_column(INVALID, pa.array([], pa.string())), *iter_tables(path, schema)]
    )
