"""Conversation templates: token ids and label masks for LLaVA stage 1 (`plain`) and stage 2 (`chat`), and the
Jinja chat template an export carries so that a server renders the prompts the model was trained on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

IMAGE = "<image>"
IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant"}
# The fallback chat format (Vicuna v1, LLaVA v1.5's conv_vicuna_v1), used when the tokenizer has no chat template:
#   "{system} USER: {human} ASSISTANT: {gpt}{eos}USER: ..."  (the system part and its space only when system is given)
FALLBACK_SYSTEM_SEP, FALLBACK_USER, FALLBACK_ASSISTANT = " ", "USER: ", "ASSISTANT: "

Template = Literal["plain", "chat"]


class EncodeError(ValueError):
    """A sample that cannot be trained on; `reason` is a machine-readable code (no_labels, too_long, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Encoded:
    """Token ids, labels (-100 where no loss) and the number of images the ids hold."""

    input_ids: list[int]
    labels: list[int]
    n_images: int


def _turns(conversations: Sequence) -> list[tuple[str, str]]:
    """(from, value) pairs from dicts ({'from','value'}) or schemas.Turn models."""
    out = []
    for i, t in enumerate(conversations):
        src, val = (t.get("from", t.get("from_")), t.get("value")) if isinstance(t, dict) else (t.from_, t.value)
        if src not in ROLES or not isinstance(val, str):
            raise EncodeError("bad_turns", f"turn {i} has from={src!r}; expected 'human' or 'gpt' with a string value")
        out.append((src, val))
    if not out:
        raise EncodeError("bad_turns", "empty conversation")
    return out


def image_token_id(tokenizer) -> int:
    """The id of the tokenizer's own `<image>` special token; a clear error when it has none."""
    tid = tokenizer.get_added_vocab().get(IMAGE)
    if tid is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {IMAGE} special token: call "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{IMAGE}']}}) and resize the LM's embeddings"
        )
    return tid


def _render_plain(turns, tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """LLaVA's plain template: the image then the first gpt value (human text dropped); EOS appended by the caller."""
    caption = next((v for s, v in turns if s == "gpt"), None)
    if caption is None:
        raise EncodeError("no_labels", "plain template needs a gpt turn (the caption)")
    n_img = sum(v.count(IMAGE) for s, v in turns if s == "human")
    text = IMAGE * n_img
    return text + caption, [(len(text), len(text) + len(caption))] if caption.strip() else [], True


def _render_fallback(turns, tokenizer, system: str | None) -> tuple[str, list[tuple[int, int]], bool]:
    """The documented Vicuna v1 format; assistant spans (reply + EOS) recorded while rendering."""
    eos = tokenizer.eos_token or ""
    text, spans = (system + FALLBACK_SYSTEM_SEP) if system is not None else "", []
    for src, val in turns:
        if src == "human":
            text += FALLBACK_USER + val + " "
        else:
            text += FALLBACK_ASSISTANT
            if val.strip():  # an empty reply labels nothing, not even its EOS
                spans.append((len(text), len(text) + len(val) + len(eos)))
            text += val + eos
    return text, spans, False


def _prompt_end(tokenizer, head: list[dict], text: str) -> int:
    """End of the rendered prompt (generation prompt included) before a reply, or 0 when not a prefix of `text`."""
    try:
        prompt = tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    except Exception:
        return 0
    return len(prompt) if text.startswith(prompt) else 0


def _render_chat(turns, tokenizer, system: str | None) -> tuple[str, list[tuple[int, int]], bool]:
    """Render with the tokenizer's chat template, then find each message's content in order in the rendered text."""
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": ROLES[s], "content": v} for s, v in turns
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    cursor, spans = 0, []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":  # skip the assistant header: its reply starts after the generation prompt
            cursor = max(cursor, _prompt_end(tokenizer, msgs[:i], text))
        for cand in (m["content"], m["content"].strip()):  # templates may trim (Llama 3's `| trim`)
            at = text.find(cand, cursor)
            if at >= 0:
                break
        else:
            raise EncodeError(
                "template_mismatch",
                f"the chat template does not render the {m['role']} content "
                f"{m['content'][:40]!r} verbatim; use a template that does, or set tokenizer.chat_template = "
                f"None for the fallback",
            )
        cursor = at + len(cand)
        if m["role"] == "assistant" and cand.strip():
            spans.append((at, cursor))
    return text, spans, False


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of text by default (the plain template then starts with it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]


def _labelled(offsets, spans) -> list[bool]:
    """Whether each token's character span overlaps an assistant span (zero-width trimmed offsets widened by one)."""
    out = []
    for a, b in offsets:
        if a == b and a > 0:
            a -= 1  # ByteLevel trim_offsets leaves a whitespace token as (end, end)
        hit = False
        for s, e in spans:
            if a < e and b > s and b > a:
                hit = True
                break
        out.append(hit)
    return out


def encode(
    conversations: Sequence,
    tokenizer,
    template: Template,
    image_tokens: int,
    system: str | None = None,
    max_len: int | None = None,
) -> Encoded:
    """Token ids and labels of one conversation; raises EncodeError(no_labels | too_long | ...) instead of training
    on nothing."""
    turns = _turns(conversations)
    img_id = image_token_id(tokenizer)
    if template == "plain":
        text, spans, add_eos = _render_plain(turns, tokenizer)
    elif template == "chat":
        render = _render_chat if getattr(tokenizer, "chat_template", None) else _render_fallback
        text, spans, add_eos = render(turns, tokenizer, system)
    else:
        raise ValueError(f"template must be 'plain' or 'chat', got {template!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), _labelled(enc["offset_mapping"], spans)
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        specials = set(tokenizer.get_added_vocab().values()) - {img_id}
        reply = list(mask)
        for i in range(len(ids) - 1):  # the end-of-turn token: the special token right after a reply
            if reply[i] and not reply[i + 1] and ids[i + 1] in specials:
                mask[i + 1] = True
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the plain template needs a tokenizer with an eos_token")
        if _adds_bos(tokenizer):
            ids, mask = [tokenizer.bos_token_id] + ids, [False] + mask
        ids, mask = ids + [tokenizer.eos_token_id], mask + [any(mask)]
    if not any(m and t != img_id for m, t in zip(mask, ids)):
        raise EncodeError(
            "no_labels", "no assistant tokens to train on (empty reply, or a template/tokenizer mismatch)"
        )
    out_ids, labels, n_images = [], [], 0
    for t, m in zip(ids, mask):
        if t == img_id:
            out_ids += [img_id] * image_tokens
            labels += [IGNORE] * image_tokens
            n_images += 1
        else:
            out_ids.append(t)
            labels.append(t if m else IGNORE)
    if max_len is not None and len(out_ids) > max_len:
        raise EncodeError("too_long", f"{len(out_ids)} tokens > max_len {max_len}")
    return Encoded(out_ids, labels, n_images)


def length(conversations: Sequence, tokenizer, template: Template, image_tokens: int, system: str | None = None) -> int:
    """Token length of a sample (text tokens plus image tokens), as the packer counts it."""
    return len(encode(conversations, tokenizer, template, image_tokens, system).input_ids)


def _jinja(template: str, **values: str | None) -> str:
    """Fill @NAME@ slots with Jinja literals (strings quoted and escaped, None as `none`)."""
    for name, value in values.items():
        template = template.replace(f"@{name}@", "none" if value is None else json.dumps(value, ensure_ascii=False))
    return template


# Jinja for the chat templates an export carries (transformers and vLLM render them). A message's content is a
# string or a list of parts; a list renders as vLLM renders content for a string-content template: its images
# first, one `<image>` line each, then its text parts joined by newlines (LLaVA's `<image>\n{question}`).
CONTENT_MACRO = _jinja(
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- else -%}"
    "{%- set cs = namespace(img='', txt='', n=0) -%}"
    "{%- for p in c -%}"
    "{%- if p['type'] in ('image', 'image_url') -%}{%- set cs.img = cs.img + ('\\n' if cs.img else '') + @IMAGE@ -%}"
    "{%- elif p['type'] == 'text' -%}{%- set cs.txt = cs.txt + ('\\n' if cs.n else '') + p['text'] -%}"
    "{%- set cs.n = cs.n + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ cs.img + ('\\n' if cs.img and cs.txt else '') + cs.txt }}"
    "{%- endif -%}"
    "{%- endmacro -%}",
    IMAGE=IMAGE,
)
# plain: the user turns' images, then the first reply and EOS; all other text dropped (as _render_plain)
_PLAIN = (
    "@BOS@"
    "{%- set ns = namespace(reply=none) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if m['content'] is string -%}{{ @IMAGE@ * m['content'].count(@IMAGE@) }}"
    "{%- else -%}{%- for p in m['content'] if p['type'] in ('image', 'image_url') -%}{{ @IMAGE@ }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif m['role'] == 'assistant' and ns.reply is none -%}{%- set ns.reply = content(m['content']) -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.reply is not none -%}{{ ns.reply + @EOS@ }}{%- endif -%}"
)
# the Vicuna v1 fallback (as _render_fallback); the generation prompt stops before the space that training tokenized
# with the reply's first word (LLaVA's inference prompt ends at "ASSISTANT:" too)
_FALLBACK = (
    "{%- set ns = namespace(system=@SYSTEM@) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = content(m['content']) -%}{%- endfor -%}"
    "{%- if ns.system is not none -%}{{ ns.system + @SYSTEM_SEP@ }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ @USER@ + content(m['content']) + ' ' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ @ASSISTANT@ + content(m['content']) + @EOS@ }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ @ASSISTANT_PROMPT@ }}{%- endif -%}"
)
# a default system message in front of the tokenizer's own template, as encode(system=...) adds it
_DEFAULT_SYSTEM = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{%- set messages = [{'role': 'system', 'content': @SYSTEM@}] + messages -%}"
    "{%- endif -%}"
)


def chat_template(tokenizer, template: Template, system: str | None = None) -> str:
    """The Jinja chat template rendering what `encode(..., template, system=system)` trains on, for an export.

    chat: the tokenizer's own template (with `system` as the default system message), else the Vicuna v1 fallback;
    plain: the images and the caption. Rendered with add_special_tokens=False, as vLLM and transformers do."""
    eos = tokenizer.eos_token or ""
    if template == "plain":
        bos = "{{ " + json.dumps(tokenizer.bos_token) + " }}" if _adds_bos(tokenizer) else ""
        return CONTENT_MACRO + _jinja(_PLAIN.replace("@BOS@", bos), IMAGE=IMAGE, EOS=eos)
    if template != "chat":
        raise ValueError(f"template must be 'plain' or 'chat', got {template!r}")
    own = getattr(tokenizer, "chat_template", None)
    if own:
        if not isinstance(own, str):
            raise ValueError("the tokenizer has several named chat templates: export needs one")
        return own if system is None else _jinja(_DEFAULT_SYSTEM, SYSTEM=system) + own
    return CONTENT_MACRO + _jinja(
        _FALLBACK,
        SYSTEM=system,
        SYSTEM_SEP=FALLBACK_SYSTEM_SEP,
        USER=FALLBACK_USER,
        ASSISTANT=FALLBACK_ASSISTANT,
        ASSISTANT_PROMPT=FALLBACK_ASSISTANT.rstrip(),
        EOS=eos,
    )
