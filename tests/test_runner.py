"""Runner semantics with a tiny source op: failed parts are redone on rerun, finished ones are not."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import ray.cloudpickle

from curation.engine.config import parse_pipeline
from curation.engine.driver import StageFailed, run_pipeline
from curation.engine.status import run_status
from curation.engine.store import empty_rejects
from curation.ops import OPS
from curation.ops.base import Op, Params, Placement
from schemas import WebPair

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this module's ops by value


class CountParams(Params):
    parts: int = 4
    rows: int = 5
    fail_flag: str  # while this file exists, part-00001 raises
    calls: str  # a folder where every process() call leaves a file
    orphan: bool = False  # part-00002 leaves a temp file behind, as a writer killed mid-write does


class CountSource(Op):
    """Rows 'u<part>-<i>' in `parts` parts; records each call; fails on demand."""

    name = "count_source"
    Params = CountParams
    output = WebPair

    def input_fingerprint(self) -> str:
        return "fixed"

    def plan(self) -> list[str]:
        return [f"part-{i:05d}" for i in range(self.params.parts)]

    def part_size(self, part: str) -> int:
        return self.params.rows

    def process(self, part, table=None):
        calls = Path(self.params.calls)
        calls.mkdir(parents=True, exist_ok=True)
        (calls / f"{part}-{len(list(calls.glob(part + '-*')))}").touch()
        if part == "part-00001" and Path(self.params.fail_flag).exists():
            raise RuntimeError("injected failure")
        if part == "part-00002" and self.params.orphan:
            (self.work.parent / f".{part}.parquet.tmp-{os.getpid() + 1}").write_bytes(b"PAR1")
        rows = [
            {"url": f"http://127.0.0.1/{part}/{i}", "caption": None, "uid": f"{part}-{i}"}
            for i in range(self.params.rows)
        ]
        return pa.Table.from_pylist(rows), empty_rejects()


@pytest.fixture
def source_op(monkeypatch):
    monkeypatch.setitem(OPS, CountSource.name, CountSource)


def _pipeline(tmp: Path, **params):
    raw = {
        "name": "t",
        "stages": {
            "src": {
                "op": "count_source",
                "params": {"fail_flag": str(tmp / "fail"), "calls": str(tmp / "calls"), **params},
            }
        },
    }
    return parse_pipeline(raw, "t.yaml")


def _calls(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "calls").iterdir())


def test_failed_parts_are_redone_and_finished_parts_are_not(ray_session, source_op, tmp_path):
    (tmp_path / "fail").touch()
    run = tmp_path / "run"
    with pytest.raises(StageFailed, match="injected failure"):
        run_pipeline(_pipeline(tmp_path), run)
    st = run_status(run)["stages"][0]
    assert st["status"] == "failed" and st["parts"] == "3/4" and st["out"] == 15
    assert _calls(tmp_path) == ["part-00000-0", "part-00001-0", "part-00002-0", "part-00003-0"]

    (tmp_path / "fail").unlink()
    m = run_pipeline(_pipeline(tmp_path), run)["src"]
    assert m["status"] == "complete" and m["counts"]["out"] == 20
    assert "part-00001-1" in _calls(tmp_path) and len(_calls(tmp_path)) == 5  # only the failed part again

    run_pipeline(_pipeline(tmp_path), run)  # complete: nothing runs
    assert len(_calls(tmp_path)) == 5
    run_pipeline(_pipeline(tmp_path, rows=6), run)  # config changed: every part again
    assert len(_calls(tmp_path)) == 9


def test_a_killed_writers_temp_file_is_gone_when_the_stage_completes(ray_session, source_op, tmp_path):
    """A worker SIGKILLed mid-write leaves `.part-N.parquet.tmp-<pid>`; Ray runs the part again and commits it, and
    the completed stage holds no temp file (not only the next run's start cleans it)."""
    run = tmp_path / "run"
    m = run_pipeline(_pipeline(tmp_path, orphan=True), run)["src"]
    assert m["status"] == "complete" and m["counts"]["out"] == 20
    assert (run / "src" / "part-00002.parquet").exists()
    assert not list(run.rglob(".*.tmp-*"))


class LifeParams(Params):
    actor: bool
    log: str  # a folder: setup and teardown leave a file each, per op instance


class LifeSource(Op):
    """A source whose placement is a param; records its setup and teardown."""

    name = "life_source"
    Params = LifeParams
    output = WebPair

    def placement(self) -> Placement:
        return Placement(actor=self.params.actor)

    def setup(self) -> None:
        self.me = f"{os.getpid()}-{uuid.uuid4().hex}"  # id(self) is reused by the next task in a worker
        Path(self.params.log, f"setup-{self.me}").touch()

    def teardown(self) -> None:
        Path(self.params.log, f"teardown-{self.me}").touch()

    def input_fingerprint(self) -> str:
        return "fixed"

    def plan(self) -> list[str]:
        return [f"part-{i:05d}" for i in range(4)]

    def part_size(self, part: str) -> int:
        return 1

    def process(self, part, table=None):
        return pa.Table.from_pylist(
            [{"url": f"http://127.0.0.1/{part}", "caption": None, "uid": part}]
        ), empty_rejects()


@pytest.mark.parametrize("actor", [False, True])
def test_every_setup_is_torn_down_with_tasks_and_actors(ray_session, monkeypatch, tmp_path, actor):
    monkeypatch.setitem(OPS, LifeSource.name, LifeSource)
    log = tmp_path / "log"
    log.mkdir()
    raw = {"name": "t", "stages": {"src": {"op": "life_source", "params": {"actor": actor, "log": str(log)}}}}
    assert run_pipeline(parse_pipeline(raw, "t.yaml"), tmp_path / "run")["src"]["counts"]["out"] == 4
    deadline = time.time() + 30  # an actor is torn down when Ray Data releases the pool, just after the stage
    while time.time() < deadline and len(list(log.glob("teardown-*"))) < len(list(log.glob("setup-*"))):
        time.sleep(0.2)
    setups = {p.name.removeprefix("setup-") for p in log.glob("setup-*")}
    teardowns = {p.name.removeprefix("teardown-") for p in log.glob("teardown-*")}
    assert setups and setups == teardowns
    # tasks: one op per part; actors: one per actor, as many as free CPUs (at most 2) when the pool starts
    assert (1 <= len(setups) <= 2) if actor else len(setups) == 4


def test_capabilities_are_read_off_overridden_methods(source_op):
    from curation.ops.balance import Balance
    from curation.ops.dedup import Dedup
    from curation.ops.embed import Embed
    from curation.ops.ingest import Ingest
    from curation.ops.match_concepts import MatchConcepts

    assert CountSource.is_source() and Ingest.is_source() and not Dedup.is_source()
    assert Dedup.has_global_step() and Balance.has_global_step() and not Embed.has_global_step()
    assert MatchConcepts.has_prepare() and not Dedup.has_prepare() and not CountSource.has_prepare()
    assert [op.min_inputs() for op in (Ingest, Dedup)] == [0, 1]
    with pytest.raises(Exception, match="takes 0 input stage"):
        parse_pipeline(
            {
                "name": "t",
                "stages": {
                    "a": {"op": "count_source", "params": {"fail_flag": "f", "calls": "c"}},
                    "b": {"op": "count_source", "after": ["a"], "params": {"fail_flag": "f", "calls": "c"}},
                },
            },
            "t.yaml",
        )


class GlobalParams(Params):
    fail_flag: str  # while this file exists, aggregate raises


class CountGlobal(Op):
    """A global step over CountSource's rows: aggregate records its process and the rows it saw; process keeps all."""

    name = "count_global"
    Params = GlobalParams
    output = WebPair

    def analyze(self, table):
        return table.select(["uid"])

    def aggregate(self, summaries):
        if Path(self.params.fail_flag).exists():
            raise RuntimeError("injected aggregate failure")
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "seen.json").write_text(f'{{"pid": {os.getpid()}, "rows": {summaries.num_rows}}}')

    def process(self, part, table):
        return table, empty_rejects()

    @classmethod
    def required_columns(cls, params):
        return {"uid", "url", "caption"}


def test_the_global_step_runs_off_the_driver_and_the_manifest_keeps_totals(
    ray_session, source_op, monkeypatch, tmp_path
):
    import json

    from curation.engine.store import StageDir

    monkeypatch.setitem(OPS, CountGlobal.name, CountGlobal)
    stages = {
        "src": {"op": "count_source", "params": {"fail_flag": str(tmp_path / "no"), "calls": str(tmp_path / "c")}},
        "glob": {"op": "count_global", "after": ["src"], "params": {"fail_flag": str(tmp_path / "fail")}},
    }
    pipeline = parse_pipeline({"name": "g", "stages": stages}, "g.yaml")
    (tmp_path / "fail").touch()
    with pytest.raises(StageFailed, match="injected aggregate failure"):
        run_pipeline(pipeline, tmp_path / "run")
    (tmp_path / "fail").unlink()
    m = run_pipeline(pipeline, tmp_path / "run")["glob"]
    seen = json.loads((StageDir(tmp_path / "run", "glob").work / "seen.json").read_text())
    assert seen["rows"] == 20 and seen["pid"] != os.getpid()  # every part's summary, in a Ray task
    assert m["parts"] == [f"part-{i:05d}" for i in range(4)] and m["counts"]["out"] == 20  # names; totals
    markers = [StageDir(tmp_path / "run", "glob").done(p) for p in m["parts"]]
    assert sum(x["rows_out"] for x in markers) == m["counts"]["out"] and all("sha256" in x for x in markers)
