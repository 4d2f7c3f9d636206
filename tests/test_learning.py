"""Learning (issue 5): the pipeline -> trainer -> held-out evaluation chain, and a positive control of the image path.

The chain runs for real: fixture web served on 127.0.0.1 -> runner (Ray) ingest, dedup, filter,
instruct(short_answer, rules) -> uid split -> trainer.train (stage 2) -> trainer.evaluate, scored against the
majority answer and against the same model shown blank images. On this data the tiny model does NOT beat those bars
(measured in bench/RESULTS.md "Learning (issue 5)"), so the chain test checks the scoring, not a margin; the control
shows the same trainer and scorer do learn colour from the image when the frozen tower can see it.
"""
from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from bench.learning import learn
from curation.synth.rules import SHORT_ANSWER
from schemas import Instruction, arrow_schema
from trainer.config import load_config
from trainer.evaluate import Question, candidate_answers, evaluate, question_type, questions
from trainer.tiny import make_tiny_all
from trainer.train import load_trained, train

CONTROL_MARGIN = 0.3  # measured: 1.0 held-out vs 0.25-0.3 majority and blank

COLOURS = {"Red": (220, 30, 30), "Green": (30, 180, 40), "Blue": (30, 50, 220), "Yellow": (240, 220, 20)}


def square_rows(n: int, seed: int) -> list[dict]:
    """Instruction rows: one coloured square (random size and place) on white, asked for its colour."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        img, side = Image.new("RGB", (64, 64), (255, 255, 255)), rng.randint(14, 30)
        img.paste(Image.new("RGB", (side, side), COLOURS[name]), (rng.randint(0, 64 - side), rng.randint(0, 64 - side)))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        conv = [{"from": "human", "value": "<image>\nWhat color is the square?\n" + SHORT_ANSWER},
                {"from": "gpt", "value": name}]
        rows.append(Instruction(id=f"s{seed}-{i}", uid=f"s{seed}-{i}", kind="short_answer", conversations=conv,
                                model="test", prompt_version="v0", image=buf.getvalue()).model_dump(by_alias=True))
    return rows


@pytest.fixture(scope="module")
def result(ray_session, tmp_path_factory):
    """The pipeline chain at test size (bench/learning.py runs it at 2000 URLs, 250 steps for RESULTS.md)."""
    return learn(tmp_path_factory.mktemp("learning"), n_urls=800, steps=60)
def test_question_parsing():
    rows = [{"uid": "a", "image": b"x", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the star?\nAnswer the question using a single word."},
        {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "How many circles are there in the image?\nAnswer briefly."},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "How many shapes are there in the image?"}, {"from": "gpt", "value": "three"},
        {"from": "human", "value": "Where is the red star in the image?"}, {"from": "gpt", "value": "Top"}]}]
    qs = questions(rows)
    assert [(q.type, q.answer) for q in qs] == [("colour", "Red"), ("count", "two"), ("count_total", "three")]
    assert "<image>" not in qs[0].text and qs[0].text.endswith("single word.")
    assert question_type("Is there a red star?") is None
    train = [Question("u", "count", "q", a, b"") for a in ("one", "two", "one", "three")]
    assert candidate_answers(train) == {"count": ["one", "three", "two"]}  # most frequent first, ties by name


@pytest.mark.slow
def test_held_out_images_were_never_trained_on(result):
    assert result["held_out_uids"] and result["train_uids"]
    assert not set(result["held_out_uids"]) & set(result["train_uids"])
    assert result["samples"] == result["images"]["train"]  # every train-split row trained, nothing rejected


@pytest.mark.slow
def test_pipeline_data_trains_and_is_scored_against_both_bars(result):
    """Scores on held-out pipeline questions with both bars; the learning claim itself does not hold here (see
    bench/RESULTS.md: at this budget the model answers from the question text, image and blank scores equal)."""
    assert set(result["questions"]) == {"colour", "count_total", "count"}
    colour, total, count = (result["questions"][k] for k in ("colour", "count_total", "count"))
    assert colour["n"] >= 30 and set(colour["candidates"]) >= {"Red", "Green", "Blue", "Yellow"}
    assert total["n"] >= 30 and set(total["candidates"]) >= {"one", "two", "three", "four"}
    assert total["majority_rate"] < 0.5  # all-shape counts are spread; per-category counts are mostly one
    assert count["candidates"][0] == "one" and count["majority_rate"] > 0.8
    for r in (colour, total, count):
        assert r["uniform_chance"] == pytest.approx(1 / len(r["candidates"]))
        assert 0 <= r["blank_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1


@pytest.mark.slow
def test_colour_is_read_from_the_image_when_the_tower_can_see_it(tmp_path):
    """Positive control of the image path and the scorer: single squares on white, new images held out."""
    shard = tmp_path / "train" / "part-00000.parquet"
    shard.parent.mkdir()
    train_rows, test_rows = square_rows(200, seed=1), square_rows(80, seed=2)
    pq.write_table(pa.Table.from_pylist(train_rows, schema=arrow_schema(Instruction)), shard)
    parts = make_tiny_all(tmp_path / "models")
    train(load_config(None, {"stage": 2, "shards": [str(shard.parent)], "vision": str(parts["vision"]),
                             "lm": str(parts["lm"]), "out": str(tmp_path / "o"), "max_len": 512, "rows_per_step": 4,
                             "max_steps": 150, "lr": 3e-3, "warmup_steps": 10}))
    final = tmp_path / "o" / "final"
    r = evaluate(load_trained(tmp_path / "o"), AutoTokenizer.from_pretrained(str(final / "lm")),
                 AutoImageProcessor.from_pretrained(str(final / "vision")), train_rows, test_rows)["colour"]
    assert r["accuracy"] > r["majority_rate"] + CONTROL_MARGIN, r
    assert r["accuracy"] > r["blank_accuracy"] + CONTROL_MARGIN, r  # a broken image path scores like blank
