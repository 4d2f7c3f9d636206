"""kill -9 in the middle of a stage, run again: the same rows as an uninterrupted run, no duplicates."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest

from curation.config import load_pipeline
from curation.runner import run_pipeline
from tests.conftest import ROOT, web_overrides, free_port, kill_ray_started_with

STAGES = ("ingest", "dedup", "filter", "embed", "match_concepts", "balance")
ASSETS: list[str] = []  # tiny model and vocabulary overrides, set by the reference fixture


@pytest.fixture(scope="module")
def slow_web(tmp_path_factory):
    """Its own web (the session web's flaky URL is spent), served with a little latency."""
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    out = tmp_path_factory.mktemp("kweb")
    make_web(out, n=150, port=free_port(), seed=1)
    with WebServer(out, delay=0.05):
        yield out


def _overrides(web: Path) -> list[str]:
    # retries=1: the flaky URL succeeds whichever run happens to ask first
    return [*web_overrides(web), "ingest.shard_size=10", "ingest.thread_count=4", "ingest.retries=1", *ASSETS]


def _snapshot(run: Path) -> dict:
    """Every stage's rows and rejects, content-hashed, sorted."""
    snap = {}
    for stage in STAGES:
        out = pl.concat([pl.read_parquet(f) for f in sorted((run / stage).glob("part-*.parquet"))])
        rej = pl.concat([pl.read_parquet(f) for f in sorted((run / stage / "rejects").glob("part-*.parquet"))])
        assert out["uid"].n_unique() == out.height, f"{stage}: duplicate rows"
        out = out.with_columns(pl.col("image").hash().alias("image")) if "image" in out.columns else out
        snap[stage] = (out.sort("uid").to_dicts(), rej.select("uid", "reason").sort("uid").to_dicts())
    return snap


@pytest.fixture(scope="module")
def reference(ray_session, slow_web, demo_assets, tmp_path_factory):
    ASSETS[:] = demo_assets
    run = tmp_path_factory.mktemp("ref")
    run_pipeline(load_pipeline(ROOT / "pipelines/demo.yaml", _overrides(slow_web)), run)
    return _snapshot(run)


def _kill_during(run: Path, web: Path, stage: str, step: str) -> None:
    """Start `curate run` in its own session and SIGKILL the whole group once `stage` has done 2 parts of `step`."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-k-")}
    cmd = [sys.executable, "-m", "curation.cli", "run", str(ROOT / "pipelines/demo.yaml"), "--run-dir", str(run)]
    for o in _overrides(web):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = run / stage / "_parts" / step
    deadline = time.time() + 240
    try:
        while len(list(markers.glob("*.json"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "timed out waiting for the stage to start"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_started_with(env["RAY_TMPDIR"])  # and the Ray instance that run started
    assert not (run / stage / "_manifest.json").exists(), "the stage finished before the kill"


@pytest.mark.slow
@pytest.mark.parametrize("stage, step", [("ingest", "process"), ("dedup", "analyze"), ("embed", "process"), ("balance", "process")])
def test_kill_then_resume_gives_the_same_rows(reference, slow_web, tmp_path, stage, step):
    run = tmp_path / "run"
    _kill_during(run, slow_web, stage, step)
    manifests = run_pipeline(load_pipeline(ROOT / "pipelines/demo.yaml", _overrides(slow_web)), run)
    assert all(m["status"] == "complete" for m in manifests.values())
    assert _snapshot(run) == reference
