"""AnyRes, the patch-merge projector and stage 1.5 on tiny models: token counts agree with transformers' LLaVA-NeXT,
the LlavaNext export gives our logits, the 2x2 merge groups neighbours, stage 1.5 trains the tower at its own lr."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

from tests.test_train import cfg, env, log  # noqa: F401 - env is a fixture
from trainer.anyres import AnyRes, grid_shape
from trainer.eval_shards import evaluate_shards
from trainer.export_hf import export_hf
from trainer.model import LlavaLite, PatchMerger
from trainer.train import load_trained, train

# (H, W): square, wide, tall, very wide, odd sizes, one smaller than a tile
SIZES = [(64, 64), (48, 150), (170, 60), (40, 200), (101, 37), (30, 50)]
ATOL = 1e-5


def png(h: int, w: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(env):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(env["lm"])
    processor = CLIPImageProcessor.from_pretrained(env["vision"])
    return env, tokenizer, processor


def anyres_model(dirs, max_tiles=None, projector="mlp") -> LlavaLite:
    return LlavaLite.from_parts(
        dirs["vision"], dirs["lm"], projector=projector, anyres=AnyRes(max_tiles=max_tiles)
    ).eval()


def prompt_ids(model, tokenizer, sizes) -> torch.Tensor:
    """One row: for each image some text then its `<image>` run, as the packer expands it."""
    ids = []
    for k, size in enumerate(sizes):
        ids += tokenizer(f"picture {k}:", add_special_tokens=False)["input_ids"]
        ids += [model.image_token_id] * model.tokens_for(size)
    return torch.tensor(ids)[None]  # [1, T]


def test_views_and_tokens_match_transformers(parts, tmp_path):
    dirs, tokenizer, processor = parts
    model = anyres_model(dirs)
    assert model.pinpoints == [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]
    inputs = model.image_inputs(processor)
    out = export_hf(model, tokenizer, processor, tmp_path / "hf")
    hf_proc = LlavaNextProcessor.from_pretrained(str(out))
    for k, (h, w) in enumerate(SIZES):
        image = png(h, w, k)
        pixel_values, image_sizes = inputs([image])
        rows, cols = grid_shape((h, w), model.pinpoints, 64)
        assert image_sizes == [[h, w]] and pixel_values.shape == (1 + rows * cols, 3, 64, 64)
        n = model.tokens_for((h, w))
        with torch.no_grad():
            assert model.image_embeddings(pixel_values, image_sizes).shape == (n, model.lm.config.hidden_size)
        batch = hf_proc(images=[Image.open(io.BytesIO(image))], text=["<image>\nWhat?"], return_tensors="pt")
        assert int((batch["input_ids"] == model.image_token_id).sum()) == n, (h, w)
        torch.testing.assert_close(batch["pixel_values"][0], pixel_values)
    # the wide image gets a wide grid, the tall one a tall grid, and more tokens than one view
    assert grid_shape((40, 200), model.pinpoints, 64) == (1, 3) and grid_shape((170, 60), model.pinpoints, 64)[0] > 1
    assert model.tokens_for((40, 200)) > 16
    with pytest.raises(ValueError, match="tokens_for"):
        _ = model.image_tokens
    with pytest.raises(ValueError, match="multiples"):
        AnyRes(grid_pinpoints=[(64, 100)]).pinpoints(64)


def test_llava_next_export_same_logits(parts, tmp_path):
    dirs, tokenizer, processor = parts
    model = anyres_model(dirs)
    torch.nn.init.normal_(model.image_newline, std=1.0)  # a newline that matters in the comparison
    out = export_hf(model, tokenizer, processor, tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.image_grid_pinpoints == model.pinpoints
    images = [png(48, 150, 1), png(170, 60, 2), png(64, 64, 3)]
    sizes = [(48, 150), (170, 60), (64, 64)]
    ids = prompt_ids(model, tokenizer, sizes)
    pixel_values, image_sizes = model.image_inputs(processor)(images)
    views = [1 + rows * cols for rows, cols in (grid_shape(s, model.pinpoints, 64) for s in sizes)]
    padded = torch.zeros(len(images), max(views), *pixel_values.shape[1:])  # [n_images, max views, C, t, t]
    for k, v in enumerate(torch.split(pixel_values, views)):
        padded[k, : len(v)] = v
    with torch.no_grad():
        ours, _ = model(ids, pixel_values, image_sizes=image_sizes)
        theirs = hf(input_ids=ids, pixel_values=padded, image_sizes=torch.tensor(image_sizes)).logits
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
        model.image_newline.zero_()  # the newline is in the path: changing it changes our logits
        changed, _ = model(ids, pixel_values, image_sizes=image_sizes)
    assert (changed - ours).abs().max() > 1e-3


def test_token_budget_pools_the_map(parts):
    dirs, _, processor = parts
    free, pooled = anyres_model(dirs), anyres_model(dirs, max_tiles=1)
    size = (128, 128)  # a 2x2 grid: 4 tiles' worth of features before pooling
    assert free.tokens_for(size) == 16 + 8 * 9
    assert pooled.tokens_for(size) == 16 + 4 * 5  # pooled to 1 tile's worth, plus the newlines
    px, sizes = pooled.image_inputs(processor)([png(*size)])
    with torch.no_grad():
        assert pooled.image_embeddings(px, sizes).shape[0] == pooled.tokens_for(size)
    assert pooled.tokens_for((64, 64)) == free.tokens_for((64, 64))  # under the budget: unchanged


def test_patch_merge_groups_neighbours(parts, tmp_path):
    dirs, tokenizer, processor = parts
    model = LlavaLite.from_parts(dirs["vision"], dirs["lm"], projector="patch_merge").eval()
    assert isinstance(model.projector, PatchMerger) and model.image_tokens == 4  # 4x4 patches -> 2x2
    x = torch.randn(1, 16, model.vision.config.hidden_size)
    base = model.projector(x)
    for patch, merged in [(0, 0), (1, 0), (4, 0), (5, 0), (2, 1), (7, 1), (8, 2), (13, 2), (10, 3), (15, 3)]:
        y = x.clone()
        y[0, patch] += torch.randn(x.shape[-1])  # not a constant: LayerNorm would remove that
        moved = (model.projector(y) - base).abs().amax(-1)[0]  # [4]
        assert moved.argmax() == merged and int((moved > 1e-6).sum()) == 1, (patch, moved)
    with pytest.raises(ValueError, match="patch_merge"):
        export_hf(model, tokenizer, processor, tmp_path / "hf")


def test_stage_one_point_five_trains_every_part(env, tmp_path):  # noqa: F811
    c = cfg(env, tmp_path / "s15", stage=1.5, max_steps=3, lr=1e-3, anyres={"grid_pinpoints": [[64, 128], [128, 64]]})
    assert c.vision_lr == 2e-6 and c.template == "chat"
    model = LlavaLite.from_parts(env["vision"], env["lm"], anyres=c.anyres)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = train(c)
    assert s["finished"] and all(r["loss"] == r["loss"] for r in log(tmp_path / "s15"))
    trained = load_trained(tmp_path / "s15")
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("vision.") for n in changed) and any(n.startswith("lm.") for n in changed)
    assert "image_newline" in changed and any(n.startswith("projector.") for n in changed)
    state = json.loads((tmp_path / "s15" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["stage"] == 1.5
    opt = torch.load(tmp_path / "s15" / "checkpoints" / "step-3" / "optimizer.pt", weights_only=False)
    assert sorted(g["initial_lr"] for g in opt["param_groups"]) == [2e-6, 1e-3]
    report = evaluate_shards(tmp_path / "s15", [env["chat"]], rank=True)  # `curate eval` on an AnyRes model
    assert report["questions"] == 48 and 0 <= report["metrics"]["overall"]["exact"] <= 1
    assert report["ranking"]["colour"]["n"] > 0  # the colour questions, scored through the AnyRes views
    # stage 2 from it starts from the stage-1.5 tower, not the original one
    s2 = train(cfg(env, tmp_path / "s2", max_steps=1, init_from=str(tmp_path / "s15"), anyres=c.anyres))
    assert any(k.startswith("vision.") for k in s2["init_loaded"]) and "image_newline" in s2["init_loaded"]
    with pytest.raises(Exception, match="do not fit"):
        train(cfg(env, tmp_path / "bad", max_steps=1, init_from=str(tmp_path / "s15")))  # no AnyRes: no newline
    with pytest.raises(Exception, match="vision_lr"):
        cfg(env, tmp_path / "x", stage=2, vision_lr=1e-5)
