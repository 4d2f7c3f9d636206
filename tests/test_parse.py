"""Output parsing into LLaVA turns and the validity filter's reason codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.synth.parse import DETAIL_QUESTIONS, ParseError, check, parse_and_check, parse_output, repeated_run
from schemas.rows import Instruction, Turn

LLAVA = Path(__file__).resolve().parent / "fixtures" / "llava_prompts"  # verbatim copy of LLaVA's folders
ANSWER = "The fire hydrant is bright red and stands half buried in a deep pile of fresh snow."
QA = f"Question:\nWhat color is the hydrant?\n===\nAnswer:\n{ANSWER}"
ZH = "一只橘色的猫趴在窗台上晒太阳，窗外是一片绿色的草地，远处还有几棵高大的树木和一座红色的房子。"


def image_once_first(turns):
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert turns[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in turns) == 1


@pytest.mark.parametrize(
    "path, n_turns",
    [
        ("conversation/000_conv.txt", 8),
        ("conversation/001_conv.txt", 8),
        ("complex_reasoning/000_conv.txt", 2),
        ("complex_reasoning/001_conv.txt", 2),
        ("complex_reasoning/002_conv.txt", 2),
    ],
)
def test_llava_fewshot_outputs_parse(path, n_turns):
    text = (LLAVA / path).read_text()
    turns = parse_output(text, "qa_blocks", "conversation", "u1")
    assert len(turns) == n_turns
    image_once_first(turns)
    assert turns[0]["value"] == "<image>\n" + text.split("\n")[1]
    assert "===" not in "".join(t["value"] for t in turns)
    assert check(text, turns, "stop", max_chars=10_000) is None
    fields = {"id": "x", "uid": "u1", "kind": "conversation", "model": "m", "prompt_version": "v", "image": b""}
    Instruction.model_validate(
        {k: v for k, v in fields.items() if k in Instruction.model_fields} | {"conversations": turns}
    )


def test_llava_detail_outputs_are_answer_only():
    for f in sorted((LLAVA / "detail_description").glob("*_conv.txt")):
        text = f.read_text()
        turns = parse_output(text, "answer_only", "detail_description", f.name)
        assert len(turns) == 2 and turns[1]["value"] == text.strip()
        assert turns[0]["value"].removeprefix("<image>\n") in DETAIL_QUESTIONS


def test_qa_blocks_whitespace_variants():
    messy = (
        "Sure, here it is.\r\n\r\nQuestion:  \r\n  What is it? \r\n===\r\n\r\nAnswer:\r\nA hydrant.\r\n\r\n"
        "=====\r\n**Question:** Is there snow?\r\n ===  \r\nAnswer: Yes, a lot.\r\n\r\n"
    )
    turns = parse_output(messy, "qa_blocks")
    assert [t["value"] for t in turns] == ["<image>\nWhat is it?", "A hydrant.", "Is there snow?", "Yes, a lot."]
    no_sep = parse_output("Question:\nQ1\nAnswer:\nA1\n\nsecond paragraph\nQuestion:\nQ2\nAnswer:\nA2", "qa_blocks")
    assert [t["value"] for t in no_sep][1] == "A1\n\nsecond paragraph" and len(no_sep) == 4


def test_json_outputs():
    fenced = (
        'Here you go:\n```json\n[{"question": "What is it?", "answer": "A hydrant."},\n'
        ' {"question": "Snow?", "answer": "Yes."}]\n```\n'
    )
    turns = parse_output(fenced, "json")
    assert [t["value"] for t in turns] == ["<image>\nWhat is it?", "A hydrant.", "Snow?", "Yes."]
    fv = parse_output('[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A <image>"}]', "json")
    image_once_first(fv)
    assert fv[1]["value"] == "A"
    assert parse_output('{"conversations": [{"question": "Q", "answer": "A"}]}', "json")[1]["value"] == "A"
    for bad in (
        '[{"question": "Q"}]',
        "not json",
        '{"a": 1}',
        '[{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]',
    ):
        with pytest.raises(ParseError):
            parse_output(bad, "json")


def test_unparseable_structures():
    for bad in (
        "just some prose",
        "Question:\nQ1\n===\nQuestion:\nQ2",
        "Answer:\nA\n===\nQuestion:\nQ",
        "Question:\nQ1\n===\nAnswer:\nA1\n===\nQuestion:\nQ2",
    ):
        with pytest.raises(ParseError):
            parse_output(bad, "qa_blocks")
    with pytest.raises(ValueError, match="unknown parser"):
        parse_output("x", "xml")


def test_answer_only_question_is_deterministic_and_varied():
    a = parse_output(ANSWER, "answer_only", "detail_description", "uid-1")
    assert a == parse_output(ANSWER, "answer_only", "detail_description", "uid-1")
    qs = {parse_output(ANSWER, "answer_only", "detail_description", f"uid-{i}")[0]["value"] for i in range(40)}
    assert len(qs) > 3
    own = parse_output(
        "Red", "answer_only", question="What color is it?\nAnswer the question using a single word or phrase."
    )
    assert own[0]["value"] == "<image>\nWhat color is it?\nAnswer the question using a single word or phrase."
    cap = parse_output(f"  {ZH}\n", "caption", "recaption", "u", lang="zh")
    assert cap[1]["value"] == ZH and "<image>\n" in cap[0]["value"]
    for t in cap:
        Turn.model_validate(t)


def test_check_reasons():
    ok = parse_output(QA, "qa_blocks")
    assert check(QA, ok, "stop") is None
    assert check(QA, ok, "length") == "truncated"
    assert check("x", None, "stop") == "unparseable"
    assert check(QA, ok[:1], "stop") == "unparseable"
    assert check(QA, [ok[1], ok[0]], "stop") == "unparseable"
    empty = parse_output("Question:\nWhat?\n===\nAnswer:\n   \n", "qa_blocks")
    assert check("", empty, "stop") == "empty_turn"
    assert check("", [{"from": "human", "value": "<image>\n"}, ok[1]], "stop") == "empty_turn"
    for refusal in (
        "I'm sorry, but I cannot describe this image in any detail because it is unclear.",
        "As an AI language model, I do not have the ability to see images or describe them.",
        "I cannot help with that request; the content of this image is not available to me.",
        "抱歉，我无法查看这张图片，因此不能为您提供任何关于图片内容的详细描述，请您谅解。",
        "我无法确定图片中的内容，请提供更多的信息以便我能够更好地进行详细的描述和说明。",
    ):
        turns = parse_output(refusal, "answer_only")
        assert check(refusal, turns, "stop") == "refusal", refusal
    aide = "As an aide walks past, the mayor cuts a red ribbon in front of the new public library building."
    assert check(aide, parse_output(aide, "caption"), "stop") is None
    rep = "The sky is " + "very " * 8 + "blue over the quiet harbour with boats at the dock."
    assert check(rep, parse_output(rep, "caption"), "stop") == "repeated_words"
    seven = "The sky is " + "very " * 7 + "blue over the quiet harbour with boats at the dock."
    assert check(seven, parse_output(seven, "caption"), "stop") is None
    zh_rep = "图片中有" + "猫" * 8 + "在窗台上晒太阳，窗外是一片绿色的草地和远处的树木。"
    assert (
        repeated_run(zh_rep) == 8
        and check(zh_rep, parse_output(zh_rep, "caption"), "stop", min_chars=10) == "repeated_words"
    )
    assert check("Red.", parse_output("Red.", "caption"), "stop") == "too_short"
    assert check("Red.", parse_output("Red.", "caption"), "stop", min_chars=1) is None
    long = " ".join(f"word{i}" for i in range(600))
    assert check(long, parse_output(long, "caption"), "stop") == "too_long"
    assert check(long, parse_output(long, "caption"), "stop", max_chars=10_000) is None


def test_check_language():
    en, zh = parse_output(ANSWER, "caption"), parse_output(ZH, "caption", lang="zh")
    assert check(ANSWER, en, "stop", lang="en") is None
    assert check(ZH, zh, "stop", lang="zh", min_chars=10) is None
    assert check(ANSWER, en, "stop", lang="zh") == "wrong_language"
    assert check(ZH, zh, "stop", lang="en", min_chars=10) == "wrong_language"
    short = "A red hydrant in snow."  # too short to tell: not language-checked
    assert check(short, parse_output(short, "caption"), "stop", lang="zh", min_chars=5) is None


def test_parse_and_check():
    turns, reason, _ = parse_and_check(QA, "qa_blocks", "stop", "conversation", "u")
    assert reason is None and len(turns) == 2
    turns, reason, detail = parse_and_check("no blocks here", "qa_blocks", "stop")
    assert (turns, reason) == (None, "unparseable") and "Question" in detail
    turns, reason, _ = parse_and_check(QA[:30], "qa_blocks", "length")
    assert (turns, reason) == (None, "truncated")
