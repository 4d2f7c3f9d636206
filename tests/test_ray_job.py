"""The same DAG submitted with `ray job submit` to a Ray cluster started here gives the same rows as the local run."""

from __future__ import annotations

import pytest

from curation.engine.config import load_pipeline
from curation.engine.driver import run_pipeline
from tests.conftest import free_port, kill_ray_started_with
from tests.faults_util import DEMO, demo_overrides, job_submit, snapshot, start_cluster


@pytest.fixture
def cluster():
    """A one-node cluster from `ray start --head` on 127.0.0.1, torn down afterwards."""
    address, env, tmp = start_cluster(nodes=1)
    try:
        yield address, env
    finally:
        kill_ray_started_with(tmp)  # not `ray stop`: it stops every Ray on the machine, the test session's too


@pytest.mark.slow
def test_ray_job_submit_gives_the_same_rows(ray_session, cluster, demo_assets, tmp_path):
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    address, env = cluster
    web = tmp_path / "web"
    make_web(web, n=60, port=free_port(), seed=2)
    overrides = demo_overrides(web, demo_assets)
    with WebServer(web):
        local = tmp_path / "local"
        run_pipeline(load_pipeline(DEMO, overrides), local)
        job = tmp_path / "job"
        res = job_submit(address, env, job, overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout, res.stdout[-2000:]
    assert snapshot(job) == snapshot(local)
