"""A run dir made by older code resumes (tests/fixtures/legacy_run/README.md): what is still current is kept, what
changed is recomputed from it, and the decisions come out the same."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


def _uids(run: Path, stage: str, rejects: bool = False) -> list[str]:
    files = sorted((run / stage / ("rejects" if rejects else "")).glob("part-*.parquet"))
    return sorted(u for f in files for u in pq.read_table(f, columns=["uid"]).column("uid").to_pylist())


def test_run_made_before_one_copy_storage_resumes_without_downloading(tmp_path):
    from curation.engine.config import load_pipeline
    from curation.engine.store import read_json
    from curation.fixtures.demo import demo_assets
    from tests.conftest import kill_ray_started_with

    legacy = tmp_path / "legacy"
    shutil.copytree(FIXTURE, legacy)
    demo_assets(legacy, legacy / "web/urls.parquet")  # the same tiny CLIP and vocabulary the run was made with
    run = legacy / "run"
    stages = [p.name for p in sorted(run.iterdir()) if (p / "_manifest.json").exists()]
    before = {s: (_uids(run, s), _uids(run, s, rejects=True)) for s in stages}
    ingest = {p.name: p.read_bytes() for p in (run / "ingest").glob("*.parquet")} | {
        "manifest": (run / "ingest/_manifest.json").read_bytes()
    }
    # `curate run` in the fixture folder (its paths are relative to it). The run did not honour X-Robots-Tag opt-outs
    # (they came later): the one setting to say so again. Nothing is served: a download would fail every row.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-l-")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "curation.cli", "run", "pipeline.yaml", "--run-dir", "run"]
    try:
        res = subprocess.run(
            [*cmd, "--set", "ingest.disallowed_header_directives=[]"],
            cwd=legacy,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        kill_ray_started_with(env["RAY_TMPDIR"])
    assert res.returncode == 0, res.stderr[-3000:]
    manifests = {s: read_json(run / s / "_manifest.json") for s in stages}
    assert all(m["status"] == "complete" for m in manifests.values())
    # ingest was current: kept byte for byte, nothing downloaded
    assert ingest == {p.name: p.read_bytes() for p in (run / "ingest").glob("*.parquet")} | {
        "manifest": (run / "ingest/_manifest.json").read_bytes()
    }
    # dedup, filter, balance and instruct write thin rows now (new op versions), recomputed from ingest's images.
    # dedup 3 groups by verified leaders: it only refuses merges that 2 made (an image rejected against a leader
    # near it was in that leader's component, not first in it), so it keeps every image 2 kept, and maybe more.
    versions = {s: manifests[s]["op_version"] for s in ("dedup", "filter", "balance", "conversation")}
    assert versions == {"dedup": "3", "filter": "4", "balance": "2", "conversation": "3"}  # filter 3, instruct 3:
    # caption hygiene and vetted image slots (issue 15); filter 4: the caption_issue column (issue 16)
    after = {s: (_uids(run, s), _uids(run, s, rejects=True)) for s in stages}
    (kept, rejected), (kept_before, rejected_before) = after["dedup"], before["dedup"]
    assert set(rejected) <= set(rejected_before) and set(kept_before) <= set(kept)
    assert sorted(kept + rejected) == sorted(kept_before + rejected_before)
    for s in stages:  # nothing lost anywhere downstream
        c = manifests[s]["counts"]
        assert c["in"] == c["out"] + c["rejected"] and (c["out"], c["rejected"]) == tuple(map(len, after[s])), s
    assert "image" not in pq.read_schema(next((run / "balance").glob("part-*.parquet"))).names
    # with today's defaults ingest is due again (opt-outs now refuse images), and everything after it follows
    stage = load_pipeline(legacy / "pipeline.yaml").stages["ingest"]
    assert stage.config_hash() != manifests["ingest"]["config_hash"]
