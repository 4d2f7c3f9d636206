"""Execute a pipeline DAG stage by stage; every stage output is a resumable checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from curation.engine.config import Pipeline, Stage
from curation.engine.store import StageDir, atomic_write_json, read_json, storage_error
from curation.engine.workers import aggregate, build_op, init_ray, map_parts, prepare, unschedulable
from curation.ops.base import Op

Progress = Callable[[str, int, int, str], None]  # (stage, parts done, parts total, phase)
_PACKAGES = ("ray", "pyarrow", "pydantic", "img2dataset", "imagehash", "faiss-cpu", "polars", "curation")


class StageFailed(RuntimeError):
    """Some parts of a stage raised; finished parts are kept for the rerun."""


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[p] = metadata.version(p)
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _input_parts(stage: Stage, run_dir: Path) -> tuple[list[str], str]:
    """Part names (the primary input's) and the input fingerprint of a stage (all inputs')."""
    prints = []
    for dep in stage.after:
        up = StageDir(run_dir, dep).manifest()
        if not up or up.get("status") != "complete":
            raise StageFailed(f"stage '{stage.name}': upstream stage '{dep}' is not complete")
        prints.append(up["output_fingerprint"])
        if dep == stage.after[0]:
            parts = sorted(up["parts"])
        elif missing := sorted(set(parts) - set(up["parts"])):
            raise StageFailed(
                f"stage '{stage.name}': joined input '{dep}' has no part {missing[0]}; "
                f"inputs after the first must come from the same source as '{stage.after[0]}'"
            )
    fingerprint = prints[0] if len(prints) == 1 else hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]
    return parts, fingerprint


@dataclass
class StageRun:
    """One stage brought up to date, phase by phase (PHASES); each phase returns its errors, or None if it had
    nothing to do. A phase's work is committed as it goes (plan, analysis and part files, markers), so a rerun
    redoes only what is missing."""

    stage: Stage
    op: Op
    sd: StageDir
    run_dir: Path
    progress: Progress
    retry_failed: bool
    parts: list[str] | None = None

    def _map(self, step: str, todo: list[str]) -> list[str]:
        """Run a step over parts on Ray; return the error tracebacks (empty when all succeeded)."""
        errors: list[str] = []
        total = len(self.parts)
        done = total - len(todo)
        self.progress(self.stage.name, done, total, step)

        def on_result(row: dict) -> None:
            nonlocal done
            if row["error"]:
                errors.append(f"part {row['part']}:\n{row['error']}")
            done += 1
            self.progress(self.stage.name, done, total, step)

        map_parts(self.stage, self.run_dir, step, todo, on_result, self.op.placement())
        return errors

    def plan(self) -> list[str] | None:
        """Sources: split the input into parts once; the plan is kept for every rerun."""
        if not self.op.is_source():
            return None
        self.parts = (read_json(self.sd.plan_path) or {}).get("parts")
        if self.parts is None:
            try:
                self.parts = self.op.plan()
            except (OSError, ValueError) as e:
                raise StageFailed(f"stage '{self.stage.name}': cannot plan its parts: {e}") from None
            atomic_write_json(self.sd.plan_path, {"parts": self.parts})
        return []

    def prepare(self) -> list[str] | None:
        return prepare(self.stage, self.run_dir) if self.op.has_prepare() else None

    def analyze(self) -> list[str] | None:
        if not self.op.has_global_step():
            return None
        return self._map("analyze", [p for p in self.parts if not self.sd.done(p, "analyze")])

    def aggregate(self) -> list[str] | None:
        if not self.op.has_global_step() or self.sd.aggregate_path.exists():
            return None
        if errors := aggregate(self.stage, self.run_dir, self.parts):
            return errors
        atomic_write_json(self.sd.aggregate_path, {"parts": len(self.parts)})
        for part in self.parts:  # the summaries are scratch (semdedup's hold the embeddings): no longer read
            self.sd.analysis(part).unlink(missing_ok=True)
        return []

    def process(self) -> list[str]:
        return self._map("process", [p for p in self.parts if not self.sd.done(p)])

    def retry(self) -> list[str] | None:
        """`--retry-failed`: sources download again the rows rejected for transient reasons."""
        if not (self.retry_failed and self.op.retryable):
            return None
        return self._map("retry", [p for p in self.parts if set(self.sd.done(p)["rejected"]) & self.op.retryable])


PHASES = ("plan", "prepare", "analyze", "aggregate", "process", "retry")


def run_stage(pipeline: Pipeline, name: str, run_dir: Path, progress: Progress, retry_failed: bool = False) -> dict:
    """Bring one stage up to date; return its manifest."""
    stage = pipeline.stages[name]
    sd = StageDir(run_dir, name)
    op = build_op(stage, str(run_dir))
    t0 = time.time()
    config_hash = stage.config_hash()
    run = StageRun(stage, op, sd, run_dir, progress, retry_failed)
    try:
        if op.is_source():
            fingerprint = op.input_fingerprint()
        else:
            run.parts, fingerprint = _input_parts(stage, run_dir)
    except (OSError, ValueError) as e:
        raise StageFailed(f"stage '{name}': cannot read its input: {e}") from None
    manifest = sd.manifest()
    current = (
        manifest
        and manifest.get("status") == "complete"
        and manifest["config_hash"] == config_hash
        and manifest["input_fingerprint"] == fingerprint
    )
    if current and not (retry_failed and _retryable(sd, manifest["parts"], op)):
        progress(name, len(manifest["parts"]), len(manifest["parts"]), "skipped")
        return manifest
    state = {"config_hash": config_hash, "input_fingerprint": fingerprint}
    if read_json(sd.state_path) != state:
        sd.reset()
        atomic_write_json(sd.state_path, state)
    sd.clean_temp()
    sd.manifest_path.unlink(missing_ok=True)

    if why := unschedulable(stage):
        raise StageFailed(why)
    errors: list[str] = []
    timings: dict[str, float] = {}
    for phase in PHASES:
        t = time.time()
        errors = getattr(run, phase)()
        if errors is not None:
            timings[f"{phase}_s"] = time.time() - t
        if errors:
            break
    timings["total_s"] = time.time() - t0
    if not errors:  # a worker killed mid-write left its temp file; Ray ran that part again under another pid
        sd.clean_temp()
    return _write_manifest(stage, sd, op, run.parts, state, timings, errors or [])


def _retryable(sd: StageDir, parts, op) -> list[str]:
    """Finished parts with rejects a retry could turn into rows (read from their markers)."""
    return [p for p in parts if (m := sd.done(p)) and set(m["rejected"]) & op.retryable]


def _write_manifest(stage, sd: StageDir, op, parts, state, timings, errors) -> dict:
    """Totals over the parts' markers (the per-part detail stays in _parts/), read one marker at a time."""
    done, shas, rows_in, rows_out = [], [], 0, 0
    by_reason: dict[str, int] = {}
    for p in parts:
        if m := sd.done(p):
            done.append(p)
            shas.append([p, m["sha256"]])
            rows_in, rows_out = rows_in + m["rows_in"], rows_out + m["rows_out"]
            for r, n in m["rejected"].items():
                by_reason[r] = by_reason.get(r, 0) + n
    complete = not errors and len(done) == len(parts)
    counts = {
        "in": rows_in,
        "out": rows_out,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
    }
    digest = hashlib.sha256(json.dumps(shas if complete else []).encode())
    manifest = {
        "stage": stage.name,
        "op": op.name,
        "op_version": op.version,
        "after": stage.after,
        "params": stage.params.model_dump(mode="json"),
        **state,
        "status": "complete" if complete else "failed",
        "errors": errors[:20],
        "parts": done,  # names of the finished parts; each one's marker is _parts/process/<part>.json
        "parts_total": len(parts),
        "counts": counts,
        "bytes_written": sd.bytes_written(),
        "output_fingerprint": digest.hexdigest()[:16] if complete else None,
        "report": op.report() if complete else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "finished_at": _now(),
    }
    atomic_write_json(sd.manifest_path, manifest)
    if not complete:
        first = errors[0] if errors else "parts missing"
        raise StageFailed(
            f"stage '{stage.name}' failed in {len(errors)} part(s); rerun to redo them. First error:\n{first}"
        )
    return manifest


def run_pipeline(
    pipeline: Pipeline,
    run_dir: str | Path,
    address: str | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
    only: list[str] | None = None,
) -> dict[str, dict]:
    """Run (or resume) every stage in topological order; return their manifests."""
    run_dir = Path(run_dir).resolve()
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise StageFailed(f"run dir {run_dir} is a file, not a directory: choose another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / "_pipeline.json", {"name": pipeline.name, "path": pipeline.path, "order": pipeline.order}
        )
    except OSError as e:
        raise StageFailed(f"cannot write to run dir {run_dir}: {storage_error(e) or e}") from None
    init_ray(address, run_dir)
    progress = progress or (lambda *a: None)
    manifests = {}
    for name in pipeline.order:
        if only is None or name in only:
            try:
                manifests[name] = run_stage(pipeline, name, run_dir, progress, retry_failed)
            except OSError as e:  # the driver's own writes: state, plan, aggregate, manifest
                if (msg := storage_error(e)) is None:
                    raise
                raise StageFailed(f"stage '{name}': {msg}") from None
    return manifests
