"""`curate regenerate` pays only for what a prompt change touched; `curate export llava-json` writes LLaVA's format."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from curation.cli import app
from curation.fixtures.llm_server import LLMServer
from tests.conftest import ROOT
from tests.test_synth_ops import data  # noqa: F401 - the image shard fixture

LLAVA = ROOT / "tests" / "fixtures" / "llava_prompts"


def _regen(prompts, shard, out, server, tmp, *extra):
    args = [
        "regenerate",
        "--prompts",
        str(prompts),
        "--input",
        str(shard),
        "--out",
        str(out),
        "--backend",
        "openai",
        "--set",
        f"base_url={server.url}",
        "--set",
        "model=fake-llm",
        "--set",
        f"cache={tmp / 'llm.sqlite'}",
        "--set",
        "api_key_env=NO_KEY_HERE",
        *extra,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_regenerate_pays_only_for_changed_prompts_then_exports(data, tmp_path):  # noqa: F811
    table, ann, _ = data
    shard = tmp_path / "images.parquet"
    pq.write_table(table, shard)
    prompts = tmp_path / "conversation"
    shutil.copytree(ROOT / "curation/prompts" / "conversation", prompts)
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
    res = CliRunner().invoke(
        app, ["export", "llava-json", str(tmp_path / "images.parquet"), "--out", str(tmp_path / "x.json")]
    )
    assert res.exit_code == 2 and "not an instruction shard" in res.output


def test_regenerate_and_export_read_images_by_uid_in_a_run_dir(data, tmp_path):  # noqa: F811
    """A thin stage's part (uid plus what the stage adds) as regenerate's input: what the op reads comes from the
    stages before it; instruction parts without images export with those their source stage stored."""
    table, ann, _ = data
    run = tmp_path / "run"
    for stage, after in (("ingest", []), ("balance", ["ingest"]), ("instruct", ["balance"])):
        (run / stage).mkdir(parents=True)
        (run / stage / "_manifest.json").write_text(json.dumps({"op": stage, "after": after}))
    pq.write_table(table, run / "ingest" / "part-00000.parquet")
    pq.write_table(table.select(["uid"]).slice(2, 8), run / "balance" / "part-00000.parquet")  # a subset
    pq.write_table(table.select(["uid"]), tmp_path / "thin.parquet")  # not in a run dir: nothing to read by uid
    res = CliRunner().invoke(
        app,
        [
            "regenerate",
            "--prompts",
            "conversation",
            "--input",
            str(tmp_path / "thin.parquet"),
            "--out",
            str(tmp_path / "x"),
            "--backend",
            "rules",
            "--set",
            f"annotations={ann}",
        ],
    )
    assert res.exit_code == 2 and "thin.parquet: not an image shard for instruct (no caption, url)" in res.output
    with LLMServer() as server:
        rep = _regen("conversation", run / "balance" / "part-00000.parquet", tmp_path / "v", server, tmp_path)
    assert rep["counts"]["in"] == 8 and rep["counts"]["out"] > 0
    shutil.copy(tmp_path / "v" / "part-00000.parquet", run / "instruct" / "part-00000.parquet")  # as a run's stage
    ids = sorted(pq.read_table(tmp_path / "v" / "part-00000.parquet")["id"].to_pylist())
    images = dict(zip(table["uid"].to_pylist(), table["image"].to_pylist()))
    for src in (tmp_path / "v", run):  # regenerate's output (its images: the input's), a run dir's instruct stage
        out = tmp_path / "export" / src.name / "llava.json"
        res = CliRunner().invoke(app, ["export", "llava-json", str(src), "--out", str(out)])
        assert res.exit_code == 0, res.output
        records = json.loads(out.read_text())
        assert [r["id"] for r in records] == ids
        assert all((out.parent / r["image"]).read_bytes() == images[Path(r["image"]).stem] for r in records)
