"""`curate export webdataset` and `curate export datasets`: shards that webdataset and Hugging Face datasets read back,
images byte for byte as ingest stored them, each sample's lineage beside it."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from curation.cli import app
from schemas import Balanced, Caption, Deduped, Image, Instruction, arrow_schema
from schemas.rundir import RunDir

# nothing from a hub: datasets (imported in the tests) only reads local Parquet here
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey"]


def _jpeg(color: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _stage(run: Path, name: str, op: str, after: list[str], model, parts: dict[str, list[dict]], version="3"):
    d = run / name
    d.mkdir(parents=True)
    for part, rows in parts.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(model)), d / f"{part}.parquet")
    manifest = {"stage": name, "op": op, "op_version": version, "after": after, "params": {}, "status": "complete"}
    (d / "_manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def run(tmp_path) -> Path:
    """A small run dir by hand: ingest (2 parts) -> dedup -> balance -> recaption, and two instruct stages."""
    run = tmp_path / "run"
    images = {
        f"part-{p:05d}": [
            {
                "uid": f"{p}{i:015x}",
                "url": f"http://127.0.0.1/{p}/{i}.jpg",
                "caption": None if i == 1 else f"a {COLORS[p * 5 + i]} square",
                "sha256": f"{p * 5 + i:064x}",
                "width": 40,
                "height": 30,
                "original_width": 400,
                "original_height": 300,
                "image": _jpeg(COLORS[p * 5 + i]),
            }
            for i in range(5 if p == 0 else 4)
        ]
        for p in range(2)
    }
    _stage(run, "ingest", "ingest", [], Image, images, version="1")
    kept = {p: [r for r in rows if r["uid"][-1] != "3"] for p, rows in images.items()}  # dedup drops one per part
    dedup = {
        p: [{"uid": r["uid"], "phash": "0" * 16, "dup_group": r["uid"], "dup_count": 1} for r in rs]
        for p, rs in kept.items()
    }
    _stage(run, "dedup", "dedup", ["ingest"], Deduped, dedup, version="2")
    balance = {
        p: [{"uid": r["uid"], "vocab": "v1", "concept_ids": [i], "sample_weight": 0.5 + i} for i, r in enumerate(rs)]
        for p, rs in kept.items()
    }
    _stage(run, "balance", "balance", ["dedup"], Balanced, balance, version="2")
    recaption = {
        p: [
            {
                "uid": r["uid"],
                "recaption": f"recaption of {r['uid']}",
                "recaption_lang": "en",
                "recaption_model": "rules",
                "recaption_prompt_version": "rp1",
            }
            for r in rs
        ]
        for p, rs in kept.items()
    }
    _stage(run, "recaption", "recaption", ["balance"], Caption, recaption, version="1")
    for kind in ("conversation", "detail"):
        rows = {
            p: [
                {
                    "id": f"{r['uid']}-{kind}",
                    "uid": r["uid"],
                    "kind": kind,
                    "conversations": [
                        {"from": "human", "value": f"<image>\nDescribe it ({kind})."},
                        {"from": "gpt", "value": f"It is {r['caption']}."},
                    ],
                    "model": f"llm-{kind}",
                    "prompt_version": f"pv-{kind}",
                    "source": "generated",
                }
                for r in rs
            ]
            for p, rs in kept.items()
        }
        _stage(run, kind, "instruct", ["balance", "recaption"], Instruction, rows, version="2")
    return run


def _curate(*args: str) -> dict:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _ingest(run: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in RunDir(run).read("ingest", ["url", "caption", "sha256", "image"]).to_pylist()}


def _read_webdataset(out: Path) -> list[dict]:
    """Every sample of the export, shard by shard, through webdataset's own reader (images decoded too)."""
    import webdataset as wds

    tars = sorted(out.glob("*.tar"))
    raw = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False))
    decoded = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["__key__"] for s in raw] == [s["__key__"] for s in decoded]
    for s, d in zip(raw, decoded, strict=True):
        assert s["__key__"] == json.loads(s["json"])["key"]
        s["pil"] = d["jpg"]
    return raw


def _check_shards(out: Path, shard_size: int, samples: list[dict]) -> None:
    """Every tar holds shard_size samples (the last one fewer), and its Parquet beside it holds their json fields."""
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))]
    sizes = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
            records = [json.loads(tf.extractfile(m).read()) for m in members if m.name.endswith(".json")]
        assert {m.name.rsplit(".", 1)[1] for m in members} == {"jpg", "txt", "json"}
        assert pq.read_table(tar.with_suffix(".parquet")).to_pylist() == records
        sizes.append(len(records))
    assert all(n == shard_size for n in sizes[:-1]) and 0 < sizes[-1] <= shard_size
    assert sum(sizes) == len(samples)


def test_webdataset_of_a_run_dir_holds_every_instruct_stage_with_lineage(run, tmp_path):
    out = tmp_path / "wds"
    res = _curate("export", "webdataset", str(run), "--out", str(out), "--shard-size", "3")
    samples = _read_webdataset(out)
    instructions = RunDir(run).read("conversation", ["id"]).num_rows + RunDir(run).read("detail", ["id"]).num_rows
    assert res["samples"] == len(samples) == instructions == 14 and res["shards"] == 5
    _check_shards(out, 3, samples)
    ingest = _ingest(run)
    weights = {r["uid"]: r["sample_weight"] for r in RunDir(run).read("balance", ["sample_weight"]).to_pylist()}
    for s in samples:
        meta = json.loads(s["json"])
        kind = meta["kind"]
        src = ingest[meta["uid"]]
        assert s["__key__"] == meta["id"] == f"{meta['uid']}-{kind}" and meta["stage"] == kind
        assert s["jpg"] == src["image"]  # the bytes ingest stored, not re-encoded
        assert s["pil"].size == (40, 30) and s["txt"].decode() == (src["caption"] or "")  # the alt-text
        assert (meta["url"], meta["sha256"], meta["caption"]) == (src["url"], src["sha256"], src["caption"])
        assert (meta["model"], meta["prompt_version"], meta["source"]) == (f"llm-{kind}", f"pv-{kind}", "generated")
        assert meta["conversations"][1] == {"from": "gpt", "value": f"It is {src['caption']}."}
        assert meta["sample_weight"] == weights[meta["uid"]] and meta["recaption_model"] == "rules"
        assert meta["stages"] == [
            {"stage": "ingest", "op": "ingest", "op_version": "1"},
            {"stage": "dedup", "op": "dedup", "op_version": "2"},
            {"stage": "balance", "op": "balance", "op_version": "2"},
            {"stage": "recaption", "op": "recaption", "op_version": "1"},
            {"stage": kind, "op": "instruct", "op_version": "2"},
        ]


def test_webdataset_of_an_image_stage_is_one_sample_per_image(run, tmp_path):
    out = tmp_path / "wds"
    _curate("export", "webdataset", str(run), "--stage", "balance", "--out", str(out), "--shard-size", "4")
    samples = _read_webdataset(out)
    _check_shards(out, 4, samples)
    ingest = _ingest(run)
    balance = RunDir(run).read("balance", ["sample_weight"]).to_pylist()
    assert [s["__key__"] for s in samples] == [r["uid"] for r in balance] and len(samples) == 7
    for s, row in zip(samples, balance, strict=True):
        meta = json.loads(s["json"])
        assert s["jpg"] == ingest[row["uid"]]["image"] and meta["sample_weight"] == row["sample_weight"]
        assert "conversations" not in meta and "model" not in meta and "recaption" not in meta
        assert [st["stage"] for st in meta["stages"]] == ["ingest", "dedup", "balance"]
        assert PILImage.open(io.BytesIO(s["jpg"])).tobytes() == s["pil"].tobytes()


def _load(out: Path, tmp_path: Path):
    import datasets

    files = sorted(str(f) for f in out.glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_datasets_load_images_as_image_features(run, tmp_path):
    import datasets

    ingest = _ingest(run)
    out = tmp_path / "hf-instruct"
    res = _curate("export", "datasets", str(run / "conversation"), "--out", str(out))
    assert res["out"] == str(out) and (res["shards"], res["samples"]) == (2, 7)
    assert res["manifest"] == str(tmp_path / "hf-instruct.mixture.parquet")
    ds = _load(out, tmp_path)
    assert ds.features["image"] == datasets.Image()
    assert ds.features["conversations"] == datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")}
    )
    assert len(ds) == 7
    for row in ds:
        src = ingest[row["uid"]]
        assert isinstance(row["image"], PILImage.Image) and row["image"].size == (40, 30)
        assert row["image"].tobytes() == PILImage.open(io.BytesIO(src["image"])).tobytes()
        assert row["conversations"][0]["from"] == "human" and row["model"] == "llm-conversation"
        assert row["stages"][-1] == {"stage": "conversation", "op": "instruct", "op_version": "2"}
    raw = ds.cast_column("image", datasets.Image(decode=False))
    assert all(r["image"]["bytes"] == ingest[r["uid"]]["image"] for r in raw)

    out = tmp_path / "hf-images"
    _curate("export", "datasets", str(run), "--stage", "recaption", "--out", str(out))
    ds = _load(out, tmp_path)
    assert ds.features["image"] == datasets.Image() and len(ds) == 7
    assert "conversations" not in ds.features and ds[0]["recaption"] == f"recaption of {ds[0]['uid']}"
    assert ds[0]["image"].tobytes() == PILImage.open(io.BytesIO(ingest[ds[0]["uid"]]["image"])).tobytes()


def test_llava_json_export_still_reads_images_from_ingest(run, tmp_path):
    out = tmp_path / "llava" / "llava.json"
    res = _curate("export", "llava-json", str(run), "--out", str(out))
    records = json.loads(out.read_text())
    assert res["samples"] == len(records) == 14 and res["images_written"] == 7
    ingest = _ingest(run)
    for r in records:
        assert (out.parent / r["image"]).read_bytes() == ingest[r["id"].split("-")[0]]["image"]


def test_a_regenerate_part_exports_with_the_images_of_its_source(run, tmp_path):
    """A `curate regenerate` out dir: no `after`; each part's marker names the image shard it was made from."""
    regen = tmp_path / "v2"
    (regen / "_parts" / "process").mkdir(parents=True)
    pq.write_table(pq.read_table(run / "detail" / "part-00001.parquet"), regen / "part-00000.parquet")
    source = run / "balance" / "part-00001.parquet"
    (regen / "_parts" / "process" / "part-00000.json").write_text(json.dumps({"source": str(source)}))
    (regen / "_manifest.json").write_text(json.dumps({"op": "instruct", "params": {}, "status": "complete"}))
    out = tmp_path / "wds"
    _curate("export", "webdataset", str(regen), "--out", str(out))
    samples = _read_webdataset(out)
    ingest = _ingest(run)
    assert len(samples) == pq.read_metadata(source).num_rows == 3
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == ingest[meta["uid"]]["image"] and meta["url"] == ingest[meta["uid"]]["url"]
        assert [(st["stage"], st["op_version"]) for st in meta["stages"]] == [
            ("ingest", "1"),
            ("dedup", "2"),
            ("balance", "2"),
            ("v2", None),  # regenerate's manifest has no op_version
        ]
    res = _curate("export", "llava-json", str(regen), "--out", str(tmp_path / "llava.json"))
    assert res["samples"] == 3 and res["images_written"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["webdataset", "{run}", "--stage", "nope"], "no stage 'nope'"),
        (["webdataset", "{run}/balance", "--stage", "balance"], "--stage names stages of a run dir"),
        (["webdataset", "{run}", "--shard-size", "0"], "--shard-size must be at least 1"),
        (["datasets", "{run}/balance", "{run}/conversation"], "have different columns"),
        (["datasets", "{run}/dedup/part-00000.parquet"], "no uid, image"),
        (["webdataset", "{run}/nothing-here"], "No such file or directory"),
    ],
)
def test_export_errors_are_one_line(run, tmp_path, args, message):
    if "no uid, image" in message:  # a loose copy of a thin table: neither the file nor a run dir has the image
        loose = tmp_path / "loose.parquet"
        pq.write_table(pq.read_table(run / "dedup" / "part-00000.parquet").drop_columns(["uid"]), loose)
        args = [args[0], str(loose)]
    res = CliRunner().invoke(app, ["export", *[a.format(run=run) for a in args], "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


def test_export_refuses_a_folder_with_shards(run, tmp_path):
    out = tmp_path / "wds"
    _curate("export", "webdataset", str(run / "detail"), "--out", str(out))
    assert len(list(out.glob("*.tar"))) == 1  # default shard size: 10,000 samples
    res = CliRunner().invoke(app, ["export", "webdataset", str(run / "detail"), "--out", str(out)])
    assert res.exit_code == 2 and "already holds shards" in res.stderr


def test_demo_run_exports(demo_run, tmp_path):
    """The real demo DAG's run dir: every instruct stage to WebDataset, the balanced images to datasets."""
    import datasets

    run, _ = demo_run
    rd = RunDir(run)
    instruct = [
        d.name
        for d in sorted(run.iterdir())
        if (d / "_manifest.json").exists() and json.loads((d / "_manifest.json").read_text())["op"] == "instruct"
    ]
    res = _curate("export", "webdataset", str(run), "--out", str(tmp_path / "wds"), "--shard-size", "100")
    samples = _read_webdataset(tmp_path / "wds")
    assert res["samples"] == len(samples) == sum(rd.read(s, ["id"]).num_rows for s in instruct) > 0
    _check_shards(tmp_path / "wds", 100, samples)
    ingest = _ingest(run)
    versions = {
        d.name: json.loads((d / "_manifest.json").read_text())["op_version"] for d in run.iterdir() if d.is_dir()
    }
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == ingest[meta["uid"]]["image"] and meta["stage"] in instruct
        assert {st["stage"]: st["op_version"] for st in meta["stages"]} == {
            st["stage"]: str(versions[st["stage"]]) for st in meta["stages"]
        }
        assert {"ingest", "balance", "recaption", meta["stage"]} <= {st["stage"] for st in meta["stages"]}
        assert meta["model"] and meta["prompt_version"] and meta["conversations"][0]["from"] == "human"

    _curate("export", "datasets", str(run), "--stage", "balance", "--out", str(tmp_path / "hf"))
    ds = _load(tmp_path / "hf", tmp_path)
    assert ds.features["image"] == datasets.Image() and len(ds) == rd.read("balance", ["uid"]).num_rows
    first = ds[0]
    assert first["image"].tobytes() == PILImage.open(io.BytesIO(ingest[first["uid"]]["image"])).tobytes()
