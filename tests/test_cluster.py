"""A two-node Ray cluster started on this machine runs the DAG from `ray job submit`: the same rows, work on both
nodes."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import kill_ray_started_with
from tests.faults_util import alive_nodes, job_submit, snapshot, stages_of, start_cluster


@pytest.fixture
def two_nodes():
    """`ray start --head` plus a second raylet from `ray start --address`, 2 CPUs each, torn down afterwards."""
    address, env, tmp = start_cluster(nodes=2, num_cpus=2)
    try:
        deadline = time.time() + 120
        while len(nodes := alive_nodes(address)) < 2:
            assert time.time() < deadline, f"only {len(nodes)} node(s) joined the cluster"
            time.sleep(1)
        yield address, env, nodes
    finally:
        kill_ray_started_with(tmp)  # both nodes' processes; not `ray stop`, which stops the test session's Ray too


@pytest.mark.slow
def test_two_node_cluster_job_gives_the_same_rows_as_the_local_run(reference, two_nodes, tmp_path):
    address, env, nodes = two_nodes
    assert len(nodes) == 2
    job = tmp_path / "job"
    res = job_submit(address, env, job, reference.overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout, res.stdout[-2000:]
    assert snapshot(job) == reference.rows
    ran_on = {}  # stage -> the nodes its parts were done on (each part's marker records it)
    for stage in stages_of(job):
        ran_on[stage] = {json.loads(m.read_text())["node"] for m in (job / stage / "_parts" / "process").glob("*.json")}
    assert set().union(*ran_on.values()) == set(nodes), ran_on  # both nodes did parts, no other node did
