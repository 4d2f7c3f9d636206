"""The training loop on tiny models: exact resume, stage parameters, packed vs padded, learning sanity, logs."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from schemas import ImageInstruction, Instruction, RowContractError, TrainSequence, arrow_schema
from schemas.mixture import read_manifest, sample_hash
from trainer.config import ConfigError, load_config
from trainer.data import InstructionLoader
from trainer.model import LlavaLite
from trainer.packed import PackedReader, resolve_shards
from trainer.tiny import CHAT_TEMPLATE, make_tiny_all
from trainer.train import load_trained, train

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 50, 220), "yellow": (240, 220, 20)}
QUESTIONS = [
    "What color is the square?",
    "What colour is the square in this picture?",
    "Look at the image. What color is the square on the white background? Answer the question using a "
    "single word or phrase.",
]
SHARD = arrow_schema(ImageInstruction)  # a shard holding its own images


def square_png(rgb, size: int = 32, seed: int = 0) -> bytes:
    """A coloured square on white, its corner moved by `seed`."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    off = seed % 8
    img.paste(Image.new("RGB", (16, 16), rgb), (4 + off, 4 + (seed // 8) % 8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, n: int, kind: str) -> Path:
    """`n` Instruction rows with their images: `chat` colour questions (stage 2) or `caption` rows (stage 1)."""
    rows = []
    names = list(COLOURS)
    for i in range(n):
        c = names[i % len(names)]
        if kind == "chat":
            conv = [
                {"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                {"from": "gpt", "value": c.capitalize() + "."},
            ]
        else:
            conv = [
                {"from": "human", "value": "<image>\n"},
                {"from": "gpt", "value": f"A {c} square on a plain background." + " A picture." * (i % 3)},
            ]
        row = Instruction(
            id=f"{kind}-{i:04d}", uid=f"u{i}", kind=kind, conversations=conv, model="test", prompt_version="v0"
        )
        rows.append({**row.model_dump(by_alias=True), "image": square_png(COLOURS[c], seed=i)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dirs = make_tiny_all(root / "models")
    return {
        "root": root,
        "vision": str(dirs["vision"]),
        "lm": str(dirs["lm"]),
        "chat": str(write_shard(root / "data" / "chat" / "part-00000.parquet", 48, "chat")),
        "caption": str(write_shard(root / "data" / "caption" / "part-00000.parquet", 24, "caption")),
    }


def cfg(env, out, **kw):
    base = {
        "stage": 2,
        "shards": [env["chat"]],
        "vision": env["vision"],
        "lm": env["lm"],
        "out": str(out),
        "max_len": 128,
        "rows_per_step": 2,
        "log_every": 1,
        "checkpoint_every": 2,
        "seed": 3,
        "lr": 1e-3,
    }
    return load_config(None, {**base, **kw})


def log(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_config_defaults_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: 1\nshards: [a]\nout: o\n")
    c = load_config(p)
    assert (c.template, c.lr, c.max_len, c.packing) == ("plain", 1e-3, 4096, True)
    c2 = load_config(p, ["stage=2", "max_len=512"])
    assert (c2.template, c2.lr, c2.max_len) == ("chat", 2e-5, 512)
    with pytest.raises(ConfigError, match="bogus"):
        load_config(p, ["bogus=1"])


def test_stop_and_resume_is_exact(env, tmp_path):
    full = train(cfg(env, tmp_path / "full", max_steps=6))
    part = train(cfg(env, tmp_path / "resumed", max_steps=6), stop_after=3)  # killed after step 3 (ckpt at 2)
    assert not part["finished"] and (tmp_path / "resumed" / "checkpoints" / "step-2").is_dir()
    rest = train(cfg(env, tmp_path / "resumed", max_steps=6))
    assert rest["resumed_from"] == 2 and full["finished"] and rest["finished"]
    a, b = log(tmp_path / "full"), log(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # step 3's line from the killed run was redone once
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    fa = load_file(str(tmp_path / "full" / "final" / "trainable.safetensors"))
    fb = load_file(str(tmp_path / "resumed" / "final" / "trainable.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # the final folder rebuilds through from_parts
    model = load_trained(tmp_path / "full")
    assert torch.equal(model.projector.linear_1.weight, fa["projector.linear_1.weight"])


def _params(model: LlavaLite) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_stage_parameters(env, tmp_path):
    base = _params(LlavaLite.from_parts(env["vision"], env["lm"], seed=3))
    s1 = train(cfg(env, tmp_path / "s1", stage=1, shards=[env["caption"]], max_steps=2, lr=1e-2))
    assert s1["packing"]["template"] == "plain"
    m1 = _params(load_trained(tmp_path / "s1"))
    changed = {n.split(".")[0] for n in base if not torch.equal(base[n], m1[n])}
    assert changed == {"projector"}
    s2 = train(cfg(env, tmp_path / "s2", stage=2, max_steps=2, init_from=str(tmp_path / "s1")))
    assert s2["init_loaded"] and all(k.startswith("projector.") for k in s2["init_loaded"])
    m2 = _params(load_trained(tmp_path / "s2"))
    changed2 = {n.split(".")[0] for n in base if not torch.equal(m1[n], m2[n])}
    assert changed2 == {"projector", "lm"}
    assert all(torch.equal(base[n], m2[n]) for n in base if n.startswith("vision."))


def test_packed_vs_padded_same_loss_less_waste(env, tmp_path):
    # one step covers every sample in both modes: the step-0 loss is the same mean token loss
    packed = train(cfg(env, tmp_path / "packed", max_steps=1, rows_per_step=48, packing=True))
    padded = train(cfg(env, tmp_path / "padded", max_steps=1, rows_per_step=48, packing=False))
    rp, rq = packed["packing"], padded["packing"]
    assert rp["samples"] == rq["samples"] == 48 and rp["rows"] < rq["rows"] == 48
    assert len(PackedReader(tmp_path / "packed" / "packed")) == rp["rows"]
    a, b = log(tmp_path / "packed")[0], log(tmp_path / "padded")[0]
    assert a["label_tokens"] == b["label_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert a["padding_waste"] < b["padding_waste"]


@pytest.mark.parametrize("packing", [True, False])
def test_build_packed_streams_across_files(env, tmp_path, monkeypatch, packing):
    """Small packed files and spill buffers: every packed row is what an in-memory assembly of pack()'s order
    gives, each sample exactly once, no spill left behind."""
    from collections import Counter

    from transformers import AutoTokenizer

    import trainer.packed as tp
    from trainer.pack import pack

    monkeypatch.setattr(tp, "ROWS_PER_FILE", 5)
    monkeypatch.setattr(tp, "FILE_BYTES", 7 * 1000)  # samples here weigh ~300-500 bytes of tokens + a ~100-byte PNG
    monkeypatch.setattr(tp, "SPILL_BYTES", 3 * 1000)
    tok = AutoTokenizer.from_pretrained(env["lm"])
    shards = [env["chat"], env["caption"]]
    rep = tp.build_packed(shards, tmp_path / "p", tok, "chat", 16, 128, packing=packing)
    files = tp.resolve_shards(shards)
    samples = list(tp.encoded(files, tok, "chat", 16, 128, None, Counter()))
    by_id = {s["id"]: s for s in samples}
    if packing:
        res = pack([s["id"] for s in samples], [len(s["input_ids"]) for s in samples], 128)
        want = [res.ids[a:b].tolist() for a, b in zip(res.offsets[:-1], res.offsets[1:])]
    else:
        want = [[s["id"]] for s in samples]
    got = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "p").glob("packed-*.parquet"))]).to_pylist()
    assert len(sorted((tmp_path / "p").glob("packed-*.parquet"))) >= max(-(-len(want) // 5), 72 // 7 // 2) > 1
    assert not list((tmp_path / "p").glob("spill-*")) and rep["rows"] == len(got) == len(want)
    assert [r["sample_ids"] for r in got] == want and rep["samples"] == len(samples) == 72
    for r in got:
        q = [by_id[i] for i in r["sample_ids"]]
        assert r["lengths"] == [len(s["input_ids"]) for s in q]
        assert r["input_ids"] == [t for s in q for t in s["input_ids"]]
        assert r["labels"] == [t for s in q for t in s["labels"]]
        assert r["images"] == [b for s in q for b in s["images"]]
    assert rep["longest_row"] == max(sum(r["lengths"]) for r in got) <= 128
    mixture, summary = read_manifest(tmp_path / "p" / "mixture.parquet")  # every sample packed, in training order
    rows = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    assert mixture.column("id").to_pylist() == [i for w in want for i in w] and summary["samples"] == 72
    assert mixture.column("sample_hash").to_pylist() == [
        sample_hash(i, rows[i]["conversations"], rows[i]["image"]) for i in mixture.column("id").to_pylist()
    ]
    assert rep["mixture_digest"] == summary["digest"] and set(mixture.column("source").to_pylist()) == set(
        map(str, files)
    )
    for f in (tmp_path / "p").glob("packed-*.parquet"):  # the contract's (Parquet's list item name aside)
        schema = pq.ParquetFile(f).schema_arrow
        assert schema == arrow_schema(TrainSequence) and schema.metadata[b"row_model"] == b"TrainSequence"
    weight = {s["id"]: 8 * len(s["input_ids"]) + sum(map(len, s["images"])) for s in samples}
    most = max(sum(weight[i] for i in w) for w in want)
    for f in (tmp_path / "p").glob("packed-*.parquet"):  # what one file's assembly holds in memory is bounded
        t = pq.read_table(f, columns=["sample_ids"])
        assert t.num_rows <= 5 and sum(weight[i] for x in t["sample_ids"].to_pylist() for i in x) < 7000 + most


def test_inputs_and_packed_files_follow_the_contract(env, tmp_path):
    """A shard or packed file missing a contract column fails naming both; packed files from before the
    contract (nullable columns) stay readable."""
    bad = tmp_path / "bad" / "part-00000.parquet"
    bad.parent.mkdir()
    pq.write_table(pq.read_table(env["chat"]).drop_columns(["image"]), bad)
    match = re.escape(f"{bad}: missing columns ['image'] of TrainSample")
    with pytest.raises(RowContractError, match=match):
        resolve_shards([bad.parent])
    with pytest.raises(RowContractError, match=match):
        InstructionLoader(bad, None, None, "chat", 16)
    with pytest.raises(RowContractError, match=match):
        train(cfg(env, tmp_path / "o", shards=[str(bad)], max_steps=1))
    old = pa.schema(  # the packed files' hand-written schema before TrainSequence
        [
            ("seq_id", pa.string()),
            ("sample_ids", pa.list_(pa.string())),
            ("lengths", pa.list_(pa.int32())),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("images", pa.list_(pa.binary())),
        ]
    )
    row = {"seq_id": "seq-00000001", "sample_ids": ["a"], "lengths": [2], "input_ids": [5, 6], "labels": [-100, 6]}
    d = tmp_path / "old"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{**row, "images": [b"x"]}], schema=old), d / "packed-00000.parquet")
    assert PackedReader(d, shuffle=False).next_rows(1) == [{**row, "images": [b"x"], "epoch": 0}]
    pq.write_table(pa.Table.from_pylist([row]), d / "packed-00001.parquet")
    with pytest.raises(RowContractError, match=re.escape("packed-00001.parquet: missing columns ['images'] of Train")):
        PackedReader(d)


def test_run_dir_parts_read_the_image_by_uid(env, tmp_path):
    """An instruct stage's parts hold no image: the packed build and the loader (row groups, exact resume) read it by
    uid from the source stage, as from a shard holding its own; a part whose image no stage before it wrote fails
    naming the file."""
    from transformers import AutoImageProcessor, AutoTokenizer

    import trainer.packed as tp

    full, run, own = pq.read_table(env["chat"]), tmp_path / "run", tmp_path / "own"
    for stage, after in (("ingest", []), ("chat", ["ingest"]), ("orphan", [])):
        (run / stage).mkdir(parents=True)
        (run / stage / "_manifest.json").write_text(json.dumps({"op": stage, "after": after}))
    own.mkdir()
    for p, rows in enumerate((full.slice(0, 30), full.slice(30))):
        name = f"part-{p:05d}.parquet"
        pq.write_table(rows.select(["uid", "image"]).take(list(range(rows.num_rows))[::-1]), run / "ingest" / name)
        kept = rows.filter(pa.array([i % 7 != 3 for i in range(rows.num_rows)]))  # a later stage: a subset
        pq.write_table(kept.drop_columns(["image"]), run / "chat" / name, row_group_size=4)
        pq.write_table(kept, own / name, row_group_size=4)
    tok = AutoTokenizer.from_pretrained(env["lm"])
    reports = [tp.build_packed([d], tmp_path / d.name / "p", tok, "chat", 16, 128) for d in (run / "chat", own)]
    a, b = ({k: v for k, v in r.items() if k != "key"} for r in reports)
    got = [pa.concat_tables(map(pq.read_table, sorted((tmp_path / n / "p").glob("packed-*")))) for n in ("chat", "own")]
    assert a == b and a["samples"] == 48 - 7 and got[0].equals(got[1])
    proc = AutoImageProcessor.from_pretrained(env["vision"])

    def loader(src):
        return InstructionLoader(src, tok, proc, "chat", 16, seed=1, shuffle_buffer=6, batch_rows=3)

    want = {s["id"]: s["pixel_values"] for s in loader(own)}
    first = loader(run / "chat")
    it = iter(first)
    head = [next(it)["id"] for _ in range(10)]
    resumed = loader(run / "chat")
    resumed.load_state(first.state())
    rest = list(resumed)
    assert head + [s["id"] for s in rest] == list(want) and [s["id"] for s in it] == [s["id"] for s in rest]
    assert all(torch.equal(s["pixel_values"], want[s["id"]]) for s in rest)
    orphan = run / "orphan" / "part-00000.parquet"
    shutil.copy(run / "chat" / "part-00000.parquet", orphan)
    with pytest.raises(RowContractError, match=re.escape(f"{orphan}: missing columns ['image'] of TrainSample")):
        resolve_shards([orphan])


def test_log_fields_and_rejects(env, tmp_path):
    bad = write_shard(tmp_path / "bad" / "part-00000.parquet", 4, "chat")
    t = pq.read_table(bad).to_pylist()
    t[0]["conversations"][1]["value"] = " "  # empty reply: no_labels
    t[1]["conversations"][0]["value"] = "<image>\n" + "word " * 200  # too_long at max_len 128
    pq.write_table(pa.Table.from_pylist(t, schema=SHARD), bad)
    s = train(cfg(env, tmp_path / "o", shards=[str(bad)], max_steps=2))
    assert s["packing"]["rejects"] == {"no_labels": 1, "too_long": 1} and s["packing"]["samples"] == 2
    for rec in log(tmp_path / "o"):
        for k in (
            "step",
            "loss",
            "lr",
            "tokens_per_s",
            "useful_tokens_per_s",
            "padding_waste",
            "useful_ratio",
            "samples_per_s",
        ):
            assert rec[k] is not None, k


@pytest.mark.slow
def test_loss_goes_down_and_job_entrypoint(env, tmp_path):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(
        json.dumps(
            {
                "stage": 2,
                "shards": [str(Path(env["chat"]).parent)],
                "vision": env["vision"],
                "lm": env["lm"],
                "out": str(tmp_path / "o"),
                "max_len": 128,
                "rows_per_step": 2,
                "log_every": 1,
                "checkpoint_every": 10,
                "lr": 3e-3,
                "warmup_steps": 3,
                "seed": 0,
            }
        )
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), str(yaml_path), "--set", "max_steps=30"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [rec["loss"] for rec in log(tmp_path / "o")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_curate_train_then_export_hf(env, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from typer.testing import CliRunner

    from curation.cli import app

    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(
        json.dumps(
            {
                "stage": 2,
                "shards": [str(Path(env["chat"]).parent)],
                "vision": env["vision"],
                "lm": env["lm"],
                "out": str(tmp_path / "o"),
                "max_len": 128,
                "rows_per_step": 2,
            }
        )
    )
    res = CliRunner().invoke(app, ["train", str(yaml_path), "--set", "max_steps=2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", "hf", str(tmp_path / "o"), "--to", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.config.vision_feature_layer == -2 and hf.config.image_token_index == 3
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == CHAT_TEMPLATE  # the run's own template
    # a stage-1 run (plain template) exports the plain chat template: the image, then the caption
    s1 = ["--set", "stage=1", "--set", f"shards=[{Path(env['caption']).parent}]", "--set", f"out={tmp_path / 's1'}"]
    assert CliRunner().invoke(app, ["train", str(yaml_path), "--set", "max_steps=1", *s1]).exit_code == 0
    res = CliRunner().invoke(app, ["export", "hf", str(tmp_path / "s1"), "--to", str(tmp_path / "hf1")])
    assert res.exit_code == 0, res.output
    prompt = AutoTokenizer.from_pretrained(tmp_path / "hf1").apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe the image."}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<image>"
    bad = CliRunner().invoke(app, ["train", str(yaml_path), "--set", "nonsense=1"])
    assert bad.exit_code == 2 and "nonsense" in bad.output


def test_stage1_then_stage2_on_pipeline_output(demo_run, env, tmp_path):
    """The demo DAG's caption stage feeds stage 1 and its conversation stage stage 2, images read by uid."""
    from curation.synth.parse import BRIEF_INSTRUCTIONS
    from schemas.rundir import RunDir

    run, _ = demo_run
    rows = RunDir(run).read("captions", ["uid", "conversations", "source", "model", "prompt_version", "recaption"])
    recaption = RunDir(run).read("recaption", ["recaption_model", "recaption_prompt_version"])
    assert rows.num_rows > 10 and set(rows.column("source").to_pylist()) == {"recaption"}
    assert set(rows.column("model").to_pylist()) == set(recaption.column("recaption_model").to_pylist()) == {"rules"}
    assert set(rows.column("prompt_version").to_pylist()) == set(
        recaption.column("recaption_prompt_version").to_pylist()
    )
    for turns, text in zip(rows.column("conversations").to_pylist(), rows.column("recaption").to_pylist()):
        assert (
            turns[0]["value"].split("\n", 1) in [["<image>", q] for q in BRIEF_INSTRUCTIONS]
            and turns[1]["value"] == text
        )
    s1 = train(cfg(env, tmp_path / "s1", stage=1, shards=[str(run / "captions")], max_steps=2, lr=1e-2, max_len=512))
    assert s1["finished"] and s1["packing"]["template"] == "plain" and s1["packing"]["samples"] == rows.num_rows
    s2 = train(
        cfg(
            env,
            tmp_path / "s2",
            shards=[str(run / "conversation")],
            max_steps=2,
            max_len=512,
            init_from=str(tmp_path / "s1"),
        )
    )
    assert s2["finished"] and s2["init_loaded"] and all(k.startswith("projector.") for k in s2["init_loaded"])
    assert all(math.isfinite(r["loss"]) for r in log(tmp_path / "s1") + log(tmp_path / "s2"))
    # what stage 1 trained on is what `curate export llava-json` writes of the same stage: same ids, same hashes
    from curation.export.llava_json import export_llava_json

    exported = export_llava_json([run / "captions"], tmp_path / "llava" / "captions.json")
    packed = read_manifest(tmp_path / "s1" / "packed" / "mixture.parquet")[0]
    export = read_manifest(Path(exported["manifest"]))[0]
    assert sorted(zip(*packed.select(["id", "sample_hash"]).to_pydict().values())) == sorted(
        zip(*export.select(["id", "sample_hash"]).to_pydict().values())
    )
