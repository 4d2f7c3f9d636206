"""The rules backend: answers follow from the boxes, formats are LLaVA's, output is deterministic."""

import re

import pytest

from curation.synth.rules import KINDS, QUESTIONS, generate, position

VOCAB = {"category": ["circle", "square", "star"], "color": ["red", "blue", "green"]}
OBJECTS = [
    {"category": "circle", "color": "red", "box": [0.05, 0.05, 0.25, 0.25]},
    {"category": "circle", "color": "red", "box": [0.7, 0.7, 0.9, 0.95]},
    {"category": "star", "color": "blue", "box": [0.4, 0.4, 0.6, 0.6]},
]


@pytest.mark.parametrize("kind", KINDS)
def test_llava_format_and_determinism(kind):
    turns = generate("u1", kind, OBJECTS, ["two red circles and a blue star"], VOCAB)
    assert turns == generate("u1", kind, OBJECTS, ["two red circles and a blue star"], VOCAB)
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
    assert sum(t["value"].count("<image>") for t in turns) == 1 and turns[0]["value"].startswith("<image>\n")
    assert all(t["value"].strip() for t in turns)


def test_answers_follow_from_the_boxes():
    turns = generate("u2", "short_answer", OBJECTS, [], VOCAB, max_turns=20)
    qa = {
        turns[i]["value"].replace("<image>\n", "").split("\n")[0]: turns[i + 1]["value"]
        for i in range(0, len(turns), 2)
    }
    assert qa["How many circles are there in the image?"] == "two"
    assert qa["How many stars are there in the image?"] == "one"
    assert qa["How many shapes are there in the image?"] == "three"  # all objects, whatever their kind
    assert qa["What color is the star?"] == "Blue"
    assert qa["Where is the blue star in the image?"] == "Center"
    assert "What color is the circle?" not in qa  # two circles: the question would be ambiguous
    existence = {q: a for q, a in qa.items() if q.startswith("Is there")}
    assert set(existence.values()) == {"Yes", "No"}
    for q, a in existence.items():
        present = any(f"{o['color']} {o['category']}" in q for o in OBJECTS)
        assert (a == "Yes") == present
    assert position([0, 0, 0.2, 0.2]) == "top left" and position([0.8, 0.4, 1, 0.6]) == "right"
    assert all(_oracle(q) == a for q, a in qa.items())


def _oracle(question: str) -> str:
    """The right short answer computed straight from OBJECTS."""
    names = [f"{o['color']} {o['category']}" for o in OBJECTS]
    if question.startswith("How many shapes are there"):
        return ["zero", "one", "two", "three"][len(OBJECTS)]
    if m := re.match(r"How many (\w+?)s are there", question):
        return ["zero", "one", "two", "three"][sum(o["category"] == m[1] for o in OBJECTS)]
    if m := re.match(r"How many (\w+ \w+?)s can you see", question):
        return ["zero", "one", "two", "three"][names.count(m[1])]
    if m := re.match(r"What color is the (\w+)\?", question):
        return next(o["color"] for o in OBJECTS if o["category"] == m[1]).capitalize()
    if m := re.match(r"Where is the (\w+ \w+) in", question):
        return position(OBJECTS[names.index(m[1])]["box"]).capitalize()
    m = re.match(r"Is there an? (\w+ \w+) in", question)
    return "Yes" if m[1] in names else "No"


def test_multiple_choice_letter_points_at_the_right_option():
    for uid in ("u3", "u5", "u6"):
        turns = generate(uid, "multiple_choice", OBJECTS, [], VOCAB, max_turns=20)
        for q, a in zip(turns[::2], turns[1::2]):
            options = dict(re.findall(r"^([A-D])\. (.+)$", q["value"], re.M))
            assert options[a["value"]] == _oracle(q["value"].replace("<image>\n", "").split("\n")[0])
            assert q["value"].endswith("Answer with the option's letter from the given choices directly.")


def test_no_objects_and_unknown_kind():
    assert generate("u4", "conversation", [], ["a caption"], VOCAB) == []
    with pytest.raises(ValueError, match="unknown kind"):
        generate("u4", "poetry", OBJECTS, [], VOCAB)


def test_max_turns_and_ask_choose_the_questions():
    every = generate("u7", "short_answer", OBJECTS, [], VOCAB, max_turns=20)
    picked = generate("u7", "short_answer", OBJECTS, [], VOCAB, max_turns=2, ask=["colour", "count_total"])
    assert len(picked) == 4 and picked[0]["value"].startswith("<image>\n")
    asked = [t["value"].replace("<image>\n", "").split("\n")[0] for t in picked[::2]]
    assert set(asked) == {"What color is the star?", "How many shapes are there in the image?"}
    assert all(t in every[1::2] for t in picked[1::2])  # same answers as without the filter
    assert generate("u7", "short_answer", OBJECTS, [], VOCAB) == generate(
        "u7", "short_answer", OBJECTS, [], VOCAB, ask=QUESTIONS
    )
    two_circles = OBJECTS[:2]  # a colour question would be ambiguous: none fits
    assert generate("u8", "conversation", two_circles, [], VOCAB, ask=["colour"]) == []
