"""Held-out evaluation: does a trained model answer colour and count questions from the image?

Each question is scored by ranking: the model's log-likelihood of every candidate answer (the answers of that
question type seen in training) as the reply to `<image>\\n{question}`; the argmax is the prediction. The same
scoring with every image swapped for a uniform grey one shows what the text alone gets, so an accuracy above both
the majority-answer rate and the blank-image accuracy can only come through the image path.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from trainer.model import IGNORE_INDEX, LlavaLite
from trainer.template import encode

# Question types by the rules backend's wording (curation/synth/rules.py): "What color is the square?";
# "How many shapes are there in the image?" (all objects: answers spread one to four) apart from the per-category
# "How many circles are there in the image?" / "How many red stars can you see?" (mostly "one").
QUESTION_TYPES = {
    "colour": re.compile(r"^What colou?r is the "),
    "count_total": re.compile(r"^How many shapes are there "),
    "count": re.compile(r"^How many (?!shapes are there )"),
}
BLANK_RGB = (128, 128, 128)


@dataclass(frozen=True)
class Question:
    uid: str
    type: str
    text: str  # the human turn without "<image>" (the short-answer suffix kept)
    answer: str
    image: bytes


def question_type(text: str) -> str | None:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return next((t for t, pat in QUESTION_TYPES.items() if pat.match(first)), None)


def questions(rows: Iterable[dict]) -> list[Question]:
    """Colour and count questions of Instruction rows (dicts with uid, conversations, image), one per human turn."""
    out = []
    for row in rows:
        conv = row["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            text = human["value"].replace("<image>", "").strip()
            kind = question_type(text)
            if kind and gpt["value"].strip():
                out.append(Question(row["uid"], kind, text, gpt["value"].strip(), row["image"]))
    return out


def candidate_answers(train: list[Question]) -> dict[str, list[str]]:
    """Per question type, the answers seen in training, most frequent first (ties by name)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in train:
        counts[q.type][q.answer] += 1
    return {t: [a for a, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))] for t, c in counts.items()}


def blank_image(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), BLANK_RGB).save(buf, "PNG")
    return buf.getvalue()


@torch.no_grad()
def answer_logprobs(
    model: LlavaLite,
    tokenizer,
    processor,
    qs: list[Question],
    cands: list[str],
    template: str = "chat",
    system: str | None = None,
    image: bytes | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """[len(qs), len(cands)] summed log-probabilities of each candidate reply (answer tokens + end of turn)."""
    items = [(qi, ci) for qi in range(len(qs)) for ci in range(len(cands))]
    scores = torch.empty(len(qs), len(cands))
    pad_id = tokenizer.pad_token_id or 0
    inputs = model.image_inputs(processor)
    views: dict[int, tuple[torch.Tensor, list[int] | None]] = {}  # question -> its image's views and (H, W)
    dev = next(model.parameters()).device
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for qi, _ in chunk:
            if qi not in views:
                px, sizes = inputs([image if image is not None else qs[qi].image])
                views[qi] = (px, sizes[0] if sizes else None)
        encs = [
            encode(
                [{"from": "human", "value": "<image>\n" + qs[qi].text}, {"from": "gpt", "value": cands[ci]}],
                tokenizer,
                template,
                model.tokens_for(views[qi][1]) if model.anyres else model.image_tokens,
                system,
            )
            for qi, ci in chunk
        ]
        T = max(len(e.input_ids) for e in encs)
        ids = torch.full((len(encs), T), pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(encs), T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for b, e in enumerate(encs):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[b, : len(e.labels)] = torch.tensor(e.labels)
        pixel_values = torch.cat([views[qi][0] for qi, _ in chunk])  # [n_views, C, H, W]
        sizes = [views[qi][1] for qi, _ in chunk] if model.anyres else None
        logits, _ = model(
            ids.to(dev),
            pixel_values=pixel_values.to(dev),
            seq_lens=[[len(e.input_ids)] for e in encs],
            image_sizes=sizes,
        )  # [B, T, V]
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]: predicts tokens 1..T-1
        target = labels[:, 1:].to(dev)  # [B, T-1]
        mask = target != IGNORE_INDEX
        tok = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask  # [B, T-1]
        sums = tok.sum(1).cpu()  # [B]
        for b, (qi, ci) in enumerate(chunk):
            scores[qi, ci] = sums[b]
    return scores


def evaluate(
    model: LlavaLite,
    tokenizer,
    processor,
    train_rows: Iterable[dict],
    heldout_rows: Iterable[dict],
    template: str = "chat",
    system: str | None = None,
    blank: bool = True,
) -> dict[str, dict]:
    """Per question type: held-out accuracy, blank-image accuracy, and the chance levels.

    uniform_chance = 1 / #candidates; majority_rate = how often the most frequent training answer is right on the
    held-out questions (the bar to beat: a model that ignores the image can reach it).
    """
    train_qs, test_qs = questions(train_rows), questions(heldout_rows)
    cands = candidate_answers(train_qs)
    report = {}
    for kind in QUESTION_TYPES:
        qs = [q for q in test_qs if q.type == kind]
        if kind not in cands or not qs:
            continue
        truth = [q.answer for q in qs]
        pred = answer_logprobs(model, tokenizer, processor, qs, cands[kind], template, system).argmax(1)
        res = {
            "n": len(qs),
            "n_train": sum(q.type == kind for q in train_qs),
            "candidates": cands[kind],
            "accuracy": _acc([cands[kind][i] for i in pred], truth),
            "uniform_chance": 1 / len(cands[kind]),
            "majority_answer": cands[kind][0],
            "majority_rate": _acc([cands[kind][0]] * len(qs), truth),
        }
        if blank:
            grey = blank_image()
            bpred = answer_logprobs(model, tokenizer, processor, qs, cands[kind], template, system, image=grey).argmax(
                1
            )
            res["blank_accuracy"] = _acc([cands[kind][i] for i in bpred], truth)
        report[kind] = res
    return report


def _acc(pred: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(pred, truth)) / len(truth) if truth else 0.0
