"""Base of the sources that need no download (read_webdataset, read_parquet, read_folder, read_coco).

`plan` lists the input's samples (one plan row each, cut into parts of shard_size) from names and headers only;
`process` reads a part's samples, checks and measures each image once (curation.sources.images) and writes Image
rows, or a reject with a reason for every sample that cannot be read. A subclass says what its inputs are
(`inputs`), lists its samples (`list_samples`) and reads them (`read`, one Sample per plan row)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field, field_validator

from curation.engine.store import make_rejects
from curation.ops.base import Op, Params
from curation.ops.ingest import make_uid
from curation.sources import metadata as meta
from curation.sources.files import stat_fingerprint
from curation.sources.images import ImageOptions, ImageReader
from schemas import Image, Row, arrow_schema


class LocalSourceParams(ImageOptions, Params):
    shard_size: int = Field(1000, ge=1, description="samples per part")
    metadata: dict[str, meta.MetaType] = Field({}, description=meta.METADATA_DOC)

    _metadata = field_validator("metadata")(meta.check)


@dataclass
class Sample:
    """One sample as a source read it: what the Image row needs, or why it could not be read."""

    url: str | None
    caption: str | None = None
    source: str | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, detail): the sample is a reject
    meta: dict[str, Any] = field(default_factory=dict)  # declared metadata by source name
    known: dict[str, Any] = field(default_factory=dict)  # sha256, original sizes, exif the source already had
    extra: dict[str, Any] = field(default_factory=dict)  # columns of the op's own output model


class LocalSource(Op):
    """Source stage over local files: plan rows -> Image rows (plus the declared metadata columns)."""

    output = Image
    plan_schema: ClassVar[pa.Schema]  # one row per sample

    @classmethod
    def output_model(cls, params: LocalSourceParams) -> type[Row]:
        return meta.with_metadata(cls.output, params.metadata)

    @abstractmethod
    def inputs(self) -> list[Path]:
        """The files the source reads (for the fingerprint), sorted."""

    @abstractmethod
    def list_samples(self) -> Iterator[pa.Table]:
        """The plan: every sample of the input in a stable order, as tables of plan_schema."""

    @abstractmethod
    def read(self, plan: pa.Table) -> Iterator[Sample]:
        """One Sample per plan row (any order)."""

    def input_fingerprint(self) -> str:
        return stat_fingerprint(self.inputs())

    def plan(self) -> list[str]:
        size = self.params.shard_size
        parts: list[str] = []
        pending: list[pa.Table] = []
        held = 0

        def write(table: pa.Table) -> None:
            name = f"part-{len(parts):05d}"
            path = self.work / "plan" / f"{name}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, self.plan_schema) as w:
                w.write_table(table)
            parts.append(name)

        for table in self.list_samples():
            pending.append(table.cast(self.plan_schema))
            held += table.num_rows
            while held >= size:
                whole = pa.concat_tables(pending)
                write(whole.slice(0, size))
                pending, held = [whole.slice(size)], held - size
        if held or not parts:
            write(pa.concat_tables(pending) if pending else self.plan_schema.empty_table())
        return parts

    def part_size(self, part: str) -> int:
        return self._plan(part).num_rows

    def _plan(self, part: str) -> pa.Table:
        with pa.memory_map(str(self.work / "plan" / f"{part}.arrow")) as f:
            return pa.ipc.open_file(f).read_all()

    def setup(self) -> None:
        self.check = ImageReader(self.params)

    def process(self, part: str, table=None) -> tuple[pa.Table, pa.Table]:
        if not hasattr(self, "check"):
            self.setup()
        plan = self._plan(part)
        model = self.output_model(self.params)
        names = arrow_schema(model).names
        rows, bad = [], []
        seen: set[str] = set()
        count = 0
        for s in self.read(plan):
            count += 1
            uid = make_uid(s.url, s.caption)
            head = {"uid": uid, "url": s.url, "caption": s.caption}
            if s.error is None and uid in seen:
                s.error = ("duplicate_input_row", "same url and caption as an earlier sample of this part")
            got = self.check(s.data, s.known.get("sha256")) if s.error is None else s.error
            if isinstance(got, tuple):
                bad.append({**head, "reason": got[0], "detail": f"{s.source}: {got[1]}"[:300] if s.source else got[1]})
                continue
            seen.add(uid)
            declared = {meta.column(k): s.meta.get(k) for k in self.params.metadata}
            row = {**head, **got, "exif": None, "source": s.source, **s.known, **declared, **s.extra}
            rows.append({k: row.get(k) for k in names})
        if count != plan.num_rows:
            raise RuntimeError(f"{self.name} part {part}: read {count} samples of the {plan.num_rows} planned")
        out = pa.Table.from_pylist(rows, schema=arrow_schema(model)).sort_by("uid")
        rejects = make_rejects(bad, self.stage, [b["reason"] for b in bad], [b["detail"] for b in bad])
        return out, rejects.sort_by([("reason", "ascending"), ("uid", "ascending")])
