"""`curate eval`: short-answer questions of any instruct shard answered by greedy generation and scored."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer
from typer.testing import CliRunner

from curation.cli import app
from schemas import ImageInstruction, Instruction, arrow_schema
from trainer.config import load_config
from trainer.eval_shards import (
    eval_name,
    evaluate_shards,
    is_short,
    normalize_answer,
    questions,
    shard_list,
    shard_rows,
    trained_template,
)
from trainer.generate import generate
from trainer.tiny import make_tiny_all
from trainer.train import load_trained, train

SHARD = arrow_schema(ImageInstruction)
QUESTION = "What color is the square?"
LONG = "A red square on a plain white background, seen from above."


def png(rgb=(220, 30, 30), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, convs: list[list[tuple[str, str]]]) -> Path:
    """Rows with a red square each, one per conversation of (from, value) turns."""
    rows = []
    for i, conv in enumerate(convs):
        turns = [{"from": f, "value": v} for f, v in conv]
        row = Instruction(id=f"i{i}", uid=f"u{i}", kind="chat", conversations=turns, model="t", prompt_version="v0")
        rows.append({**row.model_dump(by_alias=True), "image": png()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD), path)
    return path


def qa(answer: str, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return [("human", f"<image>\n{QUESTION}"), ("gpt", answer), *more]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny model trained to answer "Red" to the one question, and an eval shard: "Red" (exact), "red." (only
    normalised), "Blue" (wrong), a long answer in a later turn (skipped)."""
    root = tmp_path_factory.mktemp("eval")
    parts = make_tiny_all(root / "models")
    train_dir = write(root / "train" / "part-00000.parquet", [qa("Red")] * 16).parent
    follow = ("human", "Describe the picture."), ("gpt", LONG)
    evals = write(root / "eval" / "part-00000.parquet", [qa("Red", *follow), qa("red."), qa("Blue"), qa("Red")])
    cfg = {
        "stage": 2,
        "shards": [str(train_dir)],
        "vision": str(parts["vision"]),
        "lm": str(parts["lm"]),
        "out": str(root / "out"),
        "max_len": 128,
        "rows_per_step": 2,
        "max_steps": 10,
        "lr": 3e-3,
    }
    train(load_config(None, cfg))
    return {"root": root, "out": root / "out", "eval": evals.parent, "train": train_dir, "lm": parts["lm"]}


def test_normalize_answer():
    assert normalize_answer("Two.") == normalize_answer("2") == "2"
    assert normalize_answer("  The RED square!! ") == normalize_answer("red square") == "red square"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Don't") == "dont" and normalize_answer("red/blue") == "red blue"
    assert normalize_answer("1,000 and 3.5") == "1000 and 3.5" and normalize_answer("3.") == "3"
    assert normalize_answer("There are three") == "there are 3" and normalize_answer("twenty") == "20"
    assert normalize_answer("Theme") == "theme" and normalize_answer("another") == "another"  # whole words only
    assert normalize_answer("Red") != normalize_answer("Blue")
    assert is_short("one two three four five") and not is_short("one two three four five six")
    assert not is_short("x" * 33) and is_short(" " + "x" * 32 + " ")


class Counting(nn.Module):
    """A stand-in model: each position predicts its own token + 1; records what every forward got."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.vocab, self.w, self.calls = vocab, nn.Parameter(torch.zeros(1)), []

    def forward(self, ids, pixel_values=None, seq_lens=None, image_sizes=None):
        self.calls.append((ids.shape, None if pixel_values is None else pixel_values.shape[0], seq_lens))
        return nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float(), None


def test_generate_stops_at_eos_and_respects_max_new_tokens():
    m = Counting()
    px = [torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(0, 3, 4, 4)]
    out = generate(m, [[7], [1, 2], [10, 11, 12]], px, stop_ids={9}, max_new_tokens=4, pad_id=0)
    assert out == [[8], [3, 4, 5, 6], [13, 14, 15, 0]]  # row 0 stops at 9 (not kept), the others at 4 tokens
    assert len(m.calls) == 4  # finished rows leave the batch; no call past max_new_tokens
    assert m.calls[0] == (torch.Size([3, 3]), 3, [[1], [2], [3]])  # right-padded, each row's images in order
    assert m.calls[1][1:] == (3, [[2], [3], [4]])
    assert m.calls[2][1:] == (2, [[4], [5]])  # row 0 done after its 2nd call: rows 1 and 2 and their images remain
    assert generate(m, [[1]], None, max_new_tokens=0) == [[]]
    assert generate(m, [[1]], None, stop_ids={2}) == [[]]


def test_generate_batched_equals_one_by_one(run):
    model = load_trained(run["out"])
    tok = AutoTokenizer.from_pretrained(str(run["out"] / "final" / "lm"))
    long_text = tok("What colour is the big square in the picture?")["input_ids"]
    prompts = [tok("What")["input_ids"], long_text]
    together = generate(model, prompts, None, max_new_tokens=5)
    assert [len(t) for t in together] == [5, 5]
    assert together == [generate(model, [p], None, max_new_tokens=5)[0] for p in prompts]


def test_questions_cut_the_prompt_where_the_reply_starts(run):
    tok = AutoTokenizer.from_pretrained(str(run["lm"]))
    convs = [qa("Red", ("human", "And how many squares?"), ("gpt", "One"), ("human", "Why?"), ("gpt", LONG))]
    rows = [{"id": "a", "uid": "u", "image": png(), "conversations": [{"from": f, "value": v} for f, v in convs[0]]}]
    for chat_template in (tok.chat_template, None):  # the tokenizer's template, then the Vicuna fallback
        tok.chat_template = chat_template
        skipped = Counter()
        qs = list(questions(rows, tok, "chat", 4, skipped=skipped))
        assert [(q.turn, q.type, q.answer) for q in qs] == [(1, "colour", "Red"), (3, "other", "One")]
        assert skipped == {"long_answer": 1} and qs[0].end == tok.eos_token_id
        text = tok.decode(qs[1].prompt)
        assert text.count("<image>") == 4 and "Red" in text and "One" not in text  # context: earlier turns
        want = "<s>assistant\n" if chat_template else "ASSISTANT:"
        assert text.rstrip(" ").endswith(want.rstrip(" ")), text


def test_trained_template_from_the_checkpoint(run, tmp_path):
    assert trained_template(run["out"]) == ("chat", None)
    out = tmp_path / "o"
    (out / "final").mkdir(parents=True)
    assert trained_template(out) == ("chat", None)  # nothing recorded: the default
    (out / "final" / "summary.json").write_text(json.dumps({"packing": {"template": "plain"}}))
    assert trained_template(out) == ("plain", None)
    step = out / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"config": {"template": "chat", "system": "Be brief."}}))
    (out / "checkpoints" / "latest").write_text("step-2")
    assert trained_template(out) == ("chat", "Be brief.")


def test_a_model_that_answers_right_scores_one(run):
    r = evaluate_shards(run["out"], [run["train"]], limit=6)
    assert r["questions"] == 6 and r["metrics"]["overall"] == {
        "n": 6,
        "exact": 1.0,
        "normalized": 1.0,
        "n_exact": 6,
        "n_normalized": 6,
    }
    assert r["mistakes"] == [] and r["template"] == "chat"


def test_exact_normalised_and_wrong_answers(run):
    r = evaluate_shards(run["out"], [run["eval"]], rank=True)
    assert r["questions"] == 4 and r["skipped"] == {"long_answer": 1}
    m = r["metrics"]
    assert m["overall"]["n_exact"] == 2 and m["overall"]["n_normalized"] == 3
    assert m["by_type"] == {"colour": m["overall"]} and m["overall"]["exact"] == 0.5
    assert [(x["answer"], x["prediction"]) for x in r["mistakes"]] == [("red.", "Red"), ("Blue", "Red")]
    rank = r["ranking"]["colour"]
    assert rank["candidates"] == ["Red", "Blue", "red."] and rank["n"] == 4
    assert rank["majority_rate"] == 0.5 and {"accuracy", "blank_accuracy"} <= set(rank)


def test_an_image_that_does_not_decode_is_skipped(run, tmp_path):
    table = pq.read_table(run["eval"] / "part-00000.parquet")
    images = table.column("image").to_pylist()
    bad = tmp_path / "bad" / "part-00000.parquet"
    bad.parent.mkdir()
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), "image", pa.array([b"junk"] + images[1:])), bad
    )
    r = evaluate_shards(run["out"], [bad], rank=True)
    assert r["skipped"] == {"bad_image": 1, "long_answer": 1} and r["questions"] == 3
    assert r["metrics"]["overall"]["n_exact"] == 1 and r["ranking"]["colour"]["n"] == 3


def test_run_dir_stage_parts_read_the_image_by_uid(run, tmp_path):
    full, rd = pq.read_table(run["eval"] / "part-00000.parquet"), tmp_path / "run"
    for stage, after in (("ingest", []), ("chat", ["ingest"])):
        (rd / stage).mkdir(parents=True)
        (rd / stage / "_manifest.json").write_text(json.dumps({"op": stage, "after": after}))
    pq.write_table(full.select(["uid", "image"]), rd / "ingest" / "part-00000.parquet")
    pq.write_table(full.drop_columns(["image"]), rd / "chat" / "part-00000.parquet")
    assert len(list(shard_rows(shard_list([rd / "chat"])))) == 4
    a, b = evaluate_shards(run["out"], [rd / "chat"]), evaluate_shards(run["out"], [run["eval"]])
    assert a["metrics"] == b["metrics"] and a["questions"] == 4


def test_cli_writes_json_beside_the_checkpoint(run):
    res = CliRunner().invoke(app, ["eval", str(run["out"]), "--shards", str(run["eval"]), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    path = Path(printed["written"])
    assert path == run["out"] / "eval" / f"{eval_name([run['eval']])}.json" and path.name.startswith(
        f"{run['root'].name}_eval-"
    )
    saved = json.loads(path.read_text())
    assert saved["shards"] == [str(run["eval"])] and saved["questions"] == 4 and saved["max_new_tokens"] == 4
    assert saved["skipped"] == {"long_answer": 1} and saved["metrics"]["overall"]["n_normalized"] == 3
    assert "mistakes" in saved and "mistakes" not in printed and "ranking" not in saved
    # the other data set, given the final/ folder: a second file side by side
    res = CliRunner().invoke(app, ["eval", str(run["out"] / "final"), "--shards", str(run["train"]), "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run["out"] / "eval").iterdir()) == sorted(
        [path.name, f"{eval_name([run['train']])}.json"]
    )
    assert json.loads(res.stdout)["metrics"]["overall"]["n_exact"] == 2


def test_cli_errors_are_one_line(run, tmp_path):
    def err(*args: str) -> str:
        res = CliRunner().invoke(app, ["eval", *args])
        lines = [
            ln for ln in res.stderr.splitlines() if ln.strip() and "Loading weights" not in ln
        ]  # transformers' progress bars
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
        return lines[0]

    assert "not a finished `curate train` out dir" in err(str(tmp_path / "nope"), "--shards", str(run["eval"]))
    assert str(tmp_path / "none.parquet") in err(str(run["out"]), "--shards", str(tmp_path / "none.parquet"))
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), bare)
    assert "missing columns" in err(str(run["out"]), "--shards", str(bare))
    longs = write(tmp_path / "long" / "part-00000.parquet", [qa(LONG)])
    assert "no short-answer questions" in err(str(run["out"]), "--shards", str(longs))
    empty = tmp_path / "empty"
    shutil.copytree(run["eval"], empty / "x")
    assert "no part-*.parquet" in err(str(run["out"]), "--shards", str(empty))
