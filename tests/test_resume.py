"""kill -9 in the middle of a stage, run again: the same rows as an uninterrupted run, no duplicates."""

from __future__ import annotations

import pytest

from curation.engine.config import load_pipeline
from curation.engine.driver import run_pipeline
from tests.faults_util import DEMO, kill_when, markers, snapshot


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, step", [("ingest", "process"), ("dedup", "analyze"), ("embed", "process"), ("balance", "process")]
)
def test_kill_then_resume_gives_the_same_rows(reference, tmp_path, stage, step):
    run = tmp_path / "run"
    kill_when(
        run, reference.overrides, lambda: len(markers(run, stage, step)) >= 2
    )  # once 2 parts of the step are done
    assert not (run / stage / "_manifest.json").exists(), "the stage finished before the kill"
    manifests = run_pipeline(load_pipeline(DEMO, reference.overrides), run)
    assert all(m["status"] == "complete" for m in manifests.values())
    assert snapshot(run) == reference.rows
