"""The op registry: every op a pipeline YAML can name."""
from curation.ops.base import Op
from curation.ops.dedup import Dedup
from curation.ops.filter import Filter
from curation.ops.ingest import Ingest

OPS: dict[str, type[Op]] = {op.name: op for op in (Ingest, Dedup, Filter)}
