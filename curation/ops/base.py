"""The Op contract: a pure transform over Arrow tables plus what it needs to run."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from schemas import Row


class Params(BaseModel):
    """Base of every op's params: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Op(ABC):
    """A stage's transform. Subclasses set the class attributes and implement `process`.

    Sources (inputs = 0) also implement `plan` and `input_fingerprint`. Ops with a global step
    implement `analyze` (per input part, returns a small table) and `aggregate` (once, on all of them).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]]
    output: ClassVar[type[Row]]
    inputs: ClassVar[int] = 1  # input stages required; the first one is the primary (its rows are this stage's rows in)
    max_inputs: ClassVar[int | None] = None  # more `after` stages allowed: their columns are joined to the primary by uid
    actor: ClassVar[bool] = False  # build once per Ray actor (models), instead of once per task
    retryable: ClassVar[frozenset[str]] = frozenset()  # reject reasons `curate run --retry-failed` retries

    def __init__(self, params: Params, stage: str, work: Path):
        self.params = params
        self.stage = stage
        self.work = work

    @classmethod
    def required_columns(cls, params: Params) -> set[str]:
        """Columns the op reads from its (joined) input; checked against the upstream row models at config time."""
        return set()

    def setup(self) -> None:
        """Load what the op needs (models, heavy modules) once per worker, before its first part."""

    has_prepare: ClassVar[bool] = False

    def prepare(self) -> None:
        """Build shared state once per run (e.g. a concept index cache) before any part; runs as one Ray task."""

    def report(self) -> dict | None:
        """Stage-level figures for the manifest (e.g. coverage before and after balancing)."""
        return None

    # sources
    def input_fingerprint(self) -> str:
        raise TypeError(f"op {self.name} is not a source")

    def part_size(self, part: str) -> int:
        """Rows in one planned source part."""
        raise TypeError(f"op {self.name} is not a source")

    def plan(self) -> list[str]:
        """Split the source into parts (deterministically) under self.work; return part names."""
        raise TypeError(f"op {self.name} is not a source")

    # global step
    has_analyze: ClassVar[bool] = False
    analyze_joined: ClassVar[bool] = True  # False: analyze reads the primary input only (no joined columns)

    def analyze(self, table: pa.Table) -> pa.Table:
        raise TypeError(f"op {self.name} has no global step")

    def aggregate(self, summaries: pa.Table) -> None:
        """Compute the global state from all parts' summaries (plus a `part` column) and write it under self.work."""
        raise TypeError(f"op {self.name} has no global step")

    # the map step
    @abstractmethod
    def process(self, part: str, table: pa.Table | None) -> tuple[pa.Table, pa.Table]:
        """Transform one part: (output rows, reject rows). Sources get table=None and read their plan."""

    def retry(self, part: str, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Retry rejected rows of a source part: (newly passed rows, still rejected rows)."""
        raise TypeError(f"op {self.name} cannot retry")
