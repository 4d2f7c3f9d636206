"""LlavaLite on tiny random models: packing never leaks attention, HF export matches, freezing and stages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

from trainer import model as model_mod
from trainer.export_hf import export_hf
from trainer.model import IGNORE_INDEX, LlavaLite, flat_cu_seqlens, positions_from_lens, varlen_sdpa_attention
from trainer.template import chat_template, encode
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


@pytest.mark.parametrize("mode", ["varlen", "mask"])
def test_packed_equals_one_by_one(tiny, samples, mode):
    model = tiny["model"]
    ids, labels, pixels, seq_lens = pack(samples)
    position_ids = positions_from_lens(seq_lens, ids.shape[1])  # [1, T]
    assert position_ids[0, len(samples[0][0])] == 0  # positions restart per sample
    with torch.no_grad():
        packed_logits, packed_loss = model(
            ids, pixels, position_ids=position_ids, seq_lens=seq_lens, labels=labels, packed_attention=mode
        )
        total, count, start = 0.0, 0, 0
        for s_ids, s_labels, s_pixels in samples:
            logits, _ = model(s_ids[None], s_pixels if len(s_pixels) else None)  # [1, L, V]
            L = len(s_ids)
            torch.testing.assert_close(packed_logits[0, start : start + L], logits[0], atol=ATOL, rtol=0)
            total += F.cross_entropy(logits[0, :-1], s_labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((s_labels[1:] != IGNORE_INDEX).sum())
            start += L
    assert count > 0
    assert abs(packed_loss.item() - total / count) < ATOL
    # cu_seqlens gives the same as per-row sample lengths
    cu = torch.tensor([0, *torch.tensor(seq_lens[0]).cumsum(0).tolist()])
    with torch.no_grad():
        cu_logits, cu_loss = model(ids, pixels, cu_seqlens=cu, labels=labels, packed_attention=mode)
    torch.testing.assert_close(cu_logits[:, : cu[-1]], packed_logits[:, : cu[-1]], atol=0, rtol=0)
    assert cu_loss.item() == packed_loss.item()


@pytest.mark.parametrize("mode", ["varlen", "mask"])
def test_changing_sample_one_never_reaches_sample_two(tiny, samples, mode):
    model = tiny["model"]
    ids, _labels, pixels, seq_lens = pack(samples)
    n0 = len(samples[0][0])
    changed_ids, changed_pixels = ids.clone(), pixels.clone()
    changed_ids[0, 2] = (changed_ids[0, 2] + 1 - 4) % (model.lm.config.vocab_size - 4) + 4  # a text token of sample 1
    changed_pixels[0] += 1.0  # sample 1's first image
    with torch.no_grad():
        before, _ = model(ids, pixels, seq_lens=seq_lens, packed_attention=mode)
        after, _ = model(changed_ids, changed_pixels, seq_lens=seq_lens, packed_attention=mode)
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


@pytest.mark.parametrize("template,own", [("chat", True), ("chat", False), ("plain", True)])
def test_export_carries_the_trained_chat_template(tiny, tmp_path, template, own):
    """The export's chat template (tokenizer and processor, chat_template.jinja) renders the trained prompt: the
    tokenizer's own, the Vicuna fallback for a tokenizer without one, or plain; the caller's tokenizer unchanged."""
    from PIL import Image

    model, tok, system = tiny["model"], tiny["tokenizer"], "Answer briefly."
    before = tok.chat_template
    if not own:
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    out = export_hf(model, tok, tiny["processor"], tmp_path / "hf", template=template, system=system)
    want = chat_template(tok, template, system)
    assert tok.chat_template == (before if own else None) and tiny["tokenizer"].chat_template == before
    assert (out / "chat_template.jinja").read_text() == want
    processor = LlavaProcessor.from_pretrained(str(out))
    assert processor.chat_template == AutoTokenizer.from_pretrained(str(out)).chat_template == want
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    ids = processor(images=[Image.new("RGB", (64, 64))], text=[prompt], add_special_tokens=False)["input_ids"][0]
    e = encode(
        [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        tok,
        template,
        model.image_tokens,
        system,
    )
    start = next(i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX)
    assert list(ids) == e.input_ids[: len(ids)] and start - len(ids) in (0, 1), (prompt, tok.decode(e.input_ids))
    assert ids.count(model.image_token_id) == model.image_tokens


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
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nHi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>user\n<image>\nHi</s>\n<s>assistant\n"
    again = make_tiny_lm(tmp_path / "lm", make_tiny_tokenizer(tmp_path / "lm"), seed=0)
    for (k, a), b in zip(tiny["model"].lm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def _two_packed_rows(samples, extra):
    """Two packed rows [2, T]: (s0, s1) + 3 pad and (s2, extra) + pad; images in reading order; the four samples."""
    rows = [[samples[0], samples[1]], [samples[2], extra]]
    T = max(sum(len(s[0]) for s in r) for r in rows) + 3
    ids = torch.zeros(2, T, dtype=torch.long)
    labels = torch.full((2, T), IGNORE_INDEX)
    for b, r in enumerate(rows):
        flat_ids, flat_labels = torch.cat([s[0] for s in r]), torch.cat([s[1] for s in r])
        ids[b, : len(flat_ids)], labels[b, : len(flat_labels)] = flat_ids, flat_labels
    pixels = torch.cat([s[2] for r in rows for s in r])  # [n_images, 3, H, W]
    return ids, labels, pixels, [[len(s[0]) for s in r] for r in rows], [s for r in rows for s in r]


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_varlen_equals_one_by_one_and_mask_forward_and_gradients(tiny, samples, monkeypatch):
    model = tiny["model"]
    params = model.trainable(2)  # projector + LM: gradients everywhere attention matters
    model.zero_grad(set_to_none=True)
    ids, labels, pixels, seq_lens, flat = _two_packed_rows(samples, make_sample(model, 1, 12, 4))
    calls = []

    def spy(module, query, *args, **kwargs):
        calls.append(int(kwargs["cu_seq_lens_q"].numel()) - 1)
        return varlen_sdpa_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(model_mod.AttentionInterface._global_mapping, model_mod.VARLEN_ATTENTION, spy)
    with monkeypatch.context() as m:
        m.setattr(model_mod, "packed_attention_mask", lambda *a: pytest.fail("varlen built a dense mask"))
        v_logits, v_loss = model(ids, pixels, seq_lens=seq_lens, labels=labels, packed_attention="varlen")
        v_loss.backward()
    v_grads = _grads(model)
    assert calls == [6] * model.lm.config.num_hidden_layers  # 4 samples + 2 padding tails, in every layer
    assert model.lm.config._attn_implementation == "sdpa"  # restored after the call

    m_logits, m_loss = model(ids, pixels, seq_lens=seq_lens, labels=labels, packed_attention="mask")
    m_loss.backward()
    m_grads = _grads(model)

    total, count = 0.0, 0
    starts = [0, len(flat[0][0]), 0, len(flat[2][0])]
    for k, (s_ids, s_labels, s_pixels) in enumerate(flat):
        logits, _ = model(s_ids[None], s_pixels if len(s_pixels) else None)  # [1, L, V]
        L, row = len(s_ids), k // 2
        torch.testing.assert_close(v_logits[row, starts[k] : starts[k] + L], logits[0], atol=ATOL, rtol=0)
        total = total + F.cross_entropy(logits[0, :-1], s_labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((s_labels[1:] != IGNORE_INDEX).sum())
    (total / count).backward()
    o_grads = _grads(model)
    real = labels != IGNORE_INDEX
    torch.testing.assert_close(v_logits[real], m_logits[real], atol=ATOL, rtol=0)
    assert abs(v_loss.item() - m_loss.item()) < ATOL and abs(v_loss.item() - total.item() / count) < ATOL
    assert set(v_grads) == set(m_grads) == set(o_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == len(v_grads)
    for name, g in v_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, m_grads[name], atol=1e-6, rtol=1e-4, msg=f"varlen vs mask grad {name}")
        torch.testing.assert_close(g, o_grads[name], atol=1e-6, rtol=1e-4, msg=f"varlen vs one-by-one grad {name}")


def test_padded_batch_uses_standard_hf_mask_and_equals_one_by_one(tiny, samples, monkeypatch):
    model = tiny["model"]
    T = max(len(s[0]) for s in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s[0])] = s[0]
    pixels = torch.cat([s[2] for s in samples])
    monkeypatch.setattr(model_mod, "packed_attention_mask", lambda *a: pytest.fail("padded batch built a dense mask"))
    monkeypatch.setitem(
        model_mod.AttentionInterface._global_mapping,
        model_mod.VARLEN_ATTENTION,
        lambda *a, **k: pytest.fail("padded batch went through varlen"),
    )
    with torch.no_grad():
        padded, _ = model(ids, pixels, seq_lens=[[len(s[0])] for s in samples])
        for b, (s_ids, _, s_pixels) in enumerate(samples):
            alone, _ = model(s_ids[None], s_pixels if len(s_pixels) else None)
            torch.testing.assert_close(padded[b, : len(s_ids)], alone[0], atol=ATOL, rtol=0)


def test_varlen_boundaries_and_errors(tiny, monkeypatch):
    assert flat_cu_seqlens([[3, 2], [4]], 6).tolist() == [0, 3, 5, 6, 10, 12]  # padding tails are segments
    assert flat_cu_seqlens([[6], [2, 4]], 6).tolist() == [0, 6, 8, 12]
    q = torch.randn(1, 4, 5, 16)
    attn = tiny["model"].lm.model.layers[0].self_attn
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_sdpa_attention(attn, q, q, q, None)
    with pytest.raises(ValueError, match="from 0 to B\\*T=5"):
        varlen_sdpa_attention(attn, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="packed_attention"):
        tiny["model"](torch.tensor([[5, 6, 7]]), packed_attention="dense")

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setitem(model_mod.AttentionInterface._global_mapping, model_mod.VARLEN_ATTENTION, broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        tiny["model"](torch.tensor([[5, 6, 7, 8]]), seq_lens=[[2, 2]])
    assert tiny["model"].lm.config._attn_implementation == "sdpa"  # restored even when the call fails


def test_flash_branch_passes_varlen_kwargs(tiny, samples, monkeypatch):
    """The CUDA flash-attention branch cannot run here: a stand-in kernel checks what it would get."""
    model = tiny["model"]
    ids, _labels, pixels, seq_lens = pack(samples)
    with torch.no_grad():
        expected, _ = model(ids, pixels, seq_lens=seq_lens, packed_attention="varlen")
    seen = []

    def fake_flash(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs["cu_seq_lens_q"].tolist(), kwargs["max_length_q"]))
        assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"] and kwargs["cu_seq_lens_q"].dtype == torch.int32
        return varlen_sdpa_attention(module, query, key, value, None, **kwargs)

    monkeypatch.setitem(model_mod.AttentionInterface._global_mapping, "flash_attention_2", fake_flash)
    monkeypatch.setattr(model.lm.config, "_attn_implementation_internal", "flash_attention_2")
    with torch.no_grad():
        got, _ = model(ids, pixels, seq_lens=seq_lens, packed_attention="mask")  # flash ignores the mode
    lens = seq_lens[0]
    cu = [0, lens[0], lens[0] + lens[1], sum(lens), ids.shape[1]]
    assert seen and all(s == (None, cu, max(lens)) for s in seen)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_activation_checkpointing_falls_back_to_the_mask(tiny, samples, monkeypatch):
    model = tiny["model"]
    ids, labels, pixels, seq_lens = pack(samples)
    with torch.no_grad():
        expected, _ = model(ids, pixels, seq_lens=seq_lens)
    built = []
    dense = model_mod.packed_attention_mask
    monkeypatch.setattr(model_mod, "packed_attention_mask", lambda *a: built.append(1) or dense(*a))
    model.lm.activation_checkpointing_enable()
    try:
        with torch.no_grad():
            got, _ = model(ids, pixels, seq_lens=seq_lens)
    finally:
        model.lm.activation_checkpointing_disable()
    assert built == [1]  # recomputation in backward would run without the varlen function: the mask is used
    real = labels[0] != IGNORE_INDEX
    torch.testing.assert_close(got[0, real], expected[0, real], atol=ATOL, rtol=0)
