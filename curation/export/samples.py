"""Samples with their images, one part file at a time: what every export reads (schemas.rundir does the joins).

A row of an image stage (ingest, dedup, filter, balance, embed, recaption...) is one sample per image, keyed by uid;
a row of an instruct stage is one sample per instruction, keyed by its id. The image and its alt-text are read by
uid from the stage that stored them, part by part (parts keep their names down a chain of stages).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.engine.store import StageDir, read_json
from schemas.rundir import available, join_columns, read_file

IMAGE = ["uid", "url", "caption", "sha256", "width", "height", "original_width", "original_height"]
INSTRUCTION = ["id", "kind", "model", "prompt_version", "source", "conversations"]
# read where a row's stages wrote them: the balance weight and the recaption (with its model and prompt version)
LINEAGE = ["sample_weight", "recaption", "recaption_lang", "recaption_model", "recaption_prompt_version"]
STAGES = pa.list_(pa.struct([("stage", pa.string()), ("op", pa.string()), ("op_version", pa.string())]))


def _is_stage(d: Path) -> bool:
    return (d / "_manifest.json").exists()


def _op(d: Path) -> str | None:
    return (read_json(d / "_manifest.json") or {}).get("op")


def part_files(paths: list[Path], stages: list[str] | None = None) -> list[Path]:
    """Part files of a run dir's stages (`stages`, default every instruct stage), of stage dirs, or Parquet files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if stages and (p.is_file() or _is_stage(p)):
            raise ValueError(f"{p}: --stage names stages of a run dir, and this is not one")
        if p.is_file():
            files.append(p)
        elif _is_stage(p):
            files += sorted(p.glob("part-*.parquet"))
        else:
            found = [d.name for d in sorted(p.iterdir()) if _is_stage(d) and _op(d) == "instruct"]
            for name in stages or found:
                if not _is_stage(p / name):
                    raise ValueError(f"{p}: no stage {name!r} (no {p / name / '_manifest.json'})")
                files += sorted((p / name).glob("part-*.parquet"))
    return files


def _source(f: Path) -> Path | None:
    """The image shard a `curate regenerate` part was made from (its marker says)."""
    source = (StageDir(f.parent.parent, f.parent.name).done(f.stem) or {}).get("source")
    return Path(source) if source else None


def _where(f: Path, columns: list[str]) -> tuple[list[str], Path | None, list[str]]:
    """Of `columns`: those f or its run dir's stages before it have; for a `curate regenerate` part without images,
    also the image shard it was made from and the columns that adds."""
    own = available(f, columns)
    source = None if "image" in own else _source(f)
    extra = [c for c in available(source, columns) if c not in own] if source else []
    return own, source, extra


def read_rows(f: Path, columns: list[str]) -> pa.Table:
    """Of `columns` (uid always), those f has: from the file, the stages before it, or a regenerate part's source."""
    own, source, extra = _where(f, list(dict.fromkeys(["uid", *columns])))
    rows = read_file(f, own)
    return join_columns(rows, read_file(source, ["uid", *extra]), extra) if source and extra else rows


def _chain(stage_dir: Path) -> tuple[dict, ...]:
    """{stage, op, op_version} of a stage and of every stage on its `after` lineage, sources first."""
    out: list[dict] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name not in seen:
            seen.add(name)
            m = read_json(stage_dir.parent / name / "_manifest.json") or {}
            for dep in m.get("after", []):
                visit(dep)
            version = m.get("op_version")
            out.append({"stage": name, "op": m.get("op"), "op_version": None if version is None else str(version)})

    visit(stage_dir.name)
    return tuple(out)


def stages_of(f: Path, chain=_chain) -> tuple[dict, ...]:
    """The stages a part's rows went through (none for a loose file); a regenerate part's start with its source's."""
    if not _is_stage(f.parent):
        return ()
    source = _source(f)
    return (*(stages_of(source, chain) if source else ()), *chain(f.parent.resolve()))


def _source_columns(f: Path, names: list[str]) -> list[str]:
    """What a source stage kept of where a sample came from: its file (source) and the declared metadata columns
    (meta_*), of the file itself or of the run dir's source stage before it."""
    found = set(names)
    if _is_stage(f.parent):
        for st in _chain(f.parent.resolve()):
            part = f.parent.parent / st["stage"] / f.name
            if part.exists() and st["stage"] != f.parent.name:
                found |= set(pq.read_schema(part).names)
    return [c for c in ("source", "coco_id", "captions") if c in found] + sorted(
        c for c in found if c.startswith("meta_")
    )


@dataclass(frozen=True)
class Part:
    file: Path
    key: str  # "id" for instruction rows, "uid" for image rows
    fields: tuple[str, ...]  # the metadata columns its rows have
    stages: tuple[dict, ...]  # {stage, op, op_version} of each stage on its lineage


def plan(paths: list[Path], stages: list[str] | None = None) -> list[Part]:
    """The part files to export, each checked for a key and images; all must have the same columns (one schema)."""
    files = part_files(paths, stages)
    if not files:
        where = " ".join(map(str, paths))
        raise ValueError(
            f"no part files in {where} (a run dir exports its instruct stages unless --stage names others)"
        )
    parts = []
    chain = lru_cache(maxsize=None)(_chain)  # a manifest is read once per export (it lists every part)
    for f in files:
        names = pq.read_schema(f).names
        key = "id" if "conversations" in names else "uid"
        # an instruction's own fields from its own file: an earlier stage's `model` or `source` means something else
        wanted = [*IMAGE, *_source_columns(f, names), *(c for c in INSTRUCTION if key == "id" and c in names)]
        wanted += LINEAGE
        own, _, extra = _where(f, [*wanted, "image"])
        if missing := [c for c in dict.fromkeys([key, "uid", "image"]) if c not in own + extra]:
            raise ValueError(f"{f}: no {', '.join(missing)} for its rows (not in the file nor in a stage before it)")
        parts.append(Part(f, key, tuple(c for c in wanted if c in own + extra), stages_of(f, chain)))
    if odd := next((p for p in parts if p.fields != parts[0].fields), None):
        raise ValueError(
            f"{parts[0].file} and {odd.file} have different columns ({', '.join(parts[0].fields)} vs "
            f"{', '.join(odd.fields)}): export them one at a time"
        )
    return parts


def samples(parts: list[Part]) -> Iterator[pa.Table]:
    """Per part, its samples: key, the part's fields, stage, stages (the lineage) and image (the encoded bytes)."""
    for p in parts:
        rows = read_rows(p.file, [*p.fields, "image"])
        n = rows.num_rows
        stage = p.file.parent.name if _is_stage(p.file.parent) else None
        yield pa.table(
            {
                "key": rows.column(p.key),
                **{c: rows.column(c) for c in p.fields},
                "stage": pa.array([stage] * n, pa.string()),
                "stages": pa.array([list(p.stages)] * n, STAGES),
                "image": rows.column("image"),
            }
        )
