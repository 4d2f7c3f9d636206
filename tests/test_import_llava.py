"""`curate import llava-json` (issue 17): a LLaVA-format set in as ImageInstruction shards, every bad sample a reject
with a reason, ids and uids stable, and back out through the export unchanged."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curation.cli import app
from curation.export.llava_json import export_llava_json
from curation.fixtures.sources import write_llava_json
from curation.sources.llava_json import import_llava_json
from schemas import ImageInstruction, conform

EXPECTED = {
    "text-only": "no_image",
    "two-images": "multiple_images",
    "missing": "missing_file",
    "escape": "path_outside_root",
    "gpt-first": "roles_not_alternating",
    "two-tokens": "image_token_in_text",
    "empty": "empty_turn",
    "no-turns": "malformed_sample",
    "question-last": "roles_not_alternating",
    "surrogate": "malformed_sample",
    "broken-truncated": "truncated_image",
    "broken-html": "not_an_image",
    "broken-empty": "empty_body",
    "broken-huge": "too_many_pixels",
}


@pytest.fixture(scope="module")
def imported(web, tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    path = write_llava_json(web[0], d / "set")
    summary = import_llava_json(path, d / "set" / "images", d / "out", shard_size=25)
    return path, d, summary


def test_every_sample_is_a_row_or_a_reject_with_its_reason(imported):
    path, d, summary = imported
    records = json.loads(path.read_text())
    rows = pa.concat_tables([pq.read_table(f) for f in sorted((d / "out").glob("part-*.parquet"))])
    rej = pq.read_table(d / "out" / "rejects.parquet")
    assert summary["in"] == len(records) == rows.num_rows + rej.num_rows and summary["shards"] > 1
    conform(rows, ImageInstruction)
    got = Counter(rej.column("reason").to_pylist())
    want = Counter(EXPECTED.values()) + Counter({"malformed_sample": 1})  # and the record that is not an object
    assert got == want
    details = " ".join(rej.column("detail").to_pylist())
    assert "not-there.jpg" in details and "text only" in details


def test_ids_uids_images_and_the_image_token(imported):
    path, d, _ = imported
    records = [r for r in json.loads(path.read_text()) if isinstance(r, dict) and r.get("id") not in EXPECTED]
    rows = pa.concat_tables([pq.read_table(f) for f in sorted((d / "out").glob("part-*.parquet"))]).to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == len(records)
    first = rows[0]["id"]
    assert [r["id"] for r in rows[:2]] == [first, f"{first}-1"]  # an id used twice: the later one made unique
    assert rows[0]["uid"] == rows[1]["uid"]  # one image, one uid
    for r, rec in zip(rows, records, strict=True):
        assert r["image"] == (d / "set" / "images" / rec["image"]).read_bytes()
        assert r["conversations"][0]["value"].startswith("<image>\n") and r["source"] == "imported"
        assert [t["from"] for t in r["conversations"]] == [t["from"] for t in rec["conversations"]]
    # LLaVA's preprocessing moves a trailing <image> to lead the first turn; so does the import
    assert rows[1]["conversations"][0]["value"] == "<image>\nDescribe the image in detail."
    again = import_llava_json(path, d / "set" / "images", d / "again", shard_size=1000)
    uids = pq.read_table(d / "again" / "part-00000.parquet", columns=["id", "uid"]).to_pylist()
    assert uids == [{"id": r["id"], "uid": r["uid"]} for r in rows] and again["prompt_version"]


def test_imported_shards_export_back_and_feed_the_trainer(imported):
    from trainer.data import shard_files

    _, d, _ = imported
    parts = sorted((d / "out").glob("part-*.parquet"))
    assert shard_files(d / "out") == parts  # the trainer's loader takes them as they are
    export_llava_json([d / "out"], d / "back" / "llava.json")  # the folder reads as a stage
    back = {r["id"]: r for r in json.loads((d / "back" / "llava.json").read_text())}
    rows = {r["id"]: r for p in parts for r in pq.read_table(p).to_pylist()}
    assert back.keys() == rows.keys()
    for sid, r in rows.items():
        assert back[sid]["conversations"] == [{"from": t["from"], "value": t["value"]} for t in r["conversations"]]
        assert (d / "back" / back[sid]["image"]).read_bytes() == r["image"]


def test_the_cli_and_its_errors(imported, tmp_path):
    path, d, _ = imported
    runner = CliRunner()
    ok = runner.invoke(
        app, ["import", "llava-json", str(path), "--images", str(d / "set" / "images"), "--out", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["out"] > 0
    again = runner.invoke(
        app, ["import", "llava-json", str(path), "--images", str(d / "set" / "images"), "--out", str(tmp_path / "o")]
    )
    assert again.exit_code != 0 and "already holds shards" in again.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(
        app, ["import", "llava-json", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "b")]
    )
    assert res.exit_code != 0 and str(bad) in res.output and "not JSON" in res.output
    bad.write_text('{"id": 1}')
    res = runner.invoke(
        app, ["import", "llava-json", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "b")]
    )
    assert res.exit_code != 0 and "a list of samples" in res.output


def test_repeated_ids_never_collide_with_ids_the_file_has(tmp_path):
    from curation.fixtures.sources import encode_png

    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "x.png").write_bytes(encode_png())
    turn = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]
    recs = [{"id": i, "image": "x.png", "conversations": turn} for i in ("a", "a", "a-1", 7, 7)]
    (tmp_path / "s.json").write_text(json.dumps(recs))
    import_llava_json(tmp_path / "s.json", tmp_path / "i", tmp_path / "o")
    ids = pq.read_table(tmp_path / "o" / "part-00000.parquet").column("id").to_pylist()
    assert ids == ["a", "a-2", "a-1", "7", "7-1"]
