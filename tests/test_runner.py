"""Runner semantics with a tiny source op: failed parts are redone on rerun, finished ones are not."""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pytest
import ray.cloudpickle

from curation.config import parse_pipeline
from curation.ops import OPS
from curation.ops.base import Op, Params
from curation.runner import StageFailed, run_pipeline
from curation.status import run_status
from curation.store import empty_rejects
from schemas import WebPair

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this module's ops by value


class CountParams(Params):
    parts: int = 4
    rows: int = 5
    fail_flag: str  # while this file exists, part-00001 raises
    calls: str  # a folder where every process() call leaves a file


class CountSource(Op):
    """Rows 'u<part>-<i>' in `parts` parts; records each call; fails on demand."""

    name = "count_source"
    Params = CountParams
    output = WebPair
    inputs = 0

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
        rows = [{"url": f"http://127.0.0.1/{part}/{i}", "caption": None, "uid": f"{part}-{i}"} for i in range(self.params.rows)]
        return pa.Table.from_pylist(rows), empty_rejects()


@pytest.fixture
def source_op(monkeypatch):
    monkeypatch.setitem(OPS, CountSource.name, CountSource)


def _pipeline(tmp: Path, **params):
    raw = {"name": "t", "stages": {"src": {"op": "count_source", "params": {
        "fail_flag": str(tmp / "fail"), "calls": str(tmp / "calls"), **params}}}}
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
