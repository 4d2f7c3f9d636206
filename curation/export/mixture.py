"""Mixtures: which samples of which stages or shards go into an exported data set, as LLaVA-NeXT's YAML mixtures say.

    seed: 0
    datasets:
      - path: run/captions              # a stage dir, a run dir (its instruct stages) or a Parquet shard
        sampling_strategy: all          # all | first:N | end:N | random:N, N a count or a percentage (random:25%)
      - path: run/conversation
        sampling_strategy: random:1000

Paths are relative to the spec file. `random` draws without replacement, seeded by `seed` and the entry's place, and
keeps the drawn samples in their order. A written mixture manifest (schemas.mixture) is a spec too: it selects
exactly its samples again, and the rebuild fails if any of them is gone or its content changed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curation.export.samples import part_files, plan, samples
from schemas.mixture import SCHEMA as MIXTURE
from schemas.mixture import read_manifest, sample_hash, write_manifest

_STRATEGY = re.compile(r"^(all)$|^(first|end|random):(\d+)(%?)$")


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a stage dir, a run dir (its instruct stages) or a Parquet shard")
    sampling_strategy: str = Field("all", description="all | first:N | end:N | random:N (N a count or P%)")

    @field_validator("sampling_strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        m = _STRATEGY.match(v.strip())
        if not m or (m.group(4) and int(m.group(3)) > 100):
            raise ValueError(f"{v!r}: expected all, first:N, end:N or random:N (N a count, or a percentage <= 100%)")
        return v.strip()

    def count(self, available: int) -> tuple[str, int]:
        """The strategy's kind and how many of `available` samples it takes."""
        m = _STRATEGY.match(self.sampling_strategy)
        if m.group(1):
            return "all", available
        kind, n, pct = m.group(2), int(m.group(3)), m.group(4)
        n = round(n * available / 100) if pct else n
        if n > available:
            raise ValueError(f"{self.path}: {self.sampling_strategy} asks for {n} samples and it has {available}")
        return kind, n


class MixtureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    datasets: list[Source] = Field(min_length=1)


@dataclass
class Selection:
    """Per source: its path, the sample ids chosen (None: all of them) and, from a manifest, their expected hashes."""

    path: Path
    label: str
    strategy: str
    ids: set[str] | None = None
    available: int = 0
    expected: dict[str, str] = field(default_factory=dict)


def load_spec(path: Path) -> MixtureSpec:
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        return MixtureSpec(**(tree if isinstance(tree, dict) else {"datasets": tree}))
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, er['loc'])) or '(top)'}: {er['msg']}" for er in e.errors())
        raise ValueError(f"{path}: not a mixture spec: {errs}") from None
    except TypeError as e:
        raise ValueError(f"{path}: not a mixture spec: {e}") from None


def _ids(files: list[Path]) -> list[str]:
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def select(spec_path: Path, part_files) -> tuple[list[Selection], dict]:
    """The samples a spec (YAML) or a manifest (Parquet) selects; `part_files(path)` lists a source's part files."""
    if spec_path.suffix == ".parquet":
        return _from_manifest(spec_path, part_files)
    spec = load_spec(spec_path)
    out = []
    for k, src in enumerate(spec.datasets):
        path = (spec_path.parent / src.path).resolve()
        if not path.exists():
            raise ValueError(f"{spec_path}: datasets.{k}.path {src.path}: no such file or directory ({path})")
        ids = _ids(part_files(path))
        available = len(ids)
        kind, n = src.count(available)
        if kind == "first":
            ids = ids[:n]
        elif kind == "end":
            ids = ids[len(ids) - n :]
        elif kind == "random":
            pick = np.random.default_rng([spec.seed, k]).choice(len(ids), size=n, replace=False)
            ids = [ids[i] for i in np.sort(pick)]
        out.append(Selection(path, src.path, src.sampling_strategy, set(ids), available))
    return out, {"spec": spec.model_dump(), "spec_file": str(spec_path)}


def _from_manifest(path: Path, part_files) -> tuple[list[Selection], dict]:
    table, summary = read_manifest(path)
    rows = table.select(["id", "sample_hash", "source"]).to_pylist()
    out: dict[str, Selection] = {}
    for r in rows:
        where = (path.parent / r["source"]).resolve()  # sources are written relative to the manifest
        sel = out.setdefault(r["source"], Selection(where, r["source"], "manifest", set()))
        sel.ids.add(r["id"])
        sel.expected[r["id"]] = r["sample_hash"]
    for sel in out.values():
        sel.available = len(_ids(part_files(sel.path)))
    return list(out.values()), {"rebuilt_from": str(path), "digest_expected": summary["digest"]}


def sources(paths: list[Path], mixture: Path | None, part_files) -> tuple[list[Selection], dict]:
    """What an export reads: its paths (every sample) or what a mixture spec or manifest selects from its own."""
    if mixture is not None:
        if paths:
            raise ValueError("give either shards to export or --mixture (whose datasets name them), not both")
        return select(mixture, part_files)
    if not paths:
        raise ValueError("nothing to export: give a run dir, stage dirs or shards, or --mixture")
    return [Selection(Path(p).resolve(), str(p), "all") for p in paths], {}


def keep(table: pa.Table, key: str, sel: Selection) -> pa.Table:
    """The rows of `table` the selection chose."""
    return table if sel.ids is None else table.filter(pc.is_in(table.column(key), pa.array(sorted(sel.ids))))


class Collector:
    """The manifest of an export, sample by sample: each sample once, each as a manifest being rebuilt expects."""

    def __init__(self, selections: list[Selection], manifest: Path, summary: dict):
        self.selections, self.manifest, self.summary = selections, manifest, summary
        self.seen: dict[str, int] = {}
        self.rows: list[dict] = []

    def add(self, k: int, sample_id: str, uid: str, conversations: list[dict] | None, image: bytes) -> None:
        src = self.selections[k]
        if (other := self.seen.get(sample_id)) is not None:
            where = f"both {self.selections[other].label} and {src.label}" if other != k else f"{src.label} twice"
            raise ValueError(f"sample {sample_id} is in {where}: a data set has each sample once")
        self.seen[sample_id] = k
        digest = sample_hash(sample_id, conversations or [], image)
        if src.expected and src.expected[sample_id] != digest:
            raise ValueError(f"{src.label}: sample {sample_id} changed since the manifest (its content hash differs)")
        label = os.path.relpath(src.path, self.manifest.parent.resolve())  # a manifest names sources relative to it
        self.rows.append({"id": sample_id, "uid": uid, "sample_hash": digest, "source": label})

    def finish(self, sort: bool) -> dict:
        """Check every selected sample was found; write the manifest (sorted by id, or in the order written); return
        where it is and its digest."""
        for k, sel in enumerate(self.selections):
            found = sum(1 for v in self.seen.values() if v == k)
            if sel.ids is not None and found < len(sel.ids):
                missing = min(sel.ids - {i for i, v in self.seen.items() if v == k})
                raise ValueError(f"{sel.label}: {len(sel.ids) - found} selected sample(s) not found, e.g. {missing}")
        counts = [
            {"path": s.label, "strategy": s.strategy, "available": s.available, "selected": 0} for s in self.selections
        ]
        for k in self.seen.values():
            counts[k]["selected"] += 1
        rows = sorted(self.rows, key=lambda r: r["id"]) if sort else self.rows
        mix = write_manifest(self.manifest, pa.Table.from_pylist(rows, schema=MIXTURE), sources=counts, **self.summary)
        if "digest_expected" in mix and mix["digest"] != mix["digest_expected"]:
            raise ValueError(f"the rebuilt data set differs from {mix['rebuilt_from']} (digest {mix['digest']})")
        return {"manifest": str(self.manifest), "digest": mix["digest"]}


def export_samples(paths: list[Path], stages: list[str] | None, mixture: Path | None, manifest: Path):
    """For the WebDataset and datasets exports: (the parts read, their samples table by table as chosen, the
    Collector that has seen each sample once the tables are consumed)."""
    if mixture is not None and stages:
        raise ValueError("--stage and --mixture together: a mixture's datasets name the stages")
    selections, summary = sources(paths, mixture, lambda p: part_files([p], stages))
    plans = [plan([s.path], stages) for s in selections]
    parts = [p for ps in plans for p in ps]
    if odd := next((p for p in parts if p.fields != parts[0].fields), None):
        raise ValueError(
            f"{parts[0].file} and {odd.file} have different columns ({', '.join(parts[0].fields)} vs "
            f"{', '.join(odd.fields)}): export them one at a time"
        )
    collector = Collector(selections, manifest, summary)

    def tables():
        for k, (sel, ps) in enumerate(zip(selections, plans)):
            for table in samples(ps):
                table = keep(table, "key", sel)
                turns = table.column("conversations").to_pylist() if "conversations" in table.column_names else None
                cols = (table.column(c).to_pylist() for c in ("key", "uid", "image"))
                for i, (key, uid, image) in enumerate(zip(*cols)):
                    collector.add(k, key, uid, turns[i] if turns else None, image)
                yield table

    return parts, tables(), collector
