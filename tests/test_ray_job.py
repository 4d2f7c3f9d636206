"""The same DAG submitted with `ray job submit` to a Ray cluster started here gives the same rows as the local run."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from curation.config import load_pipeline
from curation.runner import run_pipeline
from tests.conftest import ROOT, free_port, kill_ray_started_with
from tests.test_resume import ASSETS, _overrides, _snapshot

BIN = Path(sys.executable).parent


@pytest.fixture
def cluster():
    """A one-node cluster from `ray start --head` on 127.0.0.1, torn down afterwards."""
    tmp = tempfile.mkdtemp(prefix="ray-j-")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2",
         f"--temp-dir={tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_ray_started_with(tmp)  # not `ray stop`: it stops every Ray on the machine, the test session's too


@pytest.mark.slow
def test_ray_job_submit_gives_the_same_rows(ray_session, cluster, demo_assets, tmp_path):
    ASSETS[:] = demo_assets
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    address, env = cluster
    web = tmp_path / "web"
    make_web(web, n=60, port=free_port(), seed=2)
    with WebServer(web):
        local = tmp_path / "local"
        run_pipeline(load_pipeline(ROOT / "pipelines/demo.yaml", _overrides(web)), local)
        job = tmp_path / "job"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--", sys.executable,
               str(ROOT / "jobs/run_pipeline.py"), str(ROOT / "pipelines/demo.yaml"), "--run-dir", str(job)]
        for o in _overrides(web):
            cmd += ["--set", o]
        t = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout, res.stdout[-2000:]
    assert time.time() - t < 600
    assert _snapshot(job) == _snapshot(local)
