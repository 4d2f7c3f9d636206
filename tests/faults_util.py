"""Shared by the fault tests: the demo run's overrides, row snapshots, kill-and-wait, and Ray clusters started here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, free_port, kill_ray_started_with, web_overrides

BIN = Path(sys.executable).parent
DEMO = ROOT / "curation/pipelines/demo.yaml"


def demo_overrides(web: Path, assets: list[str], *extra: str) -> list[str]:
    """The demo DAG on a fixture web with the tiny model; retries=1: the flaky URL succeeds whichever run asks first."""
    return [*web_overrides(web), "ingest.shard_size=10", "ingest.thread_count=4", "ingest.retries=1", *assets, *extra]


def stages_of(run: Path) -> list[str]:
    return json.loads((run / "_pipeline.json").read_text())["order"]


def snapshot(run: Path, stages: list[str] | None = None) -> dict:
    """Every stage's rows and rejects, content-hashed, sorted."""
    snap = {}
    for stage in stages or stages_of(run):
        out = pl.concat([pl.read_parquet(f) for f in sorted((run / stage).glob("part-*.parquet"))])
        rej = pl.concat([pl.read_parquet(f) for f in sorted((run / stage / "rejects").glob("part-*.parquet"))])
        assert out["uid"].n_unique() == out.height, f"{stage}: duplicate rows"
        out = out.with_columns(pl.col("image").hash().alias("image")) if "image" in out.columns else out
        snap[stage] = (out.sort("uid").to_dicts(), rej.select("uid", "reason").sort("uid").to_dicts())
    return snap


@dataclass
class Reference:
    """An uninterrupted run of the demo DAG: its dir (copy it, never write to it), overrides and rows."""

    run: Path
    web: Path
    overrides: list[str]
    rows: dict

    def copy(self, dest: Path, stages: list[str]) -> Path:
        """A run dir holding this run's finished `stages` (what an interrupted run had done)."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.run / "_pipeline.json", dest)
        for s in stages:
            shutil.copytree(self.run / s, dest / s)
        return dest


@pytest.fixture(scope="session")
def slow_web(tmp_path_factory):
    """A web of the fault tests' own (the session web's flaky URL is spent), served with a little latency."""
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    out = tmp_path_factory.mktemp("kweb")
    make_web(out, n=150, port=free_port(), seed=1)
    with WebServer(out, delay=0.05):
        yield out


@pytest.fixture(scope="session")
def reference(ray_session, slow_web, demo_assets, tmp_path_factory) -> Reference:
    from curation.engine.config import load_pipeline
    from curation.engine.driver import run_pipeline

    run = tmp_path_factory.mktemp("ref")
    overrides = demo_overrides(slow_web, demo_assets)
    run_pipeline(load_pipeline(DEMO, overrides), run)
    return Reference(run, slow_web, overrides, snapshot(run))


def curate_run(run: Path, overrides: list[str]) -> tuple[subprocess.Popen, dict]:
    """`curate run` of the demo DAG in its own session and its own Ray instance."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-k-")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "curation.cli", "run", str(DEMO), "--run-dir", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, env


def kill_when(run: Path, overrides: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `curate run` and SIGKILL its whole process group (and its Ray) as soon as `ready()` holds."""
    proc, env = curate_run(run, overrides)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "timed out waiting for the kill point"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_started_with(env["RAY_TMPDIR"])  # and the Ray instance that run started


def markers(run: Path, stage: str, step: str = "process") -> list[Path]:
    return sorted((run / stage / "_parts" / step).glob("*.json"))


def _node_flags(tmp: str, num_cpus: int) -> list[str]:
    """Flags every node of a cluster on this machine gets: loopback, a small object store, ports of its own."""
    ports = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    return [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={tmp}",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={500 * 2**20}",
        "--disable-usage-stats",
        *(f"--{p}={free_port()}" for p in ports),
    ]


def start_cluster(nodes: int, num_cpus: int = 2) -> tuple[str, dict, str]:
    """`ray start --head` on 127.0.0.1 (+ nodes-1 `ray start --address` raylets), all ports free ones.

    Returns (dashboard URL, env for `ray job submit`, the RAY_TMPDIR that tags every process of the cluster)."""
    tmp = tempfile.mkdtemp(prefix="ray-j-")
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (conftest) refuses a second node; every node is told 127.0.0.1 instead
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_TMPDIR": tmp,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if nodes > 1 else "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    try:
        subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={free_port()}",
                *_node_flags(tmp, num_cpus),
            ],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        for _ in range(1, nodes):
            subprocess.run(
                [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *_node_flags(tmp, num_cpus)],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
    except subprocess.CalledProcessError as e:
        kill_ray_started_with(tmp)
        raise RuntimeError(f"ray start failed: {e.stdout[-2000:]}{e.stderr[-2000:]}") from None
    return f"http://127.0.0.1:{dash}", env, tmp


def alive_nodes(address: str) -> list[str]:
    """Node ids of the alive nodes, from the dashboard's state API (no driver joins the cluster)."""
    from ray.util.state import list_nodes

    return [n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])]


def job_submit(
    address: str, env: dict, run: Path, overrides: list[str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/run_pipeline.py with the demo DAG; waits for it to end."""
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--",
        sys.executable,
        str(ROOT / "jobs/run_pipeline.py"),
        str(DEMO),
        "--run-dir",
        str(run),
    ]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
