"""Model outputs into LLaVA conversations (human/gpt turns) and the validity filter with reason codes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

import py3langid
from pydantic import ValidationError

from schemas.rows import Turn

IMAGE = "<image>"
REASONS = (
    "truncated",
    "unparseable",
    "empty_turn",
    "refusal",
    "repeated_words",
    "too_short",
    "too_long",
    "wrong_language",
)

# Our own phrasings of the human turn for outputs that carry no question (LLaVA samples one per image too).
DETAIL_QUESTIONS = (
    "Describe this image in detail.",
    "Give a thorough description of what this picture shows.",
    "What is happening in this image? Explain it in detail.",
    "Walk me through everything you can see in this photo.",
    "Write a detailed account of the scene in the image.",
    "Provide an in-depth description of the picture.",
    "Tell me about this image, covering as many details as you can.",
    "Explain the contents of this image thoroughly.",
)
# LLaVA's instructions for brief image description (Liu et al. 2023, its stage-1 pretraining data): the human turn
# of a `caption` sample, drawn per uid.
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
CAPTION_QUESTIONS = {
    "en": (
        "Describe the image.",
        "Write a caption for this picture.",
        "What does this image show?",
        "Summarise the content of this photo.",
    ),
    "zh": (
        "描述这张图片。",
        "为这张图片写一段说明。",
        "这张图片展示了什么？",
        "概括一下这张照片的内容。",
    ),
}


class ParseError(ValueError):
    """A model output that cannot be turned into a conversation (reason code: unparseable)."""


def pick(options: Sequence[str], seed: str) -> str:
    """One option chosen deterministically from a seed string (stable across processes and machines)."""
    return options[int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % len(options)]


_LABEL = re.compile(r"^\W*(question|answer)\W*\s*:\s*(?:\*\*)?\s*(.*)$", re.I)
_SEP = re.compile(r"^\s*={3,}\s*$")
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)\n?```", re.S)


def _qa_blocks(text: str) -> list[tuple[str, str]]:
    """`Question:\\n...\\n===\\nAnswer:\\n...` blocks into (human|gpt, text) pairs; text before the first label is
    dropped."""
    segs: list[list] = []
    for line in text.split("\n"):
        if _SEP.match(line):
            continue
        if m := _LABEL.match(line):
            segs.append(["human" if m.group(1).lower() == "question" else "gpt", [m.group(2)]])
        elif segs:
            segs[-1][1].append(line)
    if not segs:
        raise ParseError("no 'Question:' / 'Answer:' blocks found")
    return [(who, "\n".join(lines).strip()) for who, lines in segs]


def _json_turns(text: str) -> list[tuple[str, str]]:
    """A JSON list of {question, answer} or {from, value} objects, bare or inside a ```json fence."""
    m = _FENCE.search(text)
    try:
        data = json.loads(m.group(1) if m else text)
    except json.JSONDecodeError as e:
        raise ParseError(f"bad JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("conversations"), list):
        data = data["conversations"]
    if not isinstance(data, list):
        raise ParseError(f"expected a JSON list of turns, got {type(data).__name__}")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and {"question", "answer"} <= item.keys():
            out += [("human", str(item["question"]).strip()), ("gpt", str(item["answer"]).strip())]
        elif isinstance(item, dict) and {"from", "value"} <= item.keys():
            out.append((str(item["from"]), str(item["value"]).strip()))
        else:
            raise ParseError(f"item {i} is neither {{question, answer}} nor {{from, value}}: {str(item)[:80]!r}")
    return out


def image_slots(turns: list[dict]) -> str | None:
    """Why a sample's turns break the one-image rule (None when `<image>` is held once, leading the first human
    turn): an alt-text or recaption that holds the token would give the trainer a second image slot."""
    n = sum(t["value"].count(IMAGE) for t in turns)
    if n == 1 and turns[0]["from"] == "human" and turns[0]["value"].startswith(IMAGE):
        return None
    return f"{n} {IMAGE} tokens in the turns; one, leading the first human turn, is the rule"


def parse_output(
    text: str, parser: str, kind: str = "", uid: str = "", *, question: str | None = None, lang: str = "en"
) -> list[dict[str, str]]:
    """Parse one output into validated turns ({"from", "value"}), `<image>\\n` leading the first human turn.

    qa_blocks/json: the output's own questions. answer_only/caption: the whole text is the gpt answer; the
    human turn is `question` if given, else one drawn by `kind:uid` from DETAIL_QUESTIONS / CAPTION_QUESTIONS[lang].
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if parser == "qa_blocks":
        pairs = _qa_blocks(text)
    elif parser == "json":
        pairs = _json_turns(text)
    elif parser in ("answer_only", "caption"):
        options = DETAIL_QUESTIONS if parser == "answer_only" else CAPTION_QUESTIONS.get(lang, CAPTION_QUESTIONS["en"])
        pairs = [("human", question or pick(options, f"{kind}:{uid}")), ("gpt", text.strip())]
    else:
        raise ValueError(f"unknown parser {parser!r}: use qa_blocks, answer_only, json or caption")
    if len(pairs) % 2:
        raise ParseError(f"odd number of turns ({len(pairs)}): every question needs an answer")
    for i, (who, _) in enumerate(pairs):
        if who != ("human", "gpt")[i % 2]:
            raise ParseError(f"turn {i} is from {who!r}: turns must alternate human, gpt starting with human")
    turns = [[who, v.replace(IMAGE, "").strip()] for who, v in pairs]  # a model-written <image> is dropped
    turns[0][1] = f"{IMAGE}\n{turns[0][1]}"
    try:
        return [Turn.model_validate({"from": w, "value": v}).model_dump(by_alias=True) for w, v in turns]
    except ValidationError as e:
        raise ParseError(f"turns do not validate: {e.errors()[0]['msg']}") from None


_REFUSAL = re.compile(
    r"^\W*(?:(?:i['’]?m sorry|i am sorry|sorry|i apologi[sz]e|i cannot|i can['’]?t|i can not|i['’]?m unable|i "
    r"am unable|"
    r"i['’]?m not able|i am not able|as an ai|as a language "
    r"model)\b|抱歉|很抱歉|对不起|我无法|我不能|作为(?:一个)?(?:ai|人工智能))",
    re.I,
)
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def repeated_run(text: str) -> int:
    """Longest run of identical consecutive words (case-folded; each CJK character counts as a word)."""
    best = run = 0
    prev = None
    for w in _WORD.findall(text.casefold()):
        run = run + 1 if w == prev else 1
        prev, best = w, max(best, run)
    return best


def check(
    text: str,
    turns: list[dict] | None,
    finish_reason: str | None,
    lang: str | None = None,
    min_chars: int = 50,
    max_chars: int = 3500,
    repeat_limit: int = 8,
    lang_min_chars: int = 40,
) -> str | None:
    """The first validity reason that applies to one output (see REASONS), or None when it is fine.

    turns is parse_output's result, None when parsing failed. Lengths and language are measured on the gpt
    turns joined; defaults are LLaVA-OneVision-1.5's caption limits, pass others per task.
    """
    if finish_reason == "length":
        return "truncated"
    if _REFUSAL.match(text.strip()):  # a refusal instead of the asked format is a refusal, not a format error
        return "refusal"
    if not turns or len(turns) % 2 or [t["from"] for t in turns] != ["human", "gpt"] * (len(turns) // 2):
        return "unparseable"
    values = [t["value"].replace(IMAGE, "").strip() for t in turns]
    if not all(values):
        return "empty_turn"
    answers = [v for t, v in zip(turns, values) if t["from"] == "gpt"]
    if any(_REFUSAL.match(a) for a in answers):
        return "refusal"
    if any(repeated_run(a) >= repeat_limit for a in answers):
        return "repeated_words"
    body = "\n".join(answers)
    if len(body) < min_chars:
        return "too_short"
    if len(body) > max_chars:
        return "too_long"
    if lang and len(body) >= lang_min_chars and py3langid.classify(body)[0] != lang:
        return "wrong_language"
    return None


def parse_and_check(
    text: str, parser: str, finish_reason: str | None = None, kind: str = "", uid: str = "", **check_kw
) -> tuple[list[dict[str, str]] | None, str | None, str]:
    """parse_output then check: (turns or None, reason or None, detail for a reject row)."""
    try:
        turns = parse_output(text, parser, kind, uid, lang=check_kw.get("lang") or "en")
        detail = ""
    except ParseError as e:
        turns, detail = None, str(e)
    reason = check(text, turns, finish_reason, **check_kw)
    return (None if reason else turns), reason, detail
