"""Derive Arrow schemas from the pydantic row models: the one place the mapping lives."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel


class ArrowType:
    """Annotated marker that fixes a field's Arrow type, e.g. Annotated[list[float],
    ArrowType(pa.list_(pa.float32()))]."""

    def __init__(self, type_: pa.DataType):
        self.type = type_


_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
}


def _strip_optional(ann: Any) -> tuple[Any, bool]:
    """Return (inner annotation, nullable) for `X | None` and Optional[X]."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) != len(get_args(ann)):
            if len(args) != 1:
                raise TypeError(f"unsupported union {ann!r}")
            return args[0], True
    return ann, False


def arrow_type(ann: Any) -> tuple[pa.DataType, bool]:
    """Arrow type and nullability of one annotation."""
    ann, nullable = _strip_optional(ann)
    origin = get_origin(ann)
    if origin is Annotated:
        base, *meta = get_args(ann)
        fixed = next((m.type for m in meta if isinstance(m, ArrowType)), None)
        inner, inner_null = arrow_type(base)
        return (fixed or inner), nullable or inner_null
    if origin is Literal:
        return _SCALARS[type(get_args(ann)[0])], nullable
    if origin is list:
        (item,) = get_args(ann)
        item_type, item_null = arrow_type(item)
        return pa.list_(pa.field("item", item_type, nullable=item_null)), nullable
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return pa.struct(list(arrow_fields(ann))), nullable
    if ann in _SCALARS:
        return _SCALARS[ann], nullable
    raise TypeError(f"no Arrow mapping for {ann!r}")


def arrow_fields(model: type[BaseModel]):
    """Arrow fields of a model, named by alias where one is set."""
    for name, field in model.model_fields.items():
        ann = field.annotation if not field.metadata else Annotated[(field.annotation, *field.metadata)]
        type_, nullable = arrow_type(ann)
        yield pa.field(field.alias or name, type_, nullable=nullable)


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a row model, with the model name in its metadata."""
    return pa.schema(list(arrow_fields(model)), metadata={b"row_model": model.__name__.encode()})
