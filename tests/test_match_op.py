"""match_concepts and the concept cache on their own: modes, IVF vs flat, model checks, cache reuse."""

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from curation.cli import app
from curation.concepts.clip import TINY_MODEL, load_clip, make_tiny_checkpoint, model_id_for
from curation.concepts.embeddings import ConceptCache
from curation.concepts.index import recall_at_k
from curation.concepts.vocab import make_table, write_vocab
from curation.ops.match_concepts import MatchConcepts, MatchParams
from schemas import ConceptMatch, conform

WORDS = ["red", "circle", "blue square", "cat", "St. Louis", "a", "dog", "green", "star", "tree"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("match")
    ckpt = make_tiny_checkpoint(root / "tiny.pt", seed=0)
    vocab = root / "vocab.parquet"
    write_vocab(make_table(WORDS + [f"thing {i}" for i in range(2000)], "title"), vocab)
    return root, str(ckpt), str(vocab)


def _op(assets, **params):
    root, ckpt, vocab = assets
    op = MatchConcepts(
        MatchParams(
            vocab=vocab, model=TINY_MODEL, pretrained=ckpt, precision="fp32", cache_dir=str(root / "cache"), **params
        ),
        "match",
        root / "_work",
    )
    op.prepare()
    op.setup()
    return op


def _table(assets, n=40, captions=None, model_id=None):
    _, ckpt, _ = assets
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    caps = captions or [
        ["a red circle and a blue square", "St. Louis, at night.", None, "Reds"][i % 4] for i in range(n)
    ]
    return pa.table(
        {
            "uid": [f"u{i:03d}" for i in range(n)],
            "model": [model_id or model_id_for(TINY_MODEL, ckpt, "fp32")] * n,
            "image_embedding": pa.array(list(q), pa.list_(pa.float32())),
            "caption": caps,
        }
    )


def test_modes_and_provenance(assets):
    table = _table(assets)
    feat, _ = _op(assets, mode="feature", k=5).process("p", table)
    sub, _ = _op(assets, mode="substring").process("p", table)
    hyb, _ = _op(assets, mode="hybrid", k=5).process("p", table)
    for t in (feat, sub, hyb):
        conform(t, ConceptMatch, "test")
    assert all(len(x) == 5 for x in feat.column("concept_ids").to_pylist())
    subs = sub.column("concept_ids").to_pylist()
    assert subs[0] == sorted(WORDS.index(w) for w in ("red", "circle", "blue square", "a"))
    assert (
        subs[1] == [WORDS.index("St. Louis")] and subs[2] == [] and subs[3] == []
    )  # "Reds" is not "red": case and spacing
    assert set(sub.column("scores").to_pylist()[0]) == {None}  # substring matches without a model have no score
    for f, s, h, src, sc in zip(
        feat.column("concept_ids").to_pylist(),
        subs,
        hyb.column("concept_ids").to_pylist(),
        hyb.column("source").to_pylist(),
        hyb.column("scores").to_pylist(),
    ):
        assert h[:5] == f and set(h) == set(f) | set(s)
        assert [x for x, y in zip(h, src) if y in ("substring", "both")] == [x for x in h if x in s]
        assert all(v is not None for v in sc) and sc[:5] == sorted(sc[:5], reverse=True)


def test_ivf_recall_against_flat(assets):
    table = _table(assets, n=200)
    flat, _ = _op(assets, k=10).process("p", table)
    ivf, _ = _op(assets, k=10, index="ivf", nlist=16, nprobe=16).process("p", table)  # all lists probed: exact
    rough, _ = _op(assets, k=10, index="ivf", nlist=64, nprobe=1).process("p", table)
    exact = np.array(flat.column("concept_ids").to_pylist())
    assert recall_at_k(np.array(ivf.column("concept_ids").to_pylist()), exact) > 0.99
    assert (
        recall_at_k(np.array([r + [-1] * (10 - len(r)) for r in rough.column("concept_ids").to_pylist()]), exact) < 0.99
    )


def test_wrong_model_is_an_error_and_missing_embeddings_are_rejected(assets):
    op = _op(assets, k=3)
    with pytest.raises(ValueError, match="embeddings were made by"):
        op.process("p", _table(assets, model_id="ViT-B-32/other@fp32"))
    t = _table(assets, n=4)
    t = t.set_column(
        2, "image_embedding", pa.array([None, *t.column("image_embedding").to_pylist()[1:]], pa.list_(pa.float32()))
    )
    out, rej = op.process("p", t)
    assert (
        out.num_rows == 3
        and rej.column("reason").to_pylist() == ["no_embedding"]
        and rej.column("uid").to_pylist() == ["u000"]
    )


def test_cache_is_built_once_per_model_vocab_and_template(assets, tmp_path):
    _root, ckpt, vocab = assets
    clip = load_clip(TINY_MODEL, ckpt, "fp32")
    cache = ConceptCache(vocab, clip.model_id, "{}", tmp_path)
    vectors = cache.build(clip)
    assert vectors.shape == (2010, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    stamp = cache.embeddings_path.stat().st_mtime_ns
    assert np.array_equal(cache.build(clip), vectors) and cache.embeddings_path.stat().st_mtime_ns == stamp
    assert np.allclose(vectors[3], clip.encode_texts(["cat"])[0], atol=1e-5)
    other = ConceptCache(vocab, clip.model_id, "a photo of {}", tmp_path)
    assert other.dir != cache.dir and not other.ready()
    with pytest.raises(ValueError, match="concept cache is for model"):
        ConceptCache(vocab, "other-model@fp32", "{}", tmp_path).build(clip)
    res = CliRunner().invoke(
        app,
        [
            "vocab",
            "embed",
            vocab,
            "--model",
            TINY_MODEL,
            "--pretrained",
            ckpt,
            "--precision",
            "fp32",
            "--cache-dir",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert cache.embeddings_path.stat().st_mtime_ns == stamp  # the CLI found the same cache entry
