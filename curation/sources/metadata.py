"""Extra columns of a source (LAION's similarity, DataComp's uid, a tar's json fields) declared with their types in
the stage's params and carried through as typed `meta_<name>` columns of its rows (not an untyped blob)."""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Literal

import pyarrow as pa
from pydantic import Field, create_model

from schemas import ArrowType, Row

MetaType = Literal["string", "int64", "int32", "float64", "float32", "bool"]
ARROW: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
}
_PY = {"string": str, "int64": int, "int32": int, "float64": float, "float32": float, "bool": bool}
PREFIX = "meta_"
METADATA_DOC = (
    "extra columns to carry through, name -> type (string, int64, int32, float64, float32, bool), e.g. "
    "{similarity: float32, uid: string}: each becomes a typed column meta_<name> of the rows (null where absent)"
)


def column(name: str) -> str:
    """The row column of a declared metadata field: meta_ plus the name with non-word characters as _."""
    return PREFIX + re.sub(r"\W", "_", name)


def check(metadata: dict[str, MetaType]) -> dict[str, MetaType]:
    """Refuse two names that map to one column (a pydantic validator of every source's params)."""
    seen: dict[str, str] = {}
    for name in metadata:
        if (c := column(name)) in seen:
            raise ValueError(f"metadata {seen[c]!r} and {name!r} would both be column {c}")
        seen[c] = name
    return metadata


def schema(metadata: dict[str, MetaType]) -> pa.Schema:
    """The source columns as read: the declared names with their Arrow types."""
    return pa.schema([(name, ARROW[t]) for name, t in metadata.items()])


def rename(table: pa.Table, metadata: dict[str, MetaType]) -> dict[str, pa.ChunkedArray]:
    """The declared columns of `table` under their row names (nulls where the table lacks one)."""
    return {
        column(name): table.column(name).cast(ARROW[t])
        if name in table.column_names
        else pa.nulls(len(table), ARROW[t])
        for name, t in metadata.items()
    }


@cache
def _model(base: type[Row], fields: tuple[tuple[str, str], ...]) -> type[Row]:
    defs = {
        column(name): (
            Annotated[_PY[t], ArrowType(ARROW[t])] | None,
            Field(None, description=f"source column {name!r}"),
        )
        for name, t in fields
    }
    return create_model(f"{base.__name__}WithMetadata", __base__=base, __module__=base.__module__, **defs)


def with_metadata(base: type[Row], metadata: dict[str, MetaType]) -> type[Row]:
    """`base` plus one optional typed field per declared metadata column (`base` itself when none are declared)."""
    return _model(base, tuple(metadata.items())) if metadata else base
