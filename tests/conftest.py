"""Shared fixtures: one local Ray session per test session, and a served fixture web on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from curation.fixtures.serve import free_port

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on 127.0.0.1 only: tests talk to loopback alone
ROOT = Path(__file__).resolve().parent.parent


def kill_ray_started_with(tmp: str) -> None:
    """SIGKILL every process whose environment has RAY_TMPDIR=tmp: one Ray instance's daemons and workers, no other."""
    needle = f"RAY_TMPDIR={tmp}".encode()
    for _ in range(3):  # agents may outlive the raylet for a moment
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in env.read_bytes().split(b"\0"):
                    os.kill(int(env.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from curation.engine.workers import init_ray

    tmp = tempfile.mkdtemp(prefix="ray-t-")
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    init_ray(None, Path(tmp))  # applies the runner's Ray Data settings to the shared session
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def web(tmp_path_factory):
    """A 120-URL fixture web, served for the whole session."""
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    out = tmp_path_factory.mktemp("web")
    make_web(out, n=120, port=free_port(), seed=0)
    with WebServer(out) as server:
        yield out, server


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory, web):
    """--set overrides pointing the demo DAG at a tiny CLIP checkpoint, a small vocabulary and a shared concept
    cache."""
    from curation.fixtures.demo import demo_assets as make

    out = tmp_path_factory.mktemp("assets")
    model, vocab = make(out, web[0] / "urls.parquet")
    cache = out / "cache"
    return [
        f"embed.pretrained={model}",
        f"match_concepts.pretrained={model}",
        f"match_concepts.vocab={vocab}",
        f"match_concepts.cache_dir={cache}",
        f"balance.vocab={vocab}",
    ]


def stage_rows(run: Path, stage: str, rejects: bool = False, also=("url", "caption", "image")):
    """A stage's rows (polars), with the image columns `also` read where the source stage wrote them; or its rejects."""
    import polars as pl

    from schemas.rundir import RunDir

    if rejects:
        return pl.concat([pl.read_parquet(f) for f in sorted((run / stage / "rejects").glob("part-*.parquet"))])
    rd = RunDir(run)
    return pl.from_arrow(rd.read(stage, sorted(rd.columns(stage) | set(also))))


def web_overrides(web: Path) -> list[str]:
    """--set overrides pointing the demo DAG at a fixture web: its URL list and its boxes for the synthesis stages."""
    from curation.fixtures.demo import synth_stages

    return [f"ingest.urls={web / 'urls.parquet'}"] + [
        f"{s}.annotations={web / 'truth.parquet'}" for s in synth_stages(ROOT / "curation/pipelines/demo.yaml")
    ]


@pytest.fixture(scope="session")
def demo_run(ray_session, demo_assets, tmp_path_factory):
    """The whole demo DAG on a 120-URL web of its own (report and viewer tests read it): (run dir, web dir)."""
    from curation.engine.config import load_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer
    from curation.fixtures.web import make_web

    web = tmp_path_factory.mktemp("demo-web")
    make_web(web, n=120, port=free_port(), seed=1)
    run = tmp_path_factory.mktemp("demo-run")
    overrides = [*web_overrides(web), "ingest.shard_size=60", *demo_assets]
    with WebServer(web):
        run_pipeline(load_pipeline(ROOT / "curation/pipelines/demo.yaml", overrides), run)
    return run, web


from tests.faults_util import reference, slow_web  # noqa: E402,F401 - session fixtures of the fault tests (resume, faults, cluster)
