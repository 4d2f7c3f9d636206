"""Run one step of a stage over its parts on Ray Data: one task (or actor call) per part."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from curation.engine.config import Stage
from curation.engine.store import StageDir, atomic_write_json, atomic_write_parquet, storage_error
from curation.ops.base import Op, Placement
from schemas import Reject, conform
from schemas.rundir import read_resolved


def init_ray(address: str | None, run_dir: Path) -> None:
    """Start (or join) Ray once per process; local by default, `address` for an existing cluster."""
    if not ray.is_initialized():
        ray.init(**_init_kwargs(address, run_dir))
    DataContext.get_current().enable_progress_bars = False  # the CLI draws its own, per stage
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# Ray puts its sockets at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store, and a unix socket's
# path has at most 107 bytes: a deeper temp dir fails at ray.init (pid up to 7 digits, Linux's pid_max).
_LONGEST_SOCKET = "/session_2026-12-02_15-54-55_219459_4194304/sockets/plasma_store"
_AF_UNIX_MAX = 107


def _init_kwargs(address: str | None, run_dir: Path) -> dict:
    kwargs: dict = {"log_to_driver": False, "include_dashboard": False, "ignore_reinit_error": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        tmp = os.environ.get("RAY_TMPDIR") or str(Path(run_dir).resolve() / "_ray")
        if len(tmp.encode()) + len(_LONGEST_SOCKET) > _AF_UNIX_MAX:
            tmp = tempfile.mkdtemp(prefix="ray-")
        kwargs["_temp_dir"] = tmp
    return kwargs


def build_op(stage: Stage, run_dir: str):
    return stage.op(stage.params, stage.name, StageDir(Path(run_dir), stage.name).work)


def read_input(stage: Stage, run_dir: str, part: str) -> pa.Table:
    """A part's rows in (the first input's rows), with every column the op reads, each read from the stage that
    wrote it (stage.lineage) and joined by uid: images are read where the source stage stored them."""

    def read(name: str, columns: list[str]) -> pa.Table:
        return pq.read_table(StageDir(Path(run_dir), name).part(part), columns=columns)

    primary = stage.after[0]
    rows = read(primary, ["uid", *sorted(c for c, s in stage.lineage.items() if s == primary and c != "uid")])
    return read_resolved(rows, stage.lineage, read)


def _analyze(op: Op, stage: Stage, run_dir: str, part: str, sd: StageDir, t0: float) -> dict:
    """The global step's per-part summary (a small table), for the driver's aggregate phase."""
    summary = op.analyze(read_input(stage, run_dir, part))
    atomic_write_parquet(summary, sd.analysis(part))
    marker = {"rows": summary.num_rows}
    atomic_write_json(sd.marker(part, "analyze"), marker)
    return marker


def _process(op: Op, stage: Stage, run_dir: str, part: str, sd: StageDir, t0: float) -> dict:
    """The map step: output rows and rejects, checked against the row models, committed with the part's marker."""
    table = read_input(stage, run_dir, part) if stage.after else None
    rows_in = table.num_rows if table is not None else op.part_size(part)
    out, rejects = op.process(part, table)
    where = f"stage '{stage.name}' part {part}"
    return sd.commit(
        part,
        conform(out, op.output_model(op.params), where),
        conform(rejects, Reject, where + " rejects"),
        rows_in,
        started=round(t0, 3),
        seconds=round(time.time() - t0, 3),
        pid=os.getpid(),
        node=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
    )


def _retry(op: Op, stage: Stage, run_dir: str, part: str, sd: StageDir, t0: float) -> dict:
    """Re-attempt a source part's retryable rejects; merge the outcome into the part."""
    old_out, old_rej = pq.read_table(sd.part(part)), pq.read_table(sd.rejects(part))
    mask = pc.is_in(old_rej.column("reason"), pa.array(sorted(op.retryable)))
    todo = old_rej.filter(mask)
    if todo.num_rows == 0:
        return sd.done(part)
    new_out, new_rej = op.retry(part, todo)
    where = f"stage '{sd.stage}' part {part} retry"
    out = pa.concat_tables([old_out, conform(new_out, op.output_model(op.params), where)]).sort_by("uid")
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
        except Exception as e:
            return storage_error(e) or traceback.format_exc()

    res = stage.resources
    gpus = ray.cluster_resources().get("GPU", 0)
    if res.num_gpus > gpus:  # Ray would wait forever for a GPU that is not there
        return [
            f"prepare: stage '{stage.name}' asks for num_gpus {res.num_gpus:g} per worker and the Ray cluster "
            f"has {gpus:g} GPU(s); add GPU nodes or set resources.num_gpus"
        ]
    error = ray.get(ray.remote(_prepare).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus or None).remote())
    return [f"prepare:\n{error}"] if error else []


def aggregate(stage: Stage, run_dir: Path, parts: list[str]) -> list[str]:
    """Run the op's global step as one Ray task: it reads every part's summary and writes what `process` reads.
    The driver holds nothing per row; the task holds the summaries (rows of a few numbers each), or spreads the
    work over tasks of its own (semdedup)."""

    def _aggregate() -> str:
        try:
            sd = StageDir(Path(run_dir), stage.name)
            build_op(stage, str(run_dir)).aggregate_files({p: sd.analysis(p) for p in parts})
            return ""
        except Exception as e:
            return storage_error(e) or traceback.format_exc()

    error = ray.get(ray.remote(_aggregate).options(num_cpus=stage.resources.num_cpus).remote())
    return [f"aggregate:\n{error}"] if error else []


STEPS = {"analyze": _analyze, "process": _process, "retry": _retry}  # what a worker does for one part


def run_step(op: Op, stage: Stage, run_dir: str, step: str, part: str) -> dict:
    """Do one step for one part and record it; exceptions come back as an error string, not a crash."""
    sd = StageDir(Path(run_dir), stage.name)
    try:
        marker = STEPS[step](op, stage, run_dir, part, sd, time.time())
        return {"part": part, "error": "", "marker": json.dumps(marker)}
    except Exception as e:
        return {"part": part, "error": storage_error(e) or traceback.format_exc(), "marker": ""}


def _task(batch: dict, stage: Stage, run_dir: str, step: str) -> dict:
    """One part in a Ray task: the op is set up, used once, torn down."""
    (part,) = batch["part"]
    op = build_op(stage, run_dir)
    op.setup()
    try:
        res = run_step(op, stage, run_dir, step, str(part))
    finally:
        op.teardown()
    return {k: [v] for k, v in res.items()}


class _PartActor:
    """Holds one op (and its model) for the actor's life; Ray Data deletes it when the pool shuts down."""

    def __init__(self, stage: Stage, run_dir: str, step: str):
        self.stage, self.run_dir, self.step = stage, run_dir, step
        self.op = build_op(stage, run_dir)
        self.op.setup()

    def __call__(self, batch: dict) -> dict:
        (part,) = batch["part"]
        res = run_step(self.op, self.stage, self.run_dir, self.step, str(part))
        return {k: [v] for k, v in res.items()}

    def __del__(self):
        if getattr(self, "op", None) is not None:
            self.op.teardown()


def unschedulable(stage: Stage) -> str | None:
    """Why Ray could never place one of the stage's workers (it would wait forever), or None: a worker asks for more
    CPUs or GPUs than the largest node of the cluster has."""
    res = stage.resources
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for kind, asked in (("CPU", res.num_cpus), ("GPU", res.num_gpus)):
        most = max((n.get(kind, 0) for n in nodes), default=0)
        if asked > most:
            key = f"num_{kind.lower()}s"
            return (
                f"stage '{stage.name}' asks for {key} {asked:g} per worker and the largest node of the Ray cluster "
                f"has {most:g}; set resources.{key} in the pipeline file or add bigger nodes"
            )
    return None


def map_parts(
    stage: Stage,
    run_dir: Path,
    step: str,
    parts: list[str],
    on_result: Callable[[dict], None],
    placement: Placement = Placement(),
) -> None:
    """Run `step` for every part on Ray Data, placed as the op asks, calling on_result as each finishes."""
    if not parts:
        return
    res = stage.resources
    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    kwargs = {"stage": stage, "run_dir": str(run_dir), "step": step}
    remote = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus or None, "batch_size": 1}
    if placement.actor:
        fits = int(ray.available_resources().get("CPU", 1) // res.num_cpus) if res.num_cpus else len(parts)
        if res.num_gpus:
            fits = min(fits, int(ray.available_resources().get("GPU", 0) // res.num_gpus))
        size = max(1, min(res.concurrency or fits, len(parts)))  # a fixed pool: every actor starts at once
        # GPU models load slowly too: one part at a time, or the first actor up drains the queue
        one_at_a_time = placement.one_part_at_a_time or bool(res.num_gpus)
        pool = ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1 if one_at_a_time else None)
        ds = ds.map_batches(_PartActor, fn_constructor_kwargs=kwargs, compute=pool, **remote)
    else:
        ds = ds.map_batches(_task, fn_kwargs=kwargs, compute=TaskPoolStrategy(size=res.concurrency), **remote)
    for row in ds.iter_rows():
        on_result(row)
