"""Issue 17: the packaged pipelines on the source fixtures (coco_llava.yaml, laion.yaml), and a source stage killed
with -9 resuming to the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.engine.config import load_pipeline
from curation.engine.driver import run_pipeline
from curation.fixtures import sources as fx
from tests.conftest import ROOT, kill_ray_started_with, stage_rows
from tests.faults_util import snapshot

pytestmark = pytest.mark.slow


def _accounting(run: Path) -> dict[str, dict]:
    """Each stage's manifest totals; rows in = rows out + rejects, checked."""
    out = {}
    for stage in json.loads((run / "_pipeline.json").read_text())["order"]:
        c = json.loads((run / stage / "_manifest.json").read_text())["counts"]
        assert c["in"] == c["out"] + c["rejected"], stage
        out[stage] = c
    return out


def test_coco_llava_runs_on_a_coco_set_and_exports_llava_json(ray_session, web, tmp_path):
    from curation.export.llava_json import export_llava_json

    paths = fx.write_coco(web[0], tmp_path / "coco")
    synth = ("conversation", "detail", "reasoning")
    overrides = [
        f"coco.images={paths['images']}",
        f"coco.captions=[{paths['captions']}]",
        f"coco.instances=[{paths['instances']}]",
        *(f"{s}.backend=rules" for s in synth),
        *(f"{s}.annotations={paths['instances']}" for s in synth),
    ]
    run = tmp_path / "run"
    run_pipeline(load_pipeline("coco_llava", overrides), run)
    totals = _accounting(run)
    rej = stage_rows(run, "coco", rejects=True)
    assert sorted(rej["reason"].to_list()) == ["missing_file", "orphan_annotation"]
    kept = stage_rows(run, "filter", also=("url", "captions"))
    assert kept.height > 20 and all(len(c) == 3 for c in kept["captions"].to_list())
    for s in synth:  # every kept image has boxes: one sample of each kind per image
        assert totals[s]["out"] == kept.height, s
    got = export_llava_json([run], tmp_path / "llava.json")
    records = json.loads((tmp_path / "llava.json").read_text())
    assert got["samples"] == len(records) == 3 * kept.height
    names = {c["name"] for c in json.loads(paths["instances"].read_text())["categories"]}
    answers = " ".join(t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt")
    assert sum(n in answers for n in names) >= len(names) // 2  # the answers speak of COCO's boxes


def test_laion_runs_on_a_laion_style_folder_and_its_columns_reach_the_export(ray_session, web, demo_assets, tmp_path):
    from curation.concepts.clip import TINY_MODEL
    from curation.export.webdataset import export_webdataset

    web_dir, _ = web
    fx.write_url_shards(web_dir, tmp_path / "laion", files=3, formats=("parquet",), laion=True)
    overrides = [
        f"ingest.urls={tmp_path / 'laion'}",
        "ingest.allow_loopback=true",
        "ingest.image_size=64",
        *(f"{s}.model={TINY_MODEL}" for s in ("embed", "match_concepts")),
        *demo_assets,
        *(f"{s}.backend=rules" for s in ("recaption", "conversation", "detail")),
        *(f"{s}.annotations={web_dir / 'truth.parquet'}" for s in ("recaption", "conversation", "detail")),
    ]
    run = tmp_path / "run"
    run_pipeline(load_pipeline("laion", overrides), run)
    totals = _accounting(run)
    assert totals["ingest"]["in"] == 120 and totals["detail"]["out"] > 0
    rows = stage_rows(run, "balance", also=("url", "meta_similarity", "meta_punsafe"))
    assert rows.height > 0 and rows["meta_similarity"].to_list() == pytest.approx(
        [fx.similarity(u) for u in rows["url"].to_list()], rel=1e-6
    )
    got = export_webdataset([run / "balance"], tmp_path / "wds")
    meta = pq.read_table(tmp_path / "wds" / "00000.parquet")
    assert got["samples"] == rows.height and {"meta_similarity", "meta_punsafe", "meta_pwatermark"} <= set(
        meta.column_names
    )


SOURCE_DAG = """
name: folder
stages:
  read:
    op: read_folder
    params: {{root: {root}, shard_size: 4}}
  dedup:
    op: dedup
    after: [read]
  filter:
    op: filter
    after: [dedup]
"""


def test_a_source_stage_killed_with_minus_9_resumes_to_the_same_rows(web, tmp_path):
    root = fx.write_folder(web[0], tmp_path / "folder")
    dag = tmp_path / "folder.yaml"
    dag.write_text(SOURCE_DAG.format(root=root))

    def curate(run: Path) -> tuple[subprocess.Popen, str]:
        tmp = tempfile.mkdtemp(prefix="ray-s-")
        env = {**os.environ, "RAY_TMPDIR": tmp}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "curation.cli", "run", str(dag), "--run-dir", str(run)]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL), tmp

    ref = tmp_path / "ref"
    proc, tmp = curate(ref)
    assert proc.wait(timeout=300) == 0
    kill_ray_started_with(tmp)
    run = tmp_path / "run"
    proc, tmp = curate(run)
    deadline = time.time() + 300
    try:
        while len(list((run / "read" / "_parts" / "process").glob("*.json"))) < 3:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_started_with(tmp)
    assert not (run / "read" / "_manifest.json").exists()  # killed inside the source stage
    proc, tmp = curate(run)
    assert proc.wait(timeout=300) == 0
    kill_ray_started_with(tmp)
    assert snapshot(run) == snapshot(ref)
    _accounting(run)


def test_a_stage_asking_for_more_cpus_than_any_node_has_fails_at_once(ray_session, web, tmp_path):
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import StageFailed

    root = fx.write_folder(web[0], tmp_path / "folder")
    raw = {"name": "big", "stages": {"read": {"op": "read_folder", "params": {"root": str(root)}}}}
    raw["stages"]["read"]["resources"] = {"num_cpus": 64}
    t = time.time()
    with pytest.raises(StageFailed, match="asks for num_cpus 64 per worker and the largest node"):
        run_pipeline(parse_pipeline(raw, "big.yaml"), tmp_path / "run")
    assert time.time() - t < 60  # not Ray waiting forever for a node that will never come
