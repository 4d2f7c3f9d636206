"""The Op contract: a pure transform over Arrow tables plus what it needs to run.

What an op can do is read off the methods it overrides, not off flags: `plan` makes it a source, `analyze` (with
`aggregate`) gives it a global step, `prepare` a once-per-run step, `retry` a `--retry-failed` step. `placement`
says how the scheduler must place its parts; `setup` and `teardown` bracket a worker's life.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from schemas import Row


class Params(BaseModel):
    """Base of every op's params: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    # Fields added after an op's first release, each with the value that gives the behaviour from before it. At
    # that value a field stays out of the config hash, so run dirs made before it keep their parts.
    ADDED_LATER: ClassVar[dict[str, Any]] = {}

    def hashed(self) -> dict[str, Any]:
        """The params as the stage's config hash sees them (the manifest records the full dump)."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in self.ADDED_LATER or v != self.ADDED_LATER[k]}


@dataclass(frozen=True)
class Placement:
    """How the scheduler runs an op's parts."""

    actor: bool = False  # one op per Ray actor for the actor's life (models, engines), instead of one per task
    one_part_at_a_time: bool = False  # per actor: else the first engine up (slow to load) drains the queue


class Op(ABC):
    """A stage's transform. Subclasses set the class attributes and implement `process`.

    Sources also implement `plan`, `part_size` and `input_fingerprint`. Ops with a global step implement `analyze`
    (per input part, returns a small table) and `aggregate` (once, on all of them).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]]
    output: ClassVar[type[Row]]
    max_inputs: ClassVar[int] = 1  # `after` stages allowed; the first one's rows are the stage's rows in
    retryable: ClassVar[frozenset[str]] = frozenset()  # reject reasons `curate run --retry-failed` retries

    def __init__(self, params: Params, stage: str, work: Path):
        self.params = params
        self.stage = stage
        self.work = work

    # what the op can do, read off what it overrides
    @classmethod
    def _overrides(cls, method: str) -> bool:
        return getattr(cls, method) is not getattr(Op, method)

    @classmethod
    def is_source(cls) -> bool:
        """Reads no stage: plans its own parts."""
        return cls._overrides("plan")

    @classmethod
    def has_global_step(cls) -> bool:
        return cls._overrides("analyze")

    @classmethod
    def has_prepare(cls) -> bool:
        return cls._overrides("prepare")

    @classmethod
    def min_inputs(cls) -> int:
        return 0 if cls.is_source() else 1

    @classmethod
    def output_model(cls, params: Params) -> type[Row]:
        """The row model of the stage's output: `output`, plus what the params declare (a source's metadata)."""
        return cls.output

    @classmethod
    def required_columns(cls, params: Params) -> set[str]:
        """Columns the op reads; each comes from the nearest stage before it that wrote it (checked at config time)."""
        return set()

    @classmethod
    def optional_columns(cls, params: Params) -> set[str]:
        """Columns the op uses where a stage before it wrote them (e.g. a recaption)."""
        return set()

    def placement(self) -> Placement:
        """Tasks by default; ops that hold a model or engine ask for actors."""
        return Placement()

    # a worker's life
    def setup(self) -> None:
        """Load what the op needs (models, heavy modules) once per worker, before its first part."""

    def teardown(self) -> None:
        """Release what setup took (clients, files), when the worker is done with the op."""

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
    def analyze(self, table: pa.Table) -> pa.Table:
        raise TypeError(f"op {self.name} has no global step")

    def aggregate(self, summaries: pa.Table | None) -> None:
        """Compute the global state from all parts' summaries (plus a `part` column) and write it under self.work."""
        raise TypeError(f"op {self.name} has no global step")

    def aggregate_files(self, analyses: dict[str, Path]) -> None:
        """The global step as the engine calls it, with each part's summary file: by default `aggregate` on all of
        them in one table; an op whose summaries do not fit one task reads the files itself."""
        tables = []
        for part, f in analyses.items():
            t = pq.read_table(f)
            tables.append(t.append_column("part", pa.array([part] * t.num_rows, pa.string())))
        self.aggregate(pa.concat_tables(tables) if tables else None)

    # the map step
    @abstractmethod
    def process(self, part: str, table: pa.Table | None) -> tuple[pa.Table, pa.Table]:
        """Transform one part: (output rows, reject rows). Sources get table=None and read their plan."""

    def retry(self, part: str, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Retry rejected rows of a source part: (newly passed rows, still rejected rows)."""
        raise TypeError(f"op {self.name} cannot retry")
