"""Run one step of a stage over its parts on Ray Data: one task (or actor call) per part."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from curation.config import Stage
from curation.store import StageDir, atomic_write_json, atomic_write_parquet, storage_error
from schemas import Reject, conform


def init_ray(address: str | None, run_dir: Path) -> None:
    """Start (or join) Ray once per process; local by default, `address` for an existing cluster."""
    if not ray.is_initialized():
        ray.init(**_init_kwargs(address, run_dir))
    DataContext.get_current().enable_progress_bars = False  # the CLI draws its own, per stage
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _init_kwargs(address: str | None, run_dir: Path) -> dict:
    kwargs: dict = {"log_to_driver": False, "include_dashboard": False, "ignore_reinit_error": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        tmp = os.environ.get("RAY_TMPDIR") or str(Path(run_dir).resolve() / "_ray")
        if len(tmp) > 60:  # Ray's unix socket paths must stay under ~107 characters
            tmp = tempfile.mkdtemp(prefix="ray-")
        kwargs["_temp_dir"] = tmp
    return kwargs


def build_op(stage: Stage, run_dir: str):
    return stage.op(stage.params, stage.name, StageDir(Path(run_dir), stage.name).work)


def _read(path: Path) -> pa.Table:
    return pq.read_table(path)


def join_by_uid(primary: pa.Table, other: pa.Table) -> pa.Table:
    """Add `other`'s columns that `primary` lacks, matched by uid (null where other has no such uid)."""
    idx = pc.index_in(primary.column("uid"), value_set=other.column("uid"))
    for name in other.column_names:
        if name not in primary.column_names:
            primary = primary.append_column(other.schema.field(name), other.column(name).take(idx))
    return primary


def read_input(stage: Stage, run_dir: str, part: str, joined: bool = True) -> pa.Table:
    """One part of the primary input, with the columns of the other inputs joined by uid (unless joined=False)."""
    table = _read(StageDir(Path(run_dir), stage.after[0]).part(part))
    for dep in stage.after[1:] if joined else []:
        table = join_by_uid(table, _read(StageDir(Path(run_dir), dep).part(part)))
    return table


def run_step(op, stage: Stage, run_dir: str, step: str, part: str) -> dict:
    """Do one step for one part and record it; exceptions come back as an error string, not a crash."""
    sd = StageDir(Path(run_dir), stage.name)
    t0 = time.time()
    try:
        if step == "analyze":
            summary = op.analyze(read_input(stage, run_dir, part, joined=op.analyze_joined))
            atomic_write_parquet(summary, sd.work / "analyze" / f"{part}.parquet")
            marker = {"rows": summary.num_rows}
            atomic_write_json(sd.marker(part, "analyze"), marker)
        elif step == "process":
            table = read_input(stage, run_dir, part) if stage.after else None
            rows_in = table.num_rows if table is not None else op.part_size(part)
            out, rejects = op.process(part, table)
            where = f"stage '{stage.name}' part {part}"
            marker = sd.commit(part, conform(out, op.output, where), conform(rejects, Reject, where + " rejects"), rows_in,
                               started=round(t0, 3), seconds=round(time.time() - t0, 3), pid=os.getpid(),
                               node=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None)
        elif step == "retry":
            marker = _retry(op, sd, part)
        else:
            raise ValueError(f"unknown step {step}")
        return {"part": part, "error": "", "marker": json.dumps(marker)}
    except Exception as e:  # noqa: BLE001 - reported per part, the stage then fails with it
        return {"part": part, "error": storage_error(e) or traceback.format_exc(), "marker": ""}


def _retry(op, sd: StageDir, part: str) -> dict:
    """Re-attempt a source part's retryable rejects; merge the outcome into the part."""
    old_out, old_rej = _read(sd.part(part)), _read(sd.rejects(part))
    mask = pc.is_in(old_rej.column("reason"), pa.array(sorted(op.retryable)))
    todo = old_rej.filter(mask)
    if todo.num_rows == 0:
        return sd.done(part)
    new_out, new_rej = op.retry(part, todo)
    where = f"stage '{sd.stage}' part {part} retry"
    out = pa.concat_tables([old_out, conform(new_out, op.output, where)]).sort_by("uid")
    rejects = pa.concat_tables([old_rej.filter(pc.invert(mask)), conform(new_rej, Reject, where)])
    rows_in = sd.done(part)["rows_in"]
    sd.uncommit(part)
    return sd.commit(part, out, rejects, rows_in)


def prepare(stage: Stage, run_dir: Path) -> list[str]:
    """Run the op's once-per-run preparation as one Ray task with the stage's resources; return errors."""
    def _prepare() -> str:
        try:
            build_op(stage, str(run_dir)).prepare()
            return ""
        except Exception as e:  # noqa: BLE001 - reported like a part's error
            return storage_error(e) or traceback.format_exc()

    res = stage.resources
    gpus = ray.cluster_resources().get("GPU", 0)
    if res.num_gpus > gpus:  # Ray would wait forever for a GPU that is not there
        return [f"prepare: stage '{stage.name}' asks for num_gpus {res.num_gpus:g} per worker and the Ray cluster "
                f"has {gpus:g} GPU(s); add GPU nodes or set resources.num_gpus"]
    error = ray.get(ray.remote(_prepare).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus or None).remote())
    return [f"prepare:\n{error}"] if error else []


def _task(batch: dict, stage: Stage, run_dir: str, step: str) -> dict:
    (part,) = batch["part"]
    op = build_op(stage, run_dir)
    op.setup()
    res = run_step(op, stage, run_dir, step, str(part))
    return {k: [v] for k, v in res.items()}


class _PartActor:
    """Holds one op (and its model) for the actor's life."""

    def __init__(self, stage: Stage, run_dir: str, step: str):
        self.stage, self.run_dir, self.step = stage, run_dir, step
        self.op = build_op(stage, run_dir)
        self.op.setup()

    def __call__(self, batch: dict) -> dict:
        (part,) = batch["part"]
        res = run_step(self.op, self.stage, self.run_dir, self.step, str(part))
        return {k: [v] for k, v in res.items()}


def map_parts(stage: Stage, run_dir: Path, step: str, parts: list[str], on_result: Callable[[dict], None]) -> None:
    """Run `step` for every part on Ray Data, calling on_result as each finishes."""
    if not parts:
        return
    res = stage.resources
    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    kwargs = {"stage": stage, "run_dir": str(run_dir), "step": step}
    remote = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus or None, "batch_size": 1}
    # params whose workers hold the model in process (synthesis with backend vllm) ask for actors too
    if stage.op.actor or getattr(stage.params, "in_process_model", False):
        fits = int(ray.available_resources().get("CPU", 1) // res.num_cpus) if res.num_cpus else len(parts)
        if res.num_gpus:
            fits = min(fits, int(ray.available_resources().get("GPU", 0) // res.num_gpus))
        size = max(1, min(res.concurrency or fits, len(parts)))  # a fixed pool: every actor starts at once
        # engines that load slowly (GPU models, vLLM) take one part at a time, or the first one up drains the queue
        slow_start = bool(res.num_gpus) or getattr(stage.params, "in_process_model", False)
        pool = ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1 if slow_start else None)
        ds = ds.map_batches(_PartActor, fn_constructor_kwargs=kwargs, compute=pool, **remote)
    else:
        ds = ds.map_batches(_task, fn_kwargs=kwargs, compute=TaskPoolStrategy(size=res.concurrency), **remote)
    for row in ds.iter_rows():
        on_result(row)
