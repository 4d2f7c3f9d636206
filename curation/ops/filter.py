"""filter: size, aspect and caption rules, each failure a reason code.

Caption hygiene (issue 15): a caption reaches training turns as it is (kind caption), so one that would corrupt
them is rejected, not cleaned: invalid UTF-8 (ingest decodes it to U+FFFD), control characters and ANSI escape
sequences, special tokens of the chat format (`<image>` would add an image slot), repeated-character spam."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import py3langid
import pyarrow as pa
from pydantic import Field

from curation.engine.store import make_rejects
from curation.ops.base import Op, Params
from schemas import Filtered

BOILERPLATE = [
    r"^\s*(img|dsc|image|photo|pic|picture|screenshot)[_\- ]?\d*(\.\w{3,4})?\s*$",  # camera and file names
    r"^\s*(untitled|thumbnail|banner|logo|placeholder|loading\.*|null|none|n/a)\s*$",
    r"\.(jpe?g|png|gif|webp|bmp)\s*$",
    r"click here|download now|royalty[- ]free|stock (photo|image)|all rights reserved|no description|"
    r"free shipping|image may contain|add to cart",
]


SPECIAL_TOKENS = ["<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>"]
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")  # CSI sequences (colours, cursor) and 2-byte escapes


def _control(text: str) -> str | None:
    """What makes the text carry terminal or control codes (None when clean); tab and newlines are allowed."""
    if m := _ANSI.search(text):
        return f"ANSI escape sequence {m.group()!r}"
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"), None)
    return None if bad is None else f"control character U+{ord(bad):04X}"


def _cjk(text: str) -> bool:
    """True when the text has CJK characters (no spaces between words)."""
    return any("\u3040" <= ch <= "\u9fff" for ch in text)


def _caption_rule(reason: str | None) -> bool:
    """True for the reasons that judge the alt-text, not the image."""
    return reason is not None and reason.startswith("caption_")


def usable_captions(table: pa.Table) -> list[str | None]:
    """The table's captions, None where filter flagged the caption unusable (`caption_issue`, when present)."""
    caps = table.column("caption").to_pylist()
    if "caption_issue" not in table.column_names:
        return caps
    return [None if issue else c for c, issue in zip(caps, table.column("caption_issue").to_pylist())]


class FilterParams(Params):
    min_size: int = Field(64, ge=0, description="min of original width and height, pixels")
    max_aspect: float = Field(3.0, ge=1.0, description="max of width/height and height/width")
    require_caption: bool = True
    min_caption_chars: int = Field(5, ge=0)
    min_caption_words: int = Field(2, ge=0)
    max_caption_chars: int = Field(1000, ge=1)
    boilerplate: list[str] = Field(default_factory=lambda: list(BOILERPLATE), description="case-insensitive regexes")
    languages: list[str] | None = Field(["en"], description="ISO 639-1 codes to keep; null keeps all")
    lang_min_chars: int = Field(20, ge=0, description="captions shorter than this are not language-checked")
    special_tokens: list[str] = Field(
        default_factory=lambda: list(SPECIAL_TOKENS),
        description="strings of the training format a caption may not hold (`<image>`: one image slot per sample)",
    )
    max_repeats: int = Field(
        10, ge=2, description="a unit of 1-4 characters repeated this many times in a row is spam ('!!!!', 'hahaha')"
    )
    caption_failures: Literal["reject", "flag"] = Field(
        "reject",
        description="reject: a caption rule broken rejects the image; flag: the image passes with the rule in "
        "caption_issue and its caption unusable (a pseudo_caption stage can caption it from its concepts)",
    )


class Filter(Op):
    """Row-wise rules; the first rule a row breaks is its reason."""

    name = "filter"
    version = "4"  # 2: thin rows (uid, lang), the image stays in ingest; 3: caption hygiene; 4: caption_issue
    Params = FilterParams
    output = Filtered

    @classmethod
    def required_columns(cls, params: FilterParams) -> set[str]:
        return {"uid", "url", "caption", "original_width", "original_height"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.boilerplate = [re.compile(p, re.I) for p in self.params.boilerplate]
        self.repeats = re.compile(r"(\S.{0,3}?)\1{" + str(self.params.max_repeats - 1) + ",}", re.S)

    def check(self, row: dict) -> tuple[str | None, str | None, str | None]:
        """(reason, detail, lang) of one row; reason None when it passes."""
        p = self.params
        w, h = row["original_width"], row["original_height"]
        if min(w, h) < p.min_size:
            return "too_small", f"{w}x{h} < {p.min_size}", None
        if max(w, h) / max(min(w, h), 1) > p.max_aspect:
            return "bad_aspect", f"{w}x{h} aspect > {p.max_aspect}", None
        cap = (row["caption"] or "").strip()
        if not cap:
            return ("caption_missing", None, None) if p.require_caption else (None, None, None)
        if len(cap) > p.max_caption_chars:
            return "caption_too_long", f"{len(cap)} chars", None
        if "\ufffd" in cap or any("\ud800" <= ch <= "\udfff" for ch in cap):
            return "caption_encoding", "invalid UTF-8 (U+FFFD or a lone surrogate)", None
        if why := _control(cap):
            return "caption_control_chars", why, None
        if tok := next((t for t in p.special_tokens if t in cap), None):
            return "caption_special_token", f"holds {tok!r}", None
        if len(cap) < p.min_caption_chars:
            return "caption_too_short", f"{len(cap)} chars", None
        if len(cap.split()) < p.min_caption_words and not _cjk(cap):
            return "caption_too_short", f"{len(cap.split())} word(s)", None
        if m := self.repeats.search(cap):
            return "caption_repetitive", f"{m.group(1)!r} repeated {len(m.group()) // len(m.group(1))} times", None
        for rx in self.boilerplate:
            if rx.search(cap):
                return "caption_boilerplate", f"matches {rx.pattern!r}", None
        lang = py3langid.classify(cap)[0] if len(cap) >= p.lang_min_chars else None
        if lang and p.languages is not None and lang not in p.languages:
            return "caption_language", f"detected {lang}", lang
        return None, None, lang

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        rows = table.select(["uid", "url", "caption", "original_width", "original_height"]).to_pylist()
        verdicts = [self.check(r) for r in rows]
        if self.params.caption_failures == "flag":  # the image passes; its caption is marked unusable
            verdicts = [(None, None, None, v[0]) if _caption_rule(v[0]) else (*v, None) for v in verdicts]
        else:
            verdicts = [(*v, None) for v in verdicts]
        keep = pa.array([v[0] is None for v in verdicts], pa.bool_())
        passed = [v for v in verdicts if v[0] is None]
        out = pa.table(
            {
                "uid": table.filter(keep).column("uid"),
                "lang": pa.array([v[2] for v in passed], pa.string()),
                "caption_issue": pa.array([v[3] for v in passed], pa.string()),
            }
        )
        bad = [(r, v) for r, v in zip(rows, verdicts) if v[0] is not None]
        rejects = make_rejects([r for r, _ in bad], self.stage, [v[0] for _, v in bad], [v[1] for _, v in bad])
        return out, rejects
