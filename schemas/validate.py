"""Check a table against a row model: exact columns, castable types, every row valid."""

from __future__ import annotations

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from schemas.arrow import arrow_schema
from schemas.rows import Row


class RowContractError(ValueError):
    """A table does not match its row model."""


def conform(table: pa.Table, model: type[Row], where: str = "table") -> pa.Table:
    """Return `table` cast to the model's Arrow schema after validating every row; raise RowContractError."""
    schema = arrow_schema(model)
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise RowContractError(f"{where}: columns do not match {model.__name__}: missing {missing}, unexpected {extra}")
    try:
        TypeAdapter(list[model]).validate_python(table.select(schema.names).to_pylist())
    except ValidationError as e:
        err = e.errors()[0]
        row, *field = err["loc"]
        raise RowContractError(f"{where}: row {row} field {'.'.join(map(str, field))}: {err['msg']}") from e
    try:
        table = table.select(schema.names).cast(schema)
    except (ValueError, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise RowContractError(f"{where}: cannot cast to {model.__name__}: {e}") from e
    return table
