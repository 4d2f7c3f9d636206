"""The embed stage: tiny open_clip weights through the real loading path, preprocessing parity, rejects, text."""

import io
import socket
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image as PILImage

from curation.concepts.clip import (
    TINY_MODEL,
    load_clip,
    make_tiny_checkpoint,
    model_id_for,
    pick_precision,
    register_tiny,
    weights_id,
)
from curation.engine.store import REJECT_SCHEMA
from curation.fixtures.photos import real_photos
from curation.ops.embed import Embed, EmbedParams
from schemas import Embedding, arrow_schema


def _jpeg(im: PILImage.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def clip(ckpt):
    return load_clip(TINY_MODEL, str(ckpt), precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def images():
    """Real photos at varied sizes and crops, plus a grayscale and a CMYK JPEG: 12 distinct images."""
    photos = [im for _, im, _ in real_photos()][:5]
    out = []
    for k, im in enumerate(photos):
        out.append(_jpeg(im.resize((96 + 8 * k, 80))))
        out.append(_jpeg(im.crop((0, 0, im.width // 2, im.height // 3))))
    out.append(_jpeg(photos[0].convert("L").resize((70, 90))))
    out.append(_jpeg(photos[1].convert("CMYK").resize((120, 64))))
    return out


def _op(ckpt, tmp_path, **kw) -> Embed:
    op = Embed(EmbedParams(model=TINY_MODEL, pretrained=str(ckpt), precision="fp32", **kw), "embed", tmp_path / "_work")
    op.setup()
    return op


def _table(uids, images, captions) -> pa.Table:
    return pa.table(
        {
            "uid": uids,
            "url": [f"http://127.0.0.1/{u}" for u in uids],
            "caption": pa.array(captions, pa.string()),
            "image": pa.array(images, pa.binary()),
        }
    )


def test_tiny_checkpoint_round_trips_through_pretrained_file(ckpt, clip, tmp_path):
    register_tiny()
    register_tiny()  # idempotent
    model, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(ckpt))
    saved = torch.load(ckpt, weights_only=True)
    again = torch.load(make_tiny_checkpoint(tmp_path / "again.pt", seed=0), weights_only=True)
    for sd in (model.state_dict(), clip.model.state_dict(), again):
        assert sd.keys() == saved.keys() and all(torch.equal(sd[k], saved[k]) for k in saved)
    other = torch.load(make_tiny_checkpoint(tmp_path / "other.pt", seed=1), weights_only=True)
    assert not torch.equal(other["visual.conv1.weight"], saved["visual.conv1.weight"])
    assert clip.model_id == f"{TINY_MODEL}/{weights_id(ckpt)}@fp32" == model_id_for(TINY_MODEL, str(ckpt), "fp32")
    assert clip.model_id != model_id_for(TINY_MODEL, str(tmp_path / "other.pt"), "fp32")  # other weights, other id
    assert clip.dim == 64 and clip.device == "cpu"


def test_embeddings_unit_norm_deterministic_and_batch_size_free(clip, images):
    a, ok_a, err_a = clip.encode_images(images, batch_size=7)
    b, _, _ = clip.encode_images(images, batch_size=7)
    c, ok_c, _ = clip.encode_images(images, batch_size=1)
    assert a.dtype == np.float32 and a.shape == (len(images), 64) and not err_a
    assert ok_a.tolist() == ok_c.tolist() == list(range(len(images)))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_bf16_close_to_fp32(ckpt, clip, images):
    bf = load_clip(TINY_MODEL, str(ckpt), precision="bf16", device="cpu")
    assert bf.model_id.endswith("@bf16") and next(bf.model.parameters()).dtype == torch.bfloat16
    x, _, _ = bf.encode_images(images, batch_size=7)
    y, _, _ = bf.encode_images(images, batch_size=1)
    ref, _, _ = clip.encode_images(images)
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.abs(x - y).max() < 1e-2  # bf16 has 8 mantissa bits: batch shape changes the kernels' rounding
    assert (x * ref).sum(1).min() > 0.999  # cosine to fp32


def test_overlapped_preprocessing_matches_open_clip(clip, images):
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    model.load_state_dict(clip.model.state_dict())
    model.eval()
    pixels = torch.stack([preprocess(PILImage.open(io.BytesIO(b))) for b in images])  # [N, 3, 64, 64]
    batch, ok, errors = clip._prepare(images, 0)
    assert ok == list(range(len(images))) and not errors
    torch.testing.assert_close(clip._normalise(batch), pixels, atol=1e-6, rtol=0)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()  # [N, D]
    emb, _, _ = clip.encode_images(images, batch_size=5)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_bad_images_are_rejected_and_accounting_holds(ckpt, images, tmp_path):
    op = _op(ckpt, tmp_path)
    bad = {"b-empty": b"", "b-noise": bytes(range(256)) * 4, "b-trunc": images[0][: len(images[0]) // 3]}
    good = {f"g{i}": images[i] for i in range(4)}
    rows = {**bad, **good}
    uids = sorted(rows, reverse=True)
    out, rejects = op.process("p0", _table(uids, [rows[u] for u in uids], [f"photo {u}" for u in uids]))
    assert out.schema == arrow_schema(Embedding) and rejects.schema == REJECT_SCHEMA
    assert out.num_rows + rejects.num_rows == len(rows)
    assert out.column("uid").to_pylist() == sorted(good)
    assert sorted(rejects.column("uid").to_pylist()) == sorted(bad)
    assert set(rejects.column("reason").to_pylist()) == {"decode_error"}
    assert all(d for d in rejects.column("detail").to_pylist())
    assert set(out.column("model").to_pylist()) == {op.clip.model_id}
    emb = np.array(out.column("image_embedding").to_pylist(), np.float32)
    ref, _, _ = op.clip.encode_images([good[u] for u in sorted(good)])
    np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_empty_table_gives_empty_outputs(ckpt, tmp_path):
    op = Embed(EmbedParams(model=TINY_MODEL, pretrained=str(ckpt)), "embed", tmp_path)
    out, rejects = op.process("p0", _table([], [], []))
    assert out.num_rows == rejects.num_rows == 0
    assert out.schema == arrow_schema(Embedding) and rejects.schema == REJECT_SCHEMA
    assert op.clip is None  # no model built for an empty part


def test_text_embeddings(ckpt, images, tmp_path):
    op = _op(ckpt, tmp_path)
    caps = ["a cat on a mat", "a cat on a mat", "a rocket at dusk", None]
    out, _ = op.process("p0", _table(["u0", "u1", "u2", "u3"], images[:4], caps))
    text = out.column("text_embedding").to_pylist()
    assert text[3] is None and all(t is not None for t in text[:3])
    t = np.array(text[:3], np.float32)  # [3, D]
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(t[0], t[1]) and np.abs(t[0] - t[2]).max() > 1e-3
    np.testing.assert_allclose(t[2], op.clip.encode_texts(["a rocket at dusk"])[0], atol=1e-6)
    off = _op(ckpt, tmp_path, text=False)
    assert off.process("p0", _table(["u0"], images[:1], ["x y"]))[0].column("text_embedding").to_pylist() == [None]


def test_trimmed_text_tower_matches_open_clip(clip):
    texts = ["", "a cat", "a rocket on its launch pad at dusk " * 3, "word " * 100, "a cat"]  # one past 77 tokens
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1).numpy()  # [N, D]
    np.testing.assert_allclose(clip.encode_texts(texts, batch_size=2), ref, atol=1e-5)


def test_uncached_hub_tag_fails_fast_and_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache lives under ~/.cache/clip
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"not in the local cache.*pretrained=/path"):
        load_clip("ViT-B-32-quickgelu", "metaclip_fullcc")
    with pytest.raises(ValueError, match=r"neither a file nor a known tag"):
        load_clip("ViT-B-32-quickgelu", "no-such-tag")
    with pytest.raises(ValueError, match=r"unknown open_clip model"):
        load_clip("no-such-model", "x")
    assert time.monotonic() - start < 3


def test_cached_hub_tag_loads_without_network(ckpt, monkeypatch, tmp_path):
    """A tag whose weights sit in the HF cache loads through open_clip's own tag path with no socket opened."""
    import huggingface_hub.constants as hc
    from open_clip import pretrained as opt

    register_tiny()
    monkeypatch.setitem(
        opt._PRETRAINED, TINY_MODEL, {"cachedtag": opt._pcfg(hf_hub="curation/tiny-clip/", quick_gelu=True)}
    )
    snap = tmp_path / "hf" / "models--curation--tiny-clip"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin").write_bytes(ckpt.read_bytes())
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    clip = load_clip(TINY_MODEL, "cachedtag", precision="fp32")
    assert clip.model_id == f"{TINY_MODEL}/cachedtag@fp32"
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(clip.model.state_dict()[k], saved[k]) for k in saved)


def test_auto_precision_is_deterministic():
    assert pick_precision("auto", "cuda") == "bf16"
    flags = Path("/proc/cpuinfo").read_text()
    assert pick_precision("auto", "cpu") == ("bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32")
    assert pick_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError):
        pick_precision("int8", "cpu")
