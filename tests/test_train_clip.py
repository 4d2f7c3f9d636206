"""The tiny CLIP trained here (issue 16): open_clip's model and ClipLoss on image-caption pairs, a checkpoint that
loads through the same `pretrained=<file>` path as real weights, and `curate models train-clip`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curation.cli import app
from curation.concepts.clip import TINY_MODEL, TRAINABLE_MODEL, load_clip, make_tiny_checkpoint
from curation.concepts.train_clip import TrainClipParams, read_pairs, train_clip
from curation.fixtures.demo import web_pairs
from curation.fixtures.web import make_web


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Image-caption pairs of a small long-tailed web that pass filter's rules, as a Parquet file too."""
    web = tmp_path_factory.mktemp("web")
    make_web(web, 400, 8000, seed=3, scenes="longtail")
    images, captions = web_pairs(web)
    path = web / "pairs.parquet"
    pq.write_table(pa.table({"image": images, "caption": captions}), path)
    return images, captions, path


def test_pairs_of_a_web_pass_filters_rules(pairs):
    images, captions, _ = pairs
    assert 120 < len(images) == len(captions) < 400  # missing, boilerplate, short and other languages are out
    assert all(c.strip() for c in captions) and sum("background" in c for c in captions) > 0.5 * len(captions)


def test_training_lowers_the_loss_and_loads_as_pretrained(pairs, tmp_path):
    images, captions, _ = pairs
    out = tmp_path / "tower.pt"
    summary = train_clip(images, captions, out, TrainClipParams(steps=60, batch_size=64, warmup=10, seed=0))
    first, last = summary["loss"][0]["loss"], summary["loss"][-1]["loss"]
    assert last < 0.8 * first, summary["loss"]
    assert json.loads(out.with_name("tower.pt.json").read_text())["pairs"] == len(images)
    trained = load_clip(TRAINABLE_MODEL, str(out), "fp32")  # the path embed and match_concepts take
    assert trained.model_id.startswith(f"{TRAINABLE_MODEL}/tower.pt#")
    random = load_clip(TINY_MODEL, str(make_tiny_checkpoint(tmp_path / "random.pt")), "fp32")

    # trained: an image is closer to its own caption than to the others' (random weights: chance)
    def own_rank_score(clip):
        a, _, _ = clip.encode_images(images[:64])
        b = clip.encode_texts(captions[:64])
        sims = a @ b.T
        return float(np.mean(np.diag(sims)[:, None] > sims))

    assert own_rank_score(trained) > own_rank_score(random) + 0.15


def test_same_seed_same_weights(pairs, tmp_path):
    import torch

    images, captions, _ = pairs
    p = TrainClipParams(steps=3, batch_size=32, warmup=1, seed=7)
    a = train_clip(images[:80], captions[:80], tmp_path / "a.pt", p)
    b = train_clip(images[:80], captions[:80], tmp_path / "b.pt", p)
    assert a["loss"] == b["loss"]
    wa, wb = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_trains_from_a_parquet_and_errors_in_one_line(pairs, tmp_path):
    _, _, path = pairs
    out = tmp_path / "cli.pt"
    res = CliRunner().invoke(app, ["models", "train-clip", str(path), "--out", str(out), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and json.loads(res.output.strip().splitlines()[-1])["pretrained"] == str(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["models", "train-clip", str(empty), "--out", str(out)])
    assert res.exit_code != 0 and "no part-*.parquet" in res.output


def test_read_pairs_skips_rows_without_a_caption(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"image": [b"x", b"y", b"z"], "caption": ["a red circle", None, "  "]}), f)
    with pytest.raises(ValueError, match="1 image-caption pairs"):
        read_pairs(f)
