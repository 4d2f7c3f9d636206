"""Pipeline DAG config: YAML validated by pydantic, with errors that name the file, stage and field."""

from __future__ import annotations

import hashlib
import json
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curation import PIPELINES
from schemas import arrow_schema
from schemas.overrides import OverrideError, apply_overrides, parse_overrides
from schemas.rundir import resolve


class ConfigError(ValueError):
    """A pipeline file is invalid; the message names the file, stage and field."""


class Resources(BaseModel):
    """What one task (or actor) of a stage asks Ray for."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | None = Field(None, ge=1, description="max parallel tasks/actors; default: what the cluster fits")


class StageConfig(BaseModel):
    """One stage as written in the YAML."""

    model_config = ConfigDict(extra="forbid")
    op: str
    after: list[str] = []
    params: dict[str, Any] = {}
    resources: Resources = Resources()


class PipelineFile(BaseModel):
    """The YAML file's top level."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    stages: dict[str, StageConfig]


class Stage(BaseModel):
    """A validated stage: its op class and typed params."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    op: Any  # the Op subclass
    after: list[str]
    params: BaseModel
    resources: Resources
    lineage: dict[str, str] = {}  # input column -> the stage that wrote it (an input, or a stage before one)

    def config_hash(self) -> str:
        """Hash of what determines this stage's output given its input."""
        blob = json.dumps(
            {"op": self.op.name, "version": self.op.version, "params": self.params.hashed()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Pipeline(BaseModel):
    """A validated DAG: stages in a topological order."""

    name: str
    path: str
    stages: dict[str, Stage]
    order: list[str]


def _fmt(where: str, e: ValidationError, prefix: str = "") -> str:
    lines = [f"{where}: {prefix}{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()]
    return "\n".join(lines)


def _apply_overrides(raw: dict, overrides: list[str], where: str) -> None:
    """Apply `--set STAGE.PARAM=VALUE` overrides to the stages' params."""
    try:
        pairs = parse_overrides(overrides)
    except OverrideError as e:
        raise ConfigError(f"{where}: {e}") from None
    for path, value in pairs:
        if len(path) < 2 or path[0] not in raw.get("stages", {}):
            raise ConfigError(f"{where}: --set {'.'.join(path)}: expected STAGE.PARAM with a stage of this pipeline")
        try:
            apply_overrides(raw["stages"][path[0]].setdefault("params", {}), [(path[1:], value)])
        except OverrideError as e:
            raise ConfigError(f"{where}: {e}") from None


def parse_pipeline(raw: Any, where: str, overrides: list[str] = ()) -> Pipeline:
    """Validate a loaded YAML document (plus overrides) into a Pipeline, or raise ConfigError."""
    from curation.ops import OPS

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'name' and 'stages'")
    _apply_overrides(raw, list(overrides), where)
    try:
        spec = PipelineFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_fmt(where, e)) from None
    errors, stages = [], {}
    for name, sc in spec.stages.items():
        op = OPS.get(sc.op)
        if op is None:
            errors.append(f"{where}: stage '{name}': op: unknown op '{sc.op}' (known: {', '.join(sorted(OPS))})")
            continue
        for dep in sc.after:
            if dep not in spec.stages:
                errors.append(
                    f"{where}: stage '{name}': after: depends on '{dep}', which is not a stage of this pipeline"
                )
        least, most = (0, 0) if op.is_source() else (1, op.max_inputs)
        if not least <= len(sc.after) <= most:
            takes = f"{least}" if most == least else f"{least} to {most}"
            errors.append(
                f"{where}: stage '{name}': after: op '{op.name}' takes {takes} input stage(s), got {len(sc.after)}"
            )
        try:
            params = op.Params.model_validate(sc.params)
        except ValidationError as e:
            errors.append(_fmt(where, e, prefix=f"stage '{name}': params."))
            continue
        stages[name] = Stage(name=name, op=op, after=sc.after, params=params, resources=sc.resources)
    try:
        order = list(TopologicalSorter({n: s.after for n, s in spec.stages.items()}).static_order())
    except CycleError as e:
        errors.append(f"{where}: stages form a cycle: {' -> '.join(e.args[1])}")
        order = []
    errors += [] if errors else _link_columns(stages, where)
    if errors:
        raise ConfigError("\n".join(errors))
    return Pipeline(name=spec.name, path=where, stages=stages, order=[n for n in order if n in stages])


def _link_columns(stages: dict[str, Stage], where: str) -> list[str]:
    """Find where each stage's input columns were written (its inputs, then the stages before them, nearest first);
    a required column that no stage before it writes is an error."""
    errors = []
    for name, st in stages.items():
        wanted = st.op.required_columns(st.params) | st.op.optional_columns(st.params) | {"uid", "url", "caption"}
        st.lineage = resolve(
            st.after,
            wanted,
            lambda s: set(arrow_schema(stages[s].op.output_model(stages[s].params)).names),
            lambda s: stages[s].after,
        )
        missing = sorted(st.op.required_columns(st.params) - set(st.lineage))
        if missing:
            errors.append(
                f"{where}: stage '{name}': after: op '{st.op.name}' needs column(s) {', '.join(missing)}, "
                f"which no stage before it ({st.after} and theirs) writes; add a stage that does to after:"
            )
    return errors


def find_pipeline(path: str | Path) -> Path:
    """A pipeline file, else the packaged pipeline that `demo`, `demo.yaml` or `pipelines/demo.yaml` names."""
    path = Path(path)
    packaged = PIPELINES / f"{path.stem}.yaml"
    bare = str(path.parent) in (".", "pipelines") and path.suffix in ("", ".yaml")
    if bare and not path.exists() and packaged.exists():
        return packaged
    return path


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read and validate a pipeline YAML file (or a packaged pipeline, see `find_pipeline`)."""
    path = find_pipeline(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_pipeline(raw, str(path), overrides)
