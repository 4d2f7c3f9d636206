"""Evaluation of a trained run on any instruct shard: short-answer questions answered by greedy generation.

Each (human, gpt) turn pair whose answer is short (at most `max_words` words and `max_chars` characters, stripped)
is one question: the conversation up to that reply, encoded with the template the run trained with (earlier turns
and the image as context), cut where the reply's labels start; the model generates greedily until its end-of-turn
token. Longer answers, and pairs the trainer would not train on (no single image, an encode error, an image that
does not decode), are skipped and counted by reason.

Scores, overall and per question type (trainer.evaluate.question_type; "other" for any other question):
  exact       the generated text (special tokens dropped, stripped) equals the stripped answer
  normalized  both equal after normalize_answer(): lowercase; apostrophes and thousands separators dropped; any
              other punctuation splits words (a decimal point between digits stays); the articles a/an/the dropped;
              number words zero..twenty written as digits ("Two." == "2"); single spaces (SQuAD / VQA style)
ranking (optional): trainer.evaluate's scoring by log-likelihood over the answers of each rules question type in
the evaluated set, with the majority-answer rate and the blank-image accuracy to compare with.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from trainer.data import Shard, shard_files
from trainer.evaluate import QUESTION_TYPES, Question, answer_logprobs, blank_image, candidate_answers, question_type
from trainer.generate import generate
from trainer.model import IGNORE_INDEX, LlavaLite
from trainer.template import IMAGE, EncodeError, encode
from trainer.train import load_trained

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
        + ["thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
    )
}
_DROPPED = re.compile(r"['\u2019]|(?<=\d),(?=\d{3}(?!\d))")  # apostrophes; commas in 1,000
_WORD = re.compile(r"\d+\.\d+|[^\W_]+")  # a decimal number, or a run of letters and digits
MISTAKES = 20  # wrong answers kept in the report to look at


@dataclass(frozen=True)
class Item:
    """One question: the prompt ids (up to the reply) and the token that ends the reply (None: eos only)."""

    id: str
    uid: str
    turn: int  # index of the gpt turn in the conversation
    type: str
    question: str  # the human turn, "<image>" removed
    answer: str
    image: bytes
    prompt: list[int]
    end: int | None


def normalize_answer(text: str) -> str:
    """The normalised form answers are compared in (module docstring)."""
    words = _WORD.findall(_DROPPED.sub("", text.lower()))
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def is_short(answer: str, max_words: int = 5, max_chars: int = 32) -> bool:
    a = answer.strip()
    return len(a.split()) <= max_words and len(a) <= max_chars


def run_out(checkpoint: str | Path) -> Path:
    """The `curate train` out dir of a checkpoint given as the out dir or its final/."""
    p = Path(checkpoint)
    for out in (p, p.parent) if p.name == "final" else (p,):
        if (out / "final" / "projector.safetensors").exists():
            return out
    raise FileNotFoundError(f"{checkpoint}: not a finished `curate train` out dir (no final/projector.safetensors)")


def trained_template(out: Path) -> tuple[str, str | None]:
    """(template, system) a run trained with: its latest checkpoint's config, else the packing report in
    final/summary.json (template only); default chat."""
    latest = out / "checkpoints" / "latest"
    if latest.exists():
        state = out / "checkpoints" / latest.read_text().strip() / "state.json"
        if state.exists():
            config = json.loads(state.read_text()).get("config", {})
            if config.get("template"):
                return config["template"], config.get("system")
    summary = out / "final" / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("packing", {}).get("template") or "chat", None
    return "chat", None


def shard_list(shards: Sequence[str | Path]) -> list[Path]:
    """Shard files of files and directories (part-*.parquet), each checked to hold or find TrainSample's columns."""
    return [f for s in shards for f in shard_files(s)]


def shard_rows(files: Iterable[Path], batch_rows: int = 64) -> Iterator[dict]:
    """TrainSample records (id, uid, conversations, image), images of run-dir stage parts joined by uid."""
    for f in files:
        for _, batch in Shard(f).batches(batch_rows):
            yield from batch.to_pylist()


def _reply_span(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last labelled run: the final reply's tokens and its end-of-turn token."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def questions(
    rows: Iterable[dict],
    tokenizer,
    template: str,
    image_tokens: int | Callable[[tuple[int, int]], int],
    system: str | None = None,
    max_words: int = 5,
    max_chars: int = 32,
    skipped: Counter | None = None,
) -> Iterator[Item]:
    """Short-answer questions of instruct rows, in order; `skipped` counts the pairs left out, by reason.
    `image_tokens`: copies of `<image>`, or a function of the image's (H, W) (AnyRes: LlavaLite.tokens_for)."""
    skipped = Counter() if skipped is None else skipped
    specials = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())  # end-of-turn candidates
    for row in rows:
        conv = row["conversations"] or []
        for t in range(1, len(conv), 2):
            human, gpt = conv[t - 1], conv[t]
            answer = (gpt.get("value") or "").strip()
            if (human.get("from"), gpt.get("from")) != ("human", "gpt"):
                reason = "bad_turns"
            elif not answer:
                reason = "empty_answer"
            elif not is_short(answer, max_words, max_chars):
                reason = "long_answer"
            elif template == "plain" and t > 1:
                reason = "plain_later_turn"  # the plain template renders the first reply only
            elif not row.get("image"):
                reason = "no_image"
            else:
                reason = None
            if reason:
                skipped[reason] += 1
                continue
            n_tokens = image_tokens
            if not isinstance(image_tokens, int):
                try:  # the header's size only: the image is decoded when it is answered
                    n_tokens = image_tokens(Image.open(io.BytesIO(row["image"])).size[::-1])
                except Exception:
                    skipped["bad_image"] += 1
                    continue
            try:
                enc = encode(conv[: t + 1], tokenizer, template, n_tokens, system)
            except EncodeError as e:
                skipped[e.reason] += 1
                continue
            if enc.n_images != 1:
                skipped["image_count"] += 1
                continue
            start, end = _reply_span(enc.labels)
            last = enc.input_ids[end - 1]
            text = human["value"].replace(IMAGE, "").strip()
            yield Item(
                row["id"],
                row["uid"],
                t,
                question_type(text) or "other",
                text,
                answer,
                row["image"],
                enc.input_ids[:start],
                last if last in specials else None,
            )


def _image(raw: bytes) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception:
        return None


def _pixel_values(
    model: LlavaLite, processor, images: list[Image.Image]
) -> tuple[list[torch.Tensor], list[list[list[int]]] | None]:
    """Per question, its image's views [n_views, C, H, W] as the model's forward takes them, and (AnyRes) its
    [(H, W)]."""
    inputs = model.image_inputs(processor)
    views = [inputs([im]) for im in images]
    return [v for v, _ in views], [s for _, s in views] if model.anyres else None


def _score(records: list[dict]) -> dict:
    n = len(records)
    exact, norm = sum(r["exact"] for r in records), sum(r["normalized"] for r in records)
    return {"n": n, "exact": exact / max(n, 1), "normalized": norm / max(n, 1), "n_exact": exact, "n_normalized": norm}


def metrics(records: list[dict]) -> dict:
    """Exact and normalised accuracy with counts, overall and per question type."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(r)
    return {"overall": _score(records), "by_type": {t: _score(rs) for t, rs in sorted(by_type.items())}}


def answer(
    model: LlavaLite,
    tokenizer,
    processor,
    items: Iterable[Item],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    skipped: Counter | None = None,
) -> Iterator[dict]:
    """Per question a record: id, turn, type, question, answer, prediction, exact, normalized (bool)."""
    skipped = Counter() if skipped is None else skipped
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    it = iter(items)
    while batch := list(islice(it, batch_size)):
        decoded = [(q, _image(q.image)) for q in batch]
        if bad := sum(im is None for _, im in decoded):
            skipped["bad_image"] += bad
        batch, images = [q for q, im in decoded if im is not None], [im for _, im in decoded if im is not None]
        stops = {tokenizer.eos_token_id, *(q.end for q in batch)} - {None}
        pixel_values, sizes = _pixel_values(model, processor, images)
        gen = generate(model, [q.prompt for q in batch], pixel_values, stops, max_new_tokens, pad_id, sizes)
        for q, ids in zip(batch, gen):
            pred = tokenizer.decode(ids, skip_special_tokens=True).strip()
            yield {
                "id": q.id,
                "turn": q.turn,
                "type": q.type,
                "question": q.question,
                "answer": q.answer,
                "prediction": pred,
                "exact": pred == q.answer,
                "normalized": normalize_answer(pred) == normalize_answer(q.answer),
            }


def ranking(model: LlavaLite, tokenizer, processor, qs: list[Question], template: str, system: str | None) -> dict:
    """trainer.evaluate's ranking accuracy per rules question type, candidates being the type's answers here."""
    cands, report = candidate_answers(qs), {}
    for kind in QUESTION_TYPES:
        sub = [q for q in qs if q.type == kind]
        if not sub:
            continue
        cs, truth = cands[kind], [q.answer for q in sub]

        def acc(image: bytes | None, sub=sub, cs=cs, truth=truth) -> float:
            pred = answer_logprobs(model, tokenizer, processor, sub, cs, template, system, image=image).argmax(1)
            return sum(cs[i] == t for i, t in zip(pred.tolist(), truth)) / len(truth)

        report[kind] = {
            "n": len(sub),
            "candidates": cs,
            "accuracy": acc(None),
            "uniform_chance": 1 / len(cs),
            "majority_answer": cs[0],
            "majority_rate": sum(t == cs[0] for t in truth) / len(truth),
            "blank_accuracy": acc(blank_image()),
        }
    return report


def eval_name(shards: Sequence[str | Path]) -> str:
    """A file name for an evaluation of these shards: their folder and name, and a hash of the resolved paths."""
    paths = [Path(s).resolve() for s in shards]
    slug = "+".join(f"{p.parent.name}_{p.name.removesuffix('.parquet')}" for p in paths)
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", slug)[:60].strip("-.") or "shards"
    digest = hashlib.sha1(json.dumps(sorted(map(str, paths))).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def evaluate_shards(
    checkpoint: str | Path,
    shards: Sequence[str | Path],
    limit: int | None = None,
    max_new_tokens: int = 16,
    max_words: int = 5,
    max_chars: int = 32,
    batch_size: int = 16,
    rank: bool = False,
    device: str | None = None,
) -> dict:
    """The evaluation report of a finished run on instruct shards (the module docstring says what is scored); with
    `limit`, the skipped counts cover the rows read until `limit` questions were found."""
    t0 = time.perf_counter()
    out = run_out(checkpoint)
    files = shard_list(shards)
    template, system = trained_template(out)
    model = load_trained(out).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "final" / "lm"))
    processor = AutoImageProcessor.from_pretrained(str(out / "final" / "vision"))
    skipped: Counter = Counter()
    tokens = model.tokens_for if model.anyres else model.image_tokens
    items = questions(shard_rows(files), tokenizer, template, tokens, system, max_words, max_chars, skipped)
    kept: list[Question] = []

    def keep(stream: Iterator[Item]) -> Iterator[Item]:
        for q in stream:
            if rank and q.type in QUESTION_TYPES and _image(q.image) is not None:
                kept.append(Question(q.uid, q.type, q.question, q.answer, q.image))
            yield q

    records = list(answer(model, tokenizer, processor, keep(islice(items, limit)), max_new_tokens, batch_size, skipped))
    if not records:
        raise ValueError(
            f"no short-answer questions in {[str(s) for s in shards]} (skipped: {dict(skipped) or 'no turns'})"
        )
    report = {
        "checkpoint": str(out),
        "template": template,
        "system": system,
        "shards": [str(s) for s in shards],
        "files": [str(f) for f in files],
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "max_answer_words": max_words,
        "max_answer_chars": max_chars,
        "questions": len(records),
        "skipped": dict(sorted(skipped.items())),
        "metrics": metrics(records),
    }
    if rank:
        report["ranking"] = ranking(model, tokenizer, processor, kept, template, system)
    report["mistakes"] = [r for r in records if not r["exact"]][:MISTAKES]
    report["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return report


def write_report(report: dict, path: str | Path | None = None) -> Path:
    """Write the report as JSON (default CHECKPOINT/eval/NAME.json, NAME from the shards); the path written."""
    path = Path(path) if path else Path(report["checkpoint"]) / "eval" / f"{eval_name(report['shards'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
