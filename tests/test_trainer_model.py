"""LlavaLite on tiny random models: packing never leaks attention, HF export matches, freezing and stages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

from trainer.export_hf import export_hf
from trainer.model import IGNORE_INDEX, LlavaLite, positions_from_lens
from trainer.tiny import make_tiny_all, make_tiny_lm, make_tiny_tokenizer

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny tokenizer, LM, vision tower and a LlavaLite built from their folders (fp32, eval)."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = make_tiny_all(root)
    model = LlavaLite.from_parts(dirs["vision"], dirs["lm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(dirs["lm"]))
    processor = CLIPImageProcessor.from_pretrained(str(dirs["vision"]))
    return {"root": root, "dirs": dirs, "model": model, "tokenizer": tokenizer, "processor": processor}


def make_sample(model: LlavaLite, n_images: int, n_text: int, seed: int):
    """Random token ids with `n_images` expanded <image> runs, labels on the text after the first third, pixels."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm.config.vocab_size
    pieces = [torch.randint(4, vocab, (n_text,), generator=g)]
    for _ in range(n_images):
        pieces += [torch.full((model.image_tokens,), model.image_token_id), torch.randint(4, vocab, (3,), generator=g)]
    ids = torch.cat(pieces)  # [L]
    labels = ids.clone()
    labels[ids == model.image_token_id] = IGNORE_INDEX
    labels[: len(ids) // 3] = IGNORE_INDEX  # a prompt part without loss
    pixels = torch.randn(n_images, 3, 64, 64, generator=g)  # [n_images, 3, H, W]
    return ids, labels, pixels


@pytest.fixture(scope="module")
def samples(tiny):
    """Three samples of different lengths with 2, 0 and 1 images."""
    return [make_sample(tiny["model"], n, t, seed) for n, t, seed in [(2, 9, 1), (0, 23, 2), (1, 5, 3)]]


def pack(samples, pad: int = 5):
    """One packed row [1, T] of the samples plus `pad` padding tokens; images concatenated in order."""
    ids = torch.cat([s[0] for s in samples] + [torch.zeros(pad, dtype=torch.long)])[None]  # [1, T]
    labels = torch.cat([s[1] for s in samples] + [torch.full((pad,), IGNORE_INDEX)])[None]  # [1, T]
    pixels = torch.cat([s[2] for s in samples])  # [n_images, 3, H, W]
    return ids, labels, pixels, [[len(s[0]) for s in samples]]


def test_packed_equals_one_by_one(tiny, samples):
    model = tiny["model"]
    ids, labels, pixels, seq_lens = pack(samples)
    position_ids = positions_from_lens(seq_lens, ids.shape[1])  # [1, T]
    assert position_ids[0, len(samples[0][0])] == 0  # positions restart per sample
    with torch.no_grad():
        packed_logits, packed_loss = model(ids, pixels, position_ids=position_ids, seq_lens=seq_lens, labels=labels)
        total, count, start = 0.0, 0, 0
        for s_ids, s_labels, s_pixels in samples:
            logits, _ = model(s_ids[None], s_pixels if len(s_pixels) else None)  # [1, L, V]
            L = len(s_ids)
            torch.testing.assert_close(packed_logits[0, start:start + L], logits[0], atol=ATOL, rtol=0)
            total += F.cross_entropy(logits[0, :-1], s_labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((s_labels[1:] != IGNORE_INDEX).sum())
            start += L
    assert count > 0
    assert abs(packed_loss.item() - total / count) < ATOL
    # cu_seqlens gives the same as per-row sample lengths
    cu = torch.tensor([0, *torch.tensor(seq_lens[0]).cumsum(0).tolist()])
    with torch.no_grad():
        cu_logits, cu_loss = model(ids, pixels, cu_seqlens=cu, labels=labels)
    torch.testing.assert_close(cu_logits[:, : cu[-1]], packed_logits[:, : cu[-1]], atol=0, rtol=0)
    assert cu_loss.item() == packed_loss.item()


def test_changing_sample_one_never_reaches_sample_two(tiny, samples):
    model = tiny["model"]
    ids, labels, pixels, seq_lens = pack(samples)
    n0 = len(samples[0][0])
    changed_ids, changed_pixels = ids.clone(), pixels.clone()
    changed_ids[0, 2] = (changed_ids[0, 2] + 1 - 4) % (model.lm.config.vocab_size - 4) + 4  # a text token of sample 1
    changed_pixels[0] += 1.0  # sample 1's first image
    with torch.no_grad():
        before, _ = model(ids, pixels, seq_lens=seq_lens)
        after, _ = model(changed_ids, changed_pixels, seq_lens=seq_lens)
    assert (before[0, :n0] - after[0, :n0]).abs().max() > 1e-3  # the change is visible in sample 1
    torch.testing.assert_close(after[0, n0:], before[0, n0:], atol=ATOL, rtol=0)


def test_export_loads_in_llava_with_same_logits(tiny, samples):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    out = export_hf(model, tokenizer, tiny["processor"], tiny["root"] / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id
    assert hf.config.vision_feature_layer == -2 and hf.config.vision_feature_select_strategy == "default"
    s_ids, _, s_pixels = samples[0]
    ids, _, pixels, seq_lens = pack(samples, pad=0)
    with torch.no_grad():
        ours, _ = model(s_ids[None], s_pixels)
        theirs = hf(input_ids=s_ids[None], pixel_values=s_pixels).logits
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
        # transformers finds packed samples from restarting position ids: also the same as our block-diagonal mask
        ours_packed, _ = model(ids, pixels, seq_lens=seq_lens)
        position_ids = positions_from_lens(seq_lens, ids.shape[1])  # [1, T]
        # use_cache=False: with a cache transformers skips its packed-sequence detection
        theirs_packed = hf(input_ids=ids, pixel_values=pixels, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(theirs_packed, ours_packed, atol=ATOL, rtol=0)
    processor = LlavaProcessor.from_pretrained(str(out))
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    batch = processor(images=[image], text=["<image>\nWhat colour?"], return_tensors="pt")
    assert int((batch["input_ids"] == model.image_token_id).sum()) == model.image_tokens


def test_vision_frozen_cls_dropped_and_stage_params(tiny, samples):
    model = tiny["model"]
    assert all(not p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.training and model.lm.training
    _, _, pixels = samples[0]
    assert model.image_tokens == (64 // 16) ** 2 == 16
    feats = model.image_features(pixels)  # [2, 16, D]
    assert feats.shape == (2, 16, model.lm.config.hidden_size)
    stage1 = {id(p) for p in model.trainable(1)}
    assert stage1 == {id(p) for p in model.projector.parameters()}
    ids, labels, pixels, seq_lens = pack(samples)
    model.zero_grad()
    _, loss = model(ids, pixels, seq_lens=seq_lens, labels=labels)
    loss.backward()
    assert all(p.grad is None for p in model.lm.parameters()) and all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    stage2 = {id(p) for p in model.trainable(2)}
    assert stage2 == stage1 | {id(p) for p in model.lm.parameters()}
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_image_count_mismatch_is_an_error(tiny, samples):
    ids, _, pixels = samples[0]
    with pytest.raises(ValueError, match="<image> tokens"):
        tiny["model"](ids[None], pixels[:1])


def test_tiny_models_deterministic_and_tokenizer_format(tiny, tmp_path):
    tokenizer = tiny["tokenizer"]
    assert 1000 <= len(tokenizer) <= 2048
    assert tokenizer.convert_tokens_to_ids("<image>") == 3 and tokenizer.pad_token_id == 0
    assert tokenizer("a <image> b", add_special_tokens=False).input_ids.count(3) == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nHi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s>user\n<image>\nHi</s>\n<s>assistant\n"
    again = make_tiny_lm(tmp_path / "lm", make_tiny_tokenizer(tmp_path / "lm"), seed=0)
    for (k, a), b in zip(tiny["model"].lm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
