"""Concept vocabulary: offline build from WordNet + wordfreq + PMI bigrams, hashing, MetaCLIP import."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from curation.concepts import vocab

# The Makefile installs Debian's wordnet-base; without it the real-source build cannot run.
needs_wordnet = pytest.mark.skipif(
    not (vocab.WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 missing: `apt-get install wordnet-base` (the Makefile does this)",
)


@pytest.fixture(scope="module")
def full_vocab():
    return vocab.build_vocab(500_000)


@needs_wordnet
def test_full_build_from_real_offline_sources(full_vocab):
    texts = full_vocab.column("text").to_pylist()
    assert len(texts) >= 300_000
    assert len(set(texts)) == len(texts)
    assert full_vocab.column("id").to_pylist() == list(range(len(texts)))
    assert texts[:100] == [str(i) for i in range(100)]
    counts = vocab.source_counts(full_vocab)
    assert counts["number"] == 100 and counts["wordnet"] > 100_000 and counts["wordfreq"] > 150_000
    assert {"dog", "hot dog", "New York", "entity"} <= set(texts)


@needs_wordnet
def test_build_is_deterministic(full_vocab):
    again = vocab.build_vocab(500_000)
    assert vocab.vocab_hash(again) == vocab.vocab_hash(full_vocab)
    assert again.equals(full_vocab)


@needs_wordnet
def test_wordnet_parser_reads_every_noun_synset():
    names = vocab.wordnet_names()
    assert names[:3] == ["entity", "physical entity", "abstraction"]
    synsets = sum(1 for line in (vocab.WORDNET_DIR / "data.noun").open() if not line.startswith("  "))
    assert synsets == 82_115
    assert len(names) > synsets and not any("_" in n for n in names)
    adjectives = vocab.wordnet_names(pos=("adj",))
    assert adjectives and not any(a.endswith(("(a)", "(p)", "(ip)")) for a in adjectives)


def test_wordnet_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        vocab.wordnet_names(tmp_path)


def test_target_size_and_priority(tmp_path):
    titles = tmp_path / "titles.txt"
    titles.write_text("The Godfather\n\n  Star Wars  \n7\nThe Godfather\n", encoding="utf-8")
    table = vocab.build_vocab(105, wordnet_dir=None, title_files=[titles], wordfreq_lang="en")
    assert table.num_rows == 105
    assert table.column("text").to_pylist()[100:] == ["The Godfather", "Star Wars", "the", "to", "and"]
    assert vocab.source_counts(table) == {"number": 100, "title": 2, "wordfreq": 3}
    small = vocab.build_vocab(10, wordnet_dir=None, wordfreq_lang=None)
    assert small.column("text").to_pylist() == [str(i) for i in range(10)]
    assert vocab.build_vocab(10**6, wordnet_dir=None, wordfreq_lang=None).num_rows == 100


def synthetic_corpus(seed: int = 0) -> list[str]:
    """Captions of random filler words with 'new york' planted and 'big' / 'dog' frequent but independent."""
    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(300)]
    captions = []
    for _ in range(2000):
        words = rng.choices(filler, k=8) + rng.sample(["big", "dog", "red", "cat"], 2)
        if rng.random() < 0.1:
            words.append("new york")
        rng.shuffle(words)
        captions.append(" ".join(words) + rng.choice([".", ",", "!", ""]))
    return captions + [None, ""]


def test_pmi_picks_planted_bigram_not_random_pair():
    found = {b: (count, pmi) for b, count, pmi in vocab.pmi_bigrams(synthetic_corpus(), min_count=20, min_pmi=3.0)}
    assert "new york" in found
    assert found["new york"][0] >= 150
    assert set(found) == {"new york"}  # frequent pairs like "big dog" or "dog big" have PMI near 0
    everything = {b: pmi for b, _, pmi in vocab.pmi_bigrams(synthetic_corpus(), min_count=1, min_pmi=-100)}
    assert abs(everything["big dog"]) < 1.0 < everything["new york"]
    assert not any(b.endswith((" .", " ,")) or b.startswith((". ", ", ")) for b in everything)


def test_bigrams_enter_the_vocabulary():
    table = vocab.build_vocab(
        1000, wordnet_dir=None, corpus=synthetic_corpus(), bigram_min_count=20, wordfreq_lang=None
    )
    assert table.column("text").to_pylist()[100:] == ["new york"]
    assert table.column("source").to_pylist()[100:] == ["bigram"]


def test_hash_write_and_read_round_trip(tmp_path):
    table = vocab.build_vocab(2000, wordnet_dir=None)
    path = tmp_path / "vocab.parquet"
    version = vocab.write_vocab(table, path)
    assert len(version) == 16 and version == vocab.vocab_hash(table)
    assert pq.read_schema(path).metadata[b"vocab_hash"] == version.encode()
    back = vocab.read_vocab(path)
    assert back.column("text").equals(table.column("text")) and back.column("id").equals(table.column("id"))
    pq.write_table(vocab.make_table(["x"], "title").replace_schema_metadata(back.schema.metadata), path)
    with pytest.raises(ValueError, match="rebuild"):
        vocab.read_vocab(path)


def test_hash_is_not_fooled_by_joining():
    assert vocab.vocab_hash(vocab.make_table(["ab", "c"], "t")) != vocab.vocab_hash(vocab.make_table(["a", "bc"], "t"))


def test_import_metaclip_500k_round_trip(tmp_path):
    entries = [f"concept {i}" for i in range(500_000)]
    entries[:3] = ["0", "hot dog", "東京"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    table = vocab.import_metaclip(path)
    assert table.num_rows == 500_000
    assert table.column("text").to_pylist() == entries
    assert table.column("id").to_pylist() == list(range(500_000))
    assert set(table.column("source").to_pylist()) == {"metaclip"}
    version = vocab.vocab_hash(table)
    entries[250_000] = "concept changed"
    path.write_text(json.dumps(entries), encoding="utf-8")
    assert vocab.vocab_hash(vocab.import_metaclip(path)) != version


def test_import_metaclip_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        vocab.import_metaclip(bad)
    bad.write_text(json.dumps(["ok", 3]))
    with pytest.raises(ValueError, match="entry 1"):
        vocab.import_metaclip(bad)


def test_vocab_cli_build_and_import(tmp_path):
    import json as _json

    from typer.testing import CliRunner

    from curation.cli import app
    from curation.concepts.vocab import read_vocab

    corpus = tmp_path / "caps.parquet"
    import pyarrow as _pa
    import pyarrow.parquet as _pq

    _pq.write_table(
        _pa.table({"caption": ["a photo taken in new york city"] * 30 + [f"word{i} thing{i}" for i in range(300)]}),
        corpus,
    )
    res = CliRunner().invoke(
        app, ["vocab", "build", "--out", str(tmp_path / "v.parquet"), "--corpus", str(corpus), "--min-count", "5"]
    )
    assert res.exit_code == 0, res.output
    info = _json.loads(res.output)
    table = read_vocab(tmp_path / "v.parquet")
    texts = table.column("text").to_pylist()
    assert info["entries"] == table.num_rows > 300_000 and "new york" in texts
    assert table.column("source")[texts.index("new york")].as_py() == "bigram"
    (tmp_path / "metadata.json").write_text(_json.dumps(["cat", "hot dog", "0"]))
    res = CliRunner().invoke(
        app, ["vocab", "import", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "m.parquet")]
    )
    assert res.exit_code == 0, res.output
    assert read_vocab(tmp_path / "m.parquet").column("text").to_pylist() == ["cat", "hot dog", "0"]
