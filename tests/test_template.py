"""Templates and label masks on edge cases (no sample may train on nothing), and the loader's exact resume."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from schemas.arrow import arrow_schema
from schemas.rows import ImageInstruction, Instruction
from trainer.data import InstructionLoader
from trainer.template import IGNORE, EncodeError, chat_template, encode, length
from trainer.tiny import CHAT_TEMPLATE

SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
]
CORPUS = [
    "the cat sat on the mat",
    "what colour is the car? it is red",
    "how many dogs are there in the picture",
    "USER: hello ASSISTANT: hi there",
    "a photo of two birds on a wire",
    "你好，世界。这是一只猫。",
    "café naïve émoji 🙂",
    "system user assistant <|im_start|> describe the image in detail",
] * 5
QWEN = (
    "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
VICUNA = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }} {% elif m.role == 'user' %}USER: "
    "{{ m.content }} {% else %}ASSISTANT: {{ m.content }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
EOT = ["<|im_end|>", "<|eot_id|>", "</s>"]
N = 5


def make_tok(
    chat_template: str | None = QWEN, prefix_space: bool = False, image: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few sentences, with the chat specials and <image>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    specials = SPECIALS if image else SPECIALS[:-1]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.chat_template = chat_template
    return out


TOKS = {
    "qwen": make_tok(QWEN),
    "llama3": make_tok(LLAMA3),
    "vicuna_prefix_space": make_tok(VICUNA, prefix_space=True),
    "fallback": make_tok(None),
    "fallback_prefix_space": make_tok(None, prefix_space=True),
}


def conv(*pairs: str) -> list[dict]:
    """human, gpt, human, gpt... values as LLaVA turns."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


def squash(s: str) -> str:
    """Text without end-of-turn tokens and whitespace, to compare label text with reply text."""
    for t in EOT:
        s = s.replace(t, "")
    return re.sub(r"\s+", "", s)


def check(e, tok, replies: list[str], n_images: int = 1) -> None:
    """Labels are exactly the replies' tokens (plus end-of-turn), image tokens are expanded to N and masked."""
    img = tok.convert_tokens_to_ids("<image>")
    assert len(e.input_ids) == len(e.labels)
    assert e.n_images == n_images and e.input_ids.count(img) == N * n_images
    assert all(lab == IGNORE for t, lab in zip(e.input_ids, e.labels) if t == img)
    assert all(lab in (IGNORE, t) for t, lab in zip(e.input_ids, e.labels))
    kept = [lab for lab in e.labels if lab != IGNORE]
    assert kept, "every label masked"
    text = tok.decode(kept)
    assert squash(text) == squash("".join(replies)), (text, replies)
    assert tok.convert_ids_to_tokens(kept[-1]) in EOT  # the end-of-turn token is learned
    if len(replies) == 1 and "<|" not in replies[0]:  # a prefix-space BPE adds a space after a special token
        assert text.removesuffix(tok.convert_ids_to_tokens(kept[-1])).strip() == replies[0].strip()


CASES = {
    "simple": (conv("<image>\nWhat colour is the car?", "It is red."), None),
    "empty_system": (conv("<image>\nWhat colour is the car?", "It is red."), ""),
    "system": (conv("<image>\nWhat colour is the car?", "It is red."), "You are a careful assistant."),
    "multi_turn": (
        conv(
            "<image>\nHow many dogs?",
            "Two dogs.",
            "And birds?",
            "There are two birds on a wire.",
            "Anything else?",
            "A cat sat on the mat.",
        ),
        None,
    ),
    "spaces": (conv("<image>\n  hello  ", "   the cat sat on the mat   "), None),
    "unicode": (conv("<image>\n这是什么？", "你好，世界。这是一只猫。café naïve 🙂"), None),
    "tag_like": (conv("<image>\nSay it", "USER: ASSISTANT: <|im_start|>assistant\nok [INST] </SYS>"), None),
    "one_token": (conv("<image>\nIs it red? Answer yes or no.", "a"), None),
    "role_word": (conv("<image>\nWhich role?", "assistant"), None),
}


@pytest.mark.parametrize("tok_name", list(TOKS))
@pytest.mark.parametrize("case", list(CASES))
def test_chat_labels_are_exactly_the_replies(tok_name, case):
    tok, (c, system) = TOKS[tok_name], CASES[case]
    e = encode(c, tok, "chat", N, system=system)
    check(e, tok, [t["value"] for t in c if t["from"] == "gpt"])
    assert length(c, tok, "chat", N, system=system) == len(e.input_ids)
    if case == "one_token":
        assert sum(lab != IGNORE for lab in e.labels) == 2  # the reply's token and the end-of-turn token
    if system:
        assert system.split()[-1].rstrip(".") in tok.decode(e.input_ids)


@pytest.mark.parametrize("tok_name", list(TOKS))
def test_plain_labels_caption_and_eos_only(tok_name):
    tok = TOKS[tok_name]
    c = conv("<image>\nDescribe the image in detail.", "a photo of two birds on a wire")
    e = encode(c, tok, "plain", N)
    check(e, tok, ["a photo of two birds on a wire"])
    assert e.labels[-1] == tok.eos_token_id == e.input_ids[-1]
    assert "Describe" not in tok.decode(e.input_ids)  # human text dropped, as LLaVA's plain template does
    assert e.input_ids.index(tok.convert_tokens_to_ids("<image>")) <= 1  # the image first (after a BOS, if any)


@pytest.mark.parametrize("tok_name", ["qwen", "fallback"])
def test_literal_image_in_the_middle_is_expanded_and_masked(tok_name):
    tok = TOKS[tok_name]
    c = conv("<image>\nCompare this <image> with that.", "They match.")
    e = encode(c, tok, "chat", N)
    check(e, tok, ["They match."], n_images=2)  # the loader rejects it (image_count): one image per row


@pytest.mark.parametrize("tok_name", list(TOKS))
@pytest.mark.parametrize("template", ["chat", "plain"])
@pytest.mark.parametrize("reply", ["", "   "])
def test_empty_reply_is_no_labels(tok_name, template, reply):
    with pytest.raises(EncodeError) as err:
        encode(conv("<image>\nWhat is it?", reply), TOKS[tok_name], template, N)
    assert err.value.reason == "no_labels"


def test_one_empty_reply_among_others_still_trains_the_rest():
    e = encode(conv("<image>\nA?", "", "B?", "the cat"), TOKS["qwen"], "chat", N)
    check(e, TOKS["qwen"], ["the cat"])


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_too_long_is_reported_not_cut(template):
    c, tok = conv("<image>\nWhat colour is the car?", "It is red."), TOKS["qwen"]
    n = len(encode(c, tok, template, N).input_ids)
    assert len(encode(c, tok, template, N, max_len=n).input_ids) == n
    with pytest.raises(EncodeError) as err:
        encode(c, tok, template, N, max_len=n - 1)
    assert err.value.reason == "too_long"


def test_tokenizer_without_image_token_errors_clearly():
    with pytest.raises(ValueError, match="<image>"):
        encode(conv("<image>\nhi", "hello"), make_tok(QWEN, image=False), "chat", N)


def test_template_that_rewrites_content_is_a_mismatch_not_silent():
    tok = make_tok("{% for m in messages %}{{ m.content | upper }}</s>{% endfor %}")
    with pytest.raises(EncodeError) as err:
        encode(conv("<image>\nwhat is it", "the cat"), tok, "chat", N)
    assert err.value.reason == "template_mismatch"


def test_turn_models_are_accepted():
    inst = Instruction.model_validate(
        {
            "id": "u:k",
            "uid": "u",
            "kind": "k",
            "model": "m",
            "prompt_version": "p",
            "conversations": conv("<image>\nhi", "the cat"),
        }
    )
    e = encode(inst.conversations, TOKS["qwen"], "chat", N)
    check(e, TOKS["qwen"], ["the cat"])


def _served_ids(tok, jinja: str, msgs: list[dict], prompt: bool) -> list[int]:
    """Token ids a server gets from `jinja` (no special tokens added, each <image> expanded to N positions)."""
    text = tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False, add_generation_prompt=prompt)
    img = tok.convert_tokens_to_ids("<image>")
    return [t for i in tok(text, add_special_tokens=False).input_ids for t in ([i] * N if i == img else [i])]


def _reply_starts(labels: list[int]) -> list[int]:
    return [i for i, lab in enumerate(labels) if lab != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]


PROMPT_CASES = ["simple", "empty_system", "system", "multi_turn", "unicode", "tag_like", "one_token", "role_word"]


def _bos_tok() -> PreTrainedTokenizerFast:
    """The fallback tokenizer putting <s> in front of text by default (the plain template then starts with it)."""
    tok = make_tok(None)
    bos = [processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])]
    tok._tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), *bos])
    return tok


EXPORT_TOKS = {**TOKS, "fallback_bos": _bos_tok()}


@pytest.mark.parametrize("tok_name", list(EXPORT_TOKS))
@pytest.mark.parametrize("case", PROMPT_CASES)
@pytest.mark.parametrize("template", ["chat", "plain"])
def test_exported_chat_template_renders_what_was_trained(tok_name, case, template):
    """The chat template an export carries: the whole conversation is the trained ids, and the prompt before each
    reply (add_generation_prompt) is the trained ids up to that reply, less at most a whitespace token (a prompt
    ending in "ASSISTANT:" leaves the space to the reply, which a BPE tokenizes with its first word)."""
    tok, (c, system) = EXPORT_TOKS[tok_name], CASES[case]
    jinja = chat_template(tok, template, system)
    e = encode(c, tok, template, N, system=system)
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in c]
    assert _served_ids(tok, jinja, msgs, prompt=False) == e.input_ids
    starts = _reply_starts(e.labels)
    replies = [k for k, m in enumerate(msgs) if m["role"] == "assistant"][: len(starts)]
    for k, start in zip(replies, starts):
        served = _served_ids(tok, jinja, msgs[:k], prompt=True)
        assert served == e.input_ids[: len(served)] and tok.decode(e.input_ids[len(served) : start]).strip() == ""
        assert start - len(served) <= 1, (k, tok.decode(e.input_ids))


@pytest.mark.parametrize("jinja", ["fallback", "plain", "tiny"])
def test_image_parts_render_as_the_trained_image_line(jinja):
    """OpenAI-style content (text then image part, as the stages send it) renders as LLaVA's `<image>\n{text}`."""
    tok = TOKS["fallback"]
    template = {"fallback": chat_template(tok, "chat"), "plain": chat_template(tok, "plain"), "tiny": CHAT_TEMPLATE}
    parts = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    for prompt in (True, False):
        as_parts, as_text = (
            tok.apply_chat_template(
                [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": u}]
                + ([] if prompt else [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]),
                chat_template=template[jinja],
                tokenize=False,
                add_generation_prompt=prompt,
            )
            for u in (parts, "<image>\nWhat is it?")
        )
        assert as_parts == as_text and as_text.count("<image>") == 1
    two = [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    msgs = [{"role": "user", "content": two}]
    out = tok.apply_chat_template(msgs, chat_template=template[jinja], tokenize=False, add_generation_prompt=True)
    assert ("<image>" if jinja == "plain" else "<image>\n<image>\na\nb") in out


def test_fallback_template_quotes_system_and_eos():
    tok = TOKS["fallback"]
    system = 'Say "hi" {{ 1 }} \\n\n ok 🙂'
    c = conv("<image>\nWhat colour is the car?", "It is red.")
    e = encode(c, tok, "chat", N, system=system)
    msgs = [{"role": "user", "content": c[0]["value"]}, {"role": "assistant", "content": "It is red."}]
    assert _served_ids(tok, chat_template(tok, "chat", system), msgs, prompt=False) == e.input_ids
    with pytest.raises(ValueError, match="plain' or 'chat"):
        chat_template(tok, "vicuna")


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (i * 20 % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Three shards, row groups of 3, a few rows the loader must reject."""
    schema, k = arrow_schema(ImageInstruction), 0
    for s, n in enumerate([7, 5, 9]):
        rows = []
        for _ in range(n):
            reply = "" if k % 6 == 5 else f"the cat {k}"
            rows.append(
                {
                    "id": f"r{k}",
                    "uid": f"u{k}",
                    "kind": "short",
                    "model": "rules",
                    "prompt_version": "v",
                    "source": "generated",
                    "image": png(k),
                    "conversations": conv(f"<image>\nwhat is {k}?", reply),
                }
            )
            k += 1
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / f"part-{s:05d}.parquet", row_group_size=3)
    return tmp_path


def processor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)  # [3, 8, 8]


def loader(path, seed=0, buf=4):
    return InstructionLoader(path, TOKS["qwen"], processor, "chat", N, seed=seed, shuffle_buffer=buf, batch_rows=2)


@pytest.mark.parametrize("buf", [0, 4, 50])
def test_loader_order_is_seeded_and_resume_is_exact(shards, buf):
    full = list(loader(shards, buf=buf))
    ids = [s["id"] for s in full]
    assert sorted(ids) == sorted(f"r{k}" for k in range(21) if k % 6 != 5)
    assert ids == [s["id"] for s in loader(shards, buf=buf)]
    if buf > 1:
        assert ids != [s["id"] for s in loader(shards, seed=1, buf=buf)]
    s0 = full[0]
    assert s0["pixel_values"].shape == (3, 8, 8) and s0["n_images"] == 1 and (s0["labels"] != IGNORE).any()
    for k in [0, 1, 3, 7, 12, len(ids) - 1, len(ids)]:
        a = loader(shards, buf=buf)
        it = iter(a)
        head = [next(it)["id"] for _ in range(k)]
        b = loader(shards, buf=buf)
        b.load_state(json.loads(json.dumps(a.state())))
        rest = list(b)
        assert head + [s["id"] for s in rest] == ids, k
        assert all(
            torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
            for x, y in zip(rest, full[k:])
        )
    assert b.rejects["no_labels"] == 3
