"""`curate regenerate` pays only for what a prompt change touched; `curate export llava-json` writes LLaVA's format."""
import json
import shutil

import pyarrow.parquet as pq
from typer.testing import CliRunner

from curation.cli import app
from curation.fixtures.llm_server import LLMServer
from tests.conftest import ROOT
from tests.test_synth_ops import data  # noqa: F401 - the image shard fixture

LLAVA = ROOT / "tests" / "fixtures" / "llava_prompts"


def _regen(prompts, shard, out, server, tmp, *extra):
    args = ["regenerate", "--prompts", str(prompts), "--input", str(shard), "--out", str(out), "--backend", "openai",
            "--set", f"base_url={server.url}", "--set", "model=fake-llm", "--set", f"cache={tmp / 'llm.sqlite'}",
            "--set", "api_key_env=NO_KEY_HERE", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_regenerate_pays_only_for_changed_prompts_then_exports(data, tmp_path):  # noqa: F811
    table, ann, _ = data
    shard = tmp_path / "images.parquet"
    pq.write_table(table, shard)
    prompts = tmp_path / "conversation"
    shutil.copytree(ROOT / "prompts" / "conversation", prompts)
    with LLMServer() as server:
        first = _regen(prompts, shard, tmp_path / "v1", server, tmp_path, "--set", f"annotations={ann}")
        assert server.calls == 12 and first["counts"]["in"] == 12
        again = _regen(prompts, shard, tmp_path / "v1b", server, tmp_path, "--set", f"annotations={ann}")
        assert server.calls == 12 and again["usage"]["cached"] == 12  # nothing changed: nothing paid
        (prompts / "system_message.txt").write_text((prompts / "system_message.txt").read_text() + "\nBe concise.")
        second = _regen(prompts, shard, tmp_path / "v2", server, tmp_path, "--set", f"annotations={ann}")
        assert server.calls == 24 and second["prompt_version"] != first["prompt_version"]
        original = _regen(LLAVA / "conversation", shard, tmp_path / "llava", server, tmp_path)  # LLaVA's own folder
        assert server.calls == 36 and original["counts"]["out"] + original["counts"]["rejected"] == 12
    rows = pq.read_table(tmp_path / "v2" / "part-00000.parquet").to_pylist()
    assert {r["prompt_version"] for r in rows} == {second["prompt_version"]}
    out = tmp_path / "export" / "llava.json"
    res = CliRunner().invoke(app, ["export", "llava-json", str(tmp_path / "v2"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert len(records) == len(rows) and set(records[0]) == {"id", "image", "conversations"}
    for r in records:
        assert (out.parent / r["image"]).read_bytes()[:2] == b"\xff\xd8"  # the JPEG is there
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in turns) == 1


def test_export_refuses_non_instruction_shards(data, tmp_path):  # noqa: F811
    table, _, _ = data
    pq.write_table(table, tmp_path / "images.parquet")
    res = CliRunner().invoke(app, ["export", "llava-json", str(tmp_path / "images.parquet"), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "not an instruction shard" in res.output
