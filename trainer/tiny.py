"""Tiny random models the project creates offline: tokenizer, causal LM and CLIP vision tower, saved as HF folders."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from trainer.template import CONTENT_MACRO

IMAGE_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<image>", "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]  # ids 0, 1, 2, 3 in this order

# Chat format, one block per turn (roles: system, user, assistant):
#   "<s>{role}\n{content}</s>\n"
# add_generation_prompt=True appends "<s>assistant\n". Content is a string (may hold "<image>") or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts, rendered images first as LLaVA's "<image>\n{text}"
# (trainer.template.CONTENT_MACRO).
CHAT_TEMPLATE = CONTENT_MACRO + (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + content(message['content']) + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "hexagon", "cross", "diamond"]
COUNTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SIZES = ["small", "large", "tiny", "big", "medium", "huge"]
PLACES = [
    "in the top left corner",
    "in the bottom right corner",
    "near the centre",
    "on the left side",
    "on the right side",
    "at the top",
    "at the bottom",
    "next to each other",
    "in a row",
    "scattered around",
]
SCENES = ["a photo", "a drawing", "a diagram", "a painting", "a poster", "a screenshot", "a sketch", "an illustration"]


def default_corpus() -> list[str]:
    """A small built-in English corpus of captions and questions about colours, shapes and counts."""
    lines = [
        "A picture.",
        "Describe the image.",
        "What is in the image?",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Yes.",
        "No.",
    ]
    for colour, shape, (n, count) in itertools.product(COLOURS, SHAPES, enumerate(COUNTS)):
        plural = shape if n == 1 else shape + "s"
        lines += [
            f"There {'is' if n == 1 else 'are'} {count} {colour} {plural} on a plain background.",
            f"How many {colour} {shape}s are in the image? {count.capitalize()}. {n}",
            f"What colour is the {shape}? The {shape} is {colour}.",
            f"What shape is the {colour} object? A {shape}.",
        ]
    for (i, size), place, scene in itertools.product(enumerate(SIZES), PLACES, SCENES):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i + len(place)) % len(SHAPES)]
        lines += [
            f"{scene.capitalize()} showing a {size} {colour} {shape} {place}.",
            f"Where is the {size} {shape}? It is {place}.",
            f"Is this {scene}? Yes, it is {scene}.",
        ]
    lines += [
        f"{SHAPES[n % len(SHAPES)]}: [0.{n:03d}, 0.{(7 * n) % 1000:03d}, 1.0, 1.0] ({n} items)" for n in range(500)
    ]  # box lines as in LLaVA contexts; numbers grow the vocabulary
    return lines


def make_tiny_tokenizer(
    out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: built-in corpus), add special tokens and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_lm(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 64, layers: int = 2
) -> LlamaForCausalLM:
    """Create a random Llama (hidden x layers, heads of hidden/4 up to 64) sized to `tokenizer`; save as safetensors."""
    heads = max(4, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir))
    return model


def make_tiny_vision(out_dir: str | Path, seed: int = 0) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """Create a random CLIP vision tower (64 px, patch 16: 16 patches + CLS) and its image processor, and save both."""
    config = CLIPVisionConfig(
        image_size=64,
        patch_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return model, processor


def make_tiny_all(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Create tokenizer + LM in `root/lm` and vision tower + processor in `root/vision`; return the two folders."""
    root = Path(root)
    tokenizer = make_tiny_tokenizer(root / "lm")
    make_tiny_lm(root / "lm", tokenizer, seed=seed)
    make_tiny_vision(root / "vision", seed=seed)
    return {"lm": root / "lm", "vision": root / "vision"}
