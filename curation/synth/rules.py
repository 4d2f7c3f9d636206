"""The offline `rules` backend: LLaVA-format turns from an image's boxes by templates (count, colour, position,
existence)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer format prompt
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
DETAIL_QUESTIONS = [
    "Describe the image in detail.",
    "What do you see in this picture? Describe it thoroughly.",
    "Give a detailed description of the image.",
    "Explain the contents of the image in detail.",
]
KINDS = ("conversation", "detail_description", "complex_reasoning", "short_answer", "multiple_choice")
QUESTIONS = ("count_total", "count", "colour", "position", "existence")  # what a templated question asks about


def rng_for(uid: str, kind: str) -> random.Random:
    """A generator seeded by (uid, kind): the same image always gets the same questions."""
    return random.Random(int.from_bytes(hashlib.blake2b(f"{uid}|{kind}".encode(), digest_size=8).digest(), "big"))


def plural(category: str, n: int) -> str:
    return category if n == 1 else category + ("es" if category.endswith(("s", "x", "ch", "sh")) else "s")


def number(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def position(box) -> str:
    """Where a normalised box's centre lies on a 3x3 grid: 'top left', 'center', 'bottom'..."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def name(obj: dict) -> str:
    return f"{obj['color']} {obj['category']}" if obj.get("color") else obj["category"]


def _facts(objects: list[dict], vocab: dict[str, list[str]], rng: random.Random) -> list[tuple]:
    """(QUESTIONS entry, question, short answer, sentence answer, wrong short answers) about the objects, shuffled."""
    facts = []
    by_cat = Counter(o["category"] for o in objects)
    by_name = Counter(name(o) for o in objects)
    n = len(objects)
    facts.append(
        (
            "count_total",
            "How many shapes are there in the image?",
            number(n),
            f"There {'is' if n == 1 else 'are'} {number(n)} {plural('shape', n)} in the image.",
            [number(k) for k in range(1, 6) if k != n],
        )
    )
    for cat, n in by_cat.items():
        facts.append(
            (
                "count",
                f"How many {plural(cat, 2)} are there in the image?",
                number(n),
                f"There {'is' if n == 1 else 'are'} {number(n)} {plural(cat, n)} in the image.",
                [number(k) for k in range(1, 6) if k != n],
            )
        )
    for nm, n in by_name.items():
        if nm in by_cat:
            continue
        facts.append(
            (
                "count",
                f"How many {plural(nm, 2)} can you see?",
                number(n),
                f"I can see {number(n)} {plural(nm, n)}.",
                [number(k) for k in range(1, 6) if k != n],
            )
        )
    for o in objects:
        if by_cat[o["category"]] == 1 and o.get("color"):
            facts.append(
                (
                    "colour",
                    f"What color is the {o['category']}?",
                    o["color"].capitalize(),
                    f"The {o['category']} is {o['color']}.",
                    [c.capitalize() for c in vocab.get("color", []) if c != o["color"]],
                )
            )
        if by_name[name(o)] == 1:
            where = position(o["box"])
            facts.append(
                (
                    "position",
                    f"Where is the {name(o)} in the image?",
                    where.capitalize(),
                    f"The {name(o)} is in the {where} part of the image."
                    if where != "center"
                    else f"The {name(o)} is in the center of the image.",
                    [
                        p.capitalize()
                        for p in (
                            "top left",
                            "top",
                            "top right",
                            "left",
                            "center",
                            "right",
                            "bottom left",
                            "bottom",
                            "bottom right",
                        )
                        if p != where
                    ],
                )
            )
    absent = [
        f"{c} {k}" if c else k
        for c in vocab.get("color", [None])
        for k in vocab.get("category", [])
        if f"{c} {k}" not in by_name
    ]
    if absent:
        nm = rng.choice(sorted(absent))
        facts.append(
            ("existence", f"Is there a {nm} in the image?", "No", f"No, there is no {nm} in the image.", ["Yes"])
        )
    nm = rng.choice(sorted(by_name))
    facts.append(
        (
            "existence",
            f"Is there a {nm} in the image?",
            "Yes",
            f"Yes, there is {'a' if by_name[nm] == 1 else number(by_name[nm])} {plural(nm, by_name[nm])} in the image.",
            ["No"],
        )
    )
    rng.shuffle(facts)
    return facts


def describe(objects: list[dict], captions: list[str]) -> str:
    """A templated detailed description: what is where, how many, and the alt-text's own words."""
    groups = Counter(name(o) for o in objects)
    items = [f"{number(n) if n > 1 else 'a'} {plural(nm, n)}" for nm, n in groups.items()]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    parts = [f"The image shows {listing}."]
    parts += [
        f"The {name(o)} is located in the {position(o['box'])} of the frame." for o in objects if groups[name(o)] == 1
    ]
    if captions:
        parts.append(f'Its caption reads: "{captions[0]}".')
    return " ".join(parts)


def area(obj: dict) -> float:
    """Area of a normalised box (fraction of the image)."""
    return (obj["box"][2] - obj["box"][0]) * (obj["box"][3] - obj["box"][1])


def reasoning(objects: list[dict]) -> tuple[str, str]:
    """A question that needs comparing objects (size and position), with a step-by-step answer."""
    big = max(objects, key=area)
    if len(objects) == 1:
        return (
            "What is the only object in the image, and how much of the frame does it take up?",
            f"The only object is a {name(big)}. Its box covers about {round(100 * area(big))}% of the image, "
            f"and it sits in the {position(big['box'])} part of the frame.",
        )
    small = min(objects, key=area)
    return (
        "Which object is the largest and which is the smallest? Explain how you can tell.",
        f"The largest object is the {name(big)}: its box covers about {round(100 * area(big))}% of the image, "
        f"in the {position(big['box'])}. The smallest is the {name(small)}, about {round(100 * area(small))}%, "
        f"in the {position(small['box'])}. Comparing the areas of their bounding boxes shows the difference.",
    )


def generate(
    uid: str,
    kind: str,
    objects: list[dict],
    captions: list[str],
    vocab: dict[str, list[str]],
    short_suffix: str = SHORT_ANSWER,
    choice_suffix: str = MULTIPLE_CHOICE,
    max_turns: int = 4,
    ask: Iterable[str] | None = None,
) -> list[dict]:
    """LLaVA turns [{'from': 'human'|'gpt', 'value'}] for one image; `<image>` leads the first human turn.

    objects: [{'category', 'color' (optional), 'box' [x1, y1, x2, y2] normalised 0-1}]; vocab: the categories and
    colours questions may ask about (for absent objects and wrong choices). Question-answer kinds ask at most
    `max_turns` questions, only of the QUESTIONS types in `ask` (default all). Deterministic in (uid, kind).
    """
    if kind not in KINDS:
        raise ValueError(f"rules backend: unknown kind {kind!r}; one of {KINDS}")
    if not objects:
        return []
    rng = rng_for(uid, kind)
    if kind == "detail_description":
        pairs = [(rng.choice(DETAIL_QUESTIONS), describe(objects, captions))]
    elif kind == "complex_reasoning":
        pairs = [reasoning(objects)]
    else:
        wanted = set(QUESTIONS if ask is None else ask)
        facts = [f[1:] for f in _facts(objects, vocab, rng) if f[0] in wanted][:max_turns]
        if kind == "conversation":
            pairs = [(q, sentence) for q, _, sentence, _ in facts]
        elif kind == "short_answer":
            pairs = [(f"{q}\n{short_suffix}", short) for q, short, _, _ in facts]
        else:
            pairs = []
            for q, short, _, wrong in facts:
                options = [short] + rng.sample(wrong, min(3, len(wrong)))
                rng.shuffle(options)
                letters = "ABCD"[: len(options)]
                body = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options))
                pairs.append((f"{q}\n{body}\n{choice_suffix}", letters[options.index(short)]))
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": f"<image>\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return turns
