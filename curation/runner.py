"""Execute a pipeline DAG stage by stage; every stage output is a resumable checkpoint."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import Pipeline, Stage
from curation.execute import build_op, init_ray, map_parts, prepare
from curation.store import StageDir, atomic_write_json, read_json, storage_error

Progress = Callable[[str, int, int, str], None]  # (stage, parts done, parts total, phase)
_PACKAGES = ("ray", "pyarrow", "pydantic", "img2dataset", "imagehash", "faiss-cpu", "polars", "curation")


class StageFailed(RuntimeError):
    """Some parts of a stage raised; finished parts are kept for the rerun."""


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run(stage: Stage, run_dir: Path, step: str, parts: list[str], progress: Progress, total: int) -> list[str]:
    """Map a step over parts; return the error tracebacks (empty when all succeeded)."""
    errors: list[str] = []
    done = total - len(parts)
    progress(stage.name, done, total, step)

    def on_result(row: dict) -> None:
        nonlocal done
        if row["error"]:
            errors.append(f"part {row['part']}:\n{row['error']}")
        done += 1
        progress(stage.name, done, total, step)

    map_parts(stage, run_dir, step, parts, on_result)
    return errors


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
            raise StageFailed(f"stage '{stage.name}': joined input '{dep}' has no part {missing[0]}; "
                              f"inputs after the first must come from the same source as '{stage.after[0]}'")
    fingerprint = prints[0] if len(prints) == 1 else hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]
    return parts, fingerprint


def _with_part(table: pa.Table, part: str) -> pa.Table:
    return table.append_column("part", pa.array([part] * table.num_rows, pa.string()))


def run_stage(pipeline: Pipeline, name: str, run_dir: Path, progress: Progress, retry_failed: bool = False) -> dict:
    """Bring one stage up to date; return its manifest."""
    stage = pipeline.stages[name]
    sd = StageDir(run_dir, name)
    op = build_op(stage, str(run_dir))
    t0 = time.time()
    timings: dict[str, float] = {}
    config_hash = stage.config_hash()
    parts: list[str] | None = None
    try:
        if op.inputs == 0:
            fingerprint = op.input_fingerprint()
        else:
            parts, fingerprint = _input_parts(stage, run_dir)
    except (OSError, ValueError) as e:
        raise StageFailed(f"stage '{name}': cannot read its input: {e}") from None
    manifest = sd.manifest()
    current = manifest and manifest.get("status") == "complete" and manifest["config_hash"] == config_hash \
        and manifest["input_fingerprint"] == fingerprint
    retryable = [p for p, m in (manifest or {}).get("parts", {}).items() if set(m["rejected"]) & op.retryable]
    if current and not (retry_failed and retryable):
        progress(name, len(manifest["parts"]), len(manifest["parts"]), "skipped")
        return manifest
    state = {"config_hash": config_hash, "input_fingerprint": fingerprint}
    if read_json(sd.state_path) != state:
        sd.reset()
        atomic_write_json(sd.state_path, state)
    sd.clean_temp()
    sd.manifest_path.unlink(missing_ok=True)

    if op.inputs == 0:
        plan_path = sd.work / "plan.json"
        parts = (read_json(plan_path) or {}).get("parts")
        if parts is None:
            try:
                parts = op.plan()
            except (OSError, ValueError) as e:
                raise StageFailed(f"stage '{name}': cannot plan its parts: {e}") from None
            atomic_write_json(plan_path, {"parts": parts})
        timings["plan_s"] = time.time() - t0

    errors: list[str] = []
    if op.has_prepare:
        t = time.time()
        errors += prepare(stage, run_dir)
        timings["prepare_s"] = time.time() - t
    if op.has_analyze and not errors:
        t = time.time()
        errors += _run(stage, run_dir, "analyze", [p for p in parts if not sd.done(p, "analyze")], progress, len(parts))
        timings["analyze_s"] = time.time() - t
        if not errors and not (sd.work / "aggregate.json").exists():
            t = time.time()
            summaries = [_with_part(pq.read_table(sd.work / "analyze" / f"{p}.parquet"), p) for p in parts]
            op.aggregate(pa.concat_tables(summaries) if summaries else None)
            atomic_write_json(sd.work / "aggregate.json", {"parts": len(parts)})
            timings["aggregate_s"] = time.time() - t
    if not errors:
        t = time.time()
        errors += _run(stage, run_dir, "process", [p for p in parts if not sd.done(p)], progress, len(parts))
        if retry_failed and not errors and op.retryable:
            todo = [p for p in parts if set(sd.done(p)["rejected"]) & op.retryable]
            errors += _run(stage, run_dir, "retry", todo, progress, len(parts))
        timings["process_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    return _write_manifest(stage, sd, op, parts, state, timings, errors)


def _write_manifest(stage, sd: StageDir, op, parts, state, timings, errors) -> dict:
    markers = {p: sd.done(p) for p in parts}
    complete = not errors and all(markers.values())
    by_reason: dict[str, int] = {}
    for m in filter(None, markers.values()):
        for r, n in m["rejected"].items():
            by_reason[r] = by_reason.get(r, 0) + n
    done = [m for m in markers.values() if m]
    counts = {
        "in": sum(m["rows_in"] for m in done),
        "out": sum(m["rows_out"] for m in done),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
    }
    digest = hashlib.sha256(json.dumps([[p, markers[p]["sha256"]] for p in parts] if complete else []).encode())
    manifest = {
        "stage": stage.name,
        "op": op.name,
        "op_version": op.version,
        "after": stage.after,
        "params": stage.params.model_dump(mode="json"),
        **state,
        "status": "complete" if complete else "failed",
        "errors": errors[:20],
        "parts": {p: m for p, m in markers.items() if m},
        "parts_total": len(parts),
        "counts": counts,
        "output_fingerprint": digest.hexdigest()[:16] if complete else None,
        "report": op.report() if complete else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "finished_at": _now(),
    }
    atomic_write_json(sd.manifest_path, manifest)
    if not complete:
        first = errors[0] if errors else "parts missing"
        raise StageFailed(f"stage '{stage.name}' failed in {len(errors)} part(s); rerun to redo them. First error:\n{first}")
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
        atomic_write_json(run_dir / "_pipeline.json", {"name": pipeline.name, "path": pipeline.path, "order": pipeline.order})
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
