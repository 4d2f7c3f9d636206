"""Mixture manifests and specs: `curate export llava-json` writes the exact samples (ids and content hashes) of what
it wrote, draws a seeded mixture from a spec like LLaVA-NeXT's, and rebuilds a manifest bit for bit or says why not."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curation.cli import app
from schemas.mixture import read_manifest, sample_hash
from tests.test_exports import run  # noqa: F401 - the hand-made run dir: two instruct stages of 7 samples


def _export(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["export", "llava-json", *map(str, args)])
    return res.exit_code, res.stdout if res.exit_code == 0 else res.stderr


def _spec(path, seed, datasets) -> object:
    path.write_text(json.dumps({"seed": seed, "datasets": datasets}))  # JSON is YAML
    return path


def test_export_writes_each_sample_id_and_content_hash(run, tmp_path):  # noqa: F811
    out = tmp_path / "a" / "data.json"
    code, msg = _export(run, "--out", out)
    assert code == 0, msg
    records = json.loads(out.read_text())
    table, summary = read_manifest(tmp_path / "a" / "data.mixture.parquet")
    assert table.column("id").to_pylist() == [r["id"] for r in records] and summary["samples"] == 14
    first = records[0]
    image = (out.parent / first["image"]).read_bytes()
    assert table.column("sample_hash")[0].as_py() == sample_hash(first["id"], first["conversations"], image)
    assert summary["digest"] == json.loads(msg)["digest"]


def test_a_seeded_spec_draws_counts_and_ratios_the_same_way_every_time(run, tmp_path):  # noqa: F811
    datasets = [
        {"path": str(run / "conversation"), "sampling_strategy": "random:3"},
        {"path": "run/detail", "sampling_strategy": "first:50%"},  # relative to the spec file
    ]
    spec = _spec(tmp_path / "mix.yaml", 7, datasets)
    outs = []
    for name in ("x", "y"):
        code, msg = _export("--mixture", spec, "--out", tmp_path / name / "data.json")
        assert code == 0, msg
        outs.append(tmp_path / name / "data.json")
    assert outs[0].read_bytes() == outs[1].read_bytes()
    table, summary = read_manifest(tmp_path / "x" / "data.mixture.parquet")
    ids = table.column("id").to_pylist()
    assert sum(i.endswith("-conversation") for i in ids) == 3 and sum(i.endswith("-detail") for i in ids) == 4
    detail = sorted(pq.read_table(run / "detail", columns=["id"]).column("id").to_pylist())  # parts in order
    assert sorted(i for i in ids if i.endswith("-detail")) == detail[:4]
    assert [s["selected"] for s in summary["sources"]] == [3, 4] and summary["spec"]["seed"] == 7
    other = set()
    for seed in range(8):  # another seed draws other samples (3 of 7: 35 ways)
        _export("--mixture", _spec(tmp_path / "m2.yaml", seed, datasets[:1]), "--out", tmp_path / "z" / "d.json")
        other.add(tuple(read_manifest(tmp_path / "z" / "d.mixture.parquet")[0].column("id").to_pylist()))
    assert len(other) > 1


def test_a_manifest_rebuilds_the_same_data_set_or_says_what_changed(run, tmp_path):  # noqa: F811
    spec = _spec(tmp_path / "mix.yaml", 1, [{"path": "run", "sampling_strategy": "random:40%"}])
    assert _export("--mixture", spec, "--out", tmp_path / "a" / "data.json")[0] == 0
    manifest = tmp_path / "a" / "data.mixture.parquet"
    code, msg = _export("--mixture", manifest, "--out", tmp_path / "b" / "data.json")
    assert code == 0, msg
    assert (tmp_path / "a" / "data.json").read_bytes() == (tmp_path / "b" / "data.json").read_bytes()
    assert read_manifest(manifest)[1]["digest"] == json.loads(msg)["digest"]

    chosen = read_manifest(manifest)[0].column("id")[0].as_py()
    stage = run / chosen.split("-")[1]
    part = next(f for f in sorted(stage.glob("part-*.parquet")) if chosen in pq.read_table(f)["id"].to_pylist())
    t = pq.read_table(part)
    convs = t.column("conversations").to_pylist()
    k = t.column("id").to_pylist().index(chosen)
    convs[k][1]["value"] = "edited after the export"
    pq.write_table(t.set_column(t.schema.get_field_index("conversations"), "conversations", [convs]), part)
    code, msg = _export("--mixture", manifest, "--out", tmp_path / "c" / "data.json")
    assert code == 2 and f"sample {chosen} changed since the manifest" in msg and "\n" not in msg.strip(), msg


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ([{"path": "run/detail", "sampling_strategy": "first:8"}], "first:8 asks for 8 samples and it has 7"),
        ([{"path": "run/detail", "sampling_strategy": "some:3"}], "expected all, first:N, end:N or random:N"),
        ([{"path": "run/detail"}, {"path": "run", "sampling_strategy": "end:1"}], "is in both run/detail and run"),
        ([{"path": "run/nothing"}], "datasets.0.path run/nothing: no such file or directory"),
    ],
)
def test_bad_specs_fail_on_one_line(run, tmp_path, datasets, message):  # noqa: F811
    code, msg = _export("--mixture", _spec(tmp_path / "mix.yaml", 0, datasets), "--out", tmp_path / "d.json")
    assert code == 2 and message in msg, msg
    assert len(msg.strip().splitlines()) == 1


def test_spec_and_shards_together_are_refused(run, tmp_path):  # noqa: F811
    spec = _spec(tmp_path / "mix.yaml", 0, [{"path": "run/detail"}])
    code, msg = _export(run, "--mixture", spec, "--out", tmp_path / "d.json")
    assert code == 2 and "not both" in msg


def test_webdataset_and_datasets_exports_take_a_mixture_and_write_its_manifest(run, tmp_path):  # noqa: F811
    import webdataset as wds

    spec = _spec(tmp_path / "mix.yaml", 3, [{"path": "run/detail", "sampling_strategy": "random:4"}])
    res = CliRunner().invoke(app, ["export", "webdataset", "--mixture", str(spec), "--out", str(tmp_path / "wds")])
    assert res.exit_code == 0, res.output
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "wds" / "00000.tar"), shardshuffle=False)]
    table, summary = read_manifest(tmp_path / "wds.mixture.parquet")  # beside the shards, not among them
    assert table.column("id").to_pylist() == keys and len(keys) == 4 and summary["spec"]["seed"] == 3
    res = CliRunner().invoke(
        app, ["export", "datasets", "--mixture", str(tmp_path / "wds.mixture.parquet"), "--out", str(tmp_path / "hf")]
    )
    assert res.exit_code == 0, res.output
    hf = pq.read_table(sorted((tmp_path / "hf").glob("*.parquet")))  # the same samples again, in the same order
    assert hf.column("key").to_pylist() == keys and json.loads(res.stdout)["digest"] == summary["digest"]
    assert not list((tmp_path / "hf").glob("*mixture*"))


def test_an_image_stage_export_hashes_images_alone(run, tmp_path):  # noqa: F811
    res = CliRunner().invoke(app, ["export", "datasets", str(run), "--stage", "balance", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    table, _ = read_manifest(tmp_path / "b.mixture.parquet")
    images = {
        r["key"]: r["image"]["bytes"]
        for f in sorted((tmp_path / "b").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    }
    assert table.num_rows == len(images) == 7
    assert all(
        h == sample_hash(i, [], images[i]) for i, h in zip(table["id"].to_pylist(), table["sample_hash"].to_pylist())
    )
