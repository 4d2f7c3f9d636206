"""Concept vocabulary for MetaCLIP balancing: built from offline sources, or imported from metadata.json."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.concepts.substring import spacing

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian/Ubuntu `wordnet-base` (WordNet 3.0)
DEFAULT_TARGET = 500_000
SOURCE_ORDER = ("number", "wordnet", "title", "bigram", "wordfreq")  # fill priority
HASH_KEY = b"vocab_hash"
SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("source", pa.string())])
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # syntactic marker on some adjective lemmas


def numbers(upto: int = 100) -> list[str]:
    """The numbers 0 .. upto-1 as strings."""
    return [str(i) for i in range(upto)]


def wordnet_names(wordnet_dir: str | Path = WORDNET_DIR, pos: Sequence[str] = ("noun",)) -> list[str]:
    """Every lemma of every synset in WordNet's data.<pos> files, underscores as spaces, file order."""
    names: list[str] = []
    for part in pos:
        path = Path(wordnet_dir) / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install WordNet 3.0 (`apt-get install wordnet-base`) or pass wordnet_dir"
            )
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.startswith("  "):  # licence header
                    continue
                fields = line.split(" ", 4 + 2 * 255)
                try:
                    word_count = int(fields[3], 16)
                except (IndexError, ValueError) as err:
                    raise ValueError(f"{path}:{line_no}: not a WordNet synset line: {line[:60]!r}") from err
                for word in fields[4 : 4 + 2 * word_count : 2]:
                    names.append(_ADJ_MARKER.sub("", word).replace("_", " "))
    return names


def wordfreq_words(lang: str = "en", wordlist: str = "large") -> list[str]:
    """Words of the wordfreq list bundled in its wheel, most frequent first (no download)."""
    import wordfreq

    return list(wordfreq.iter_wordlist(lang, wordlist))


def read_titles(paths: Iterable[str | Path]) -> list[str]:
    """Non-blank stripped lines of UTF-8 text files (one title or phrase a line), in file order."""
    titles: list[str] = []
    for path in paths:
        with Path(path).open(encoding="utf-8") as f:
            titles.extend(line.strip() for line in f if line.strip())
    return titles


def tokenize(text: str) -> list[str]:
    """Tokens as the matcher sees them: spacing() then whitespace split (case kept)."""
    return spacing(text).split()


def _is_word(token: str) -> bool:
    """Whether a token may be part of a bigram (it holds a letter or digit)."""
    return any(ch.isalnum() for ch in token)


def pmi_bigrams(texts: Iterable[str | None], min_count: int = 10, min_pmi: float = 3.0) -> list[tuple[str, int, float]]:
    """(bigram, count, PMI) for adjacent word pairs with count >= min_count and PMI >= min_pmi, best first.

    PMI = ln(p(ab) / (p(a) p(b))), p(ab) over all adjacent pairs, p(a) over all tokens. Pairs never
    span punctuation (a punctuation token breaks them). MetaCLIP's "PMI >= 30" uses another scale.
    """
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for text in texts:
        if not text:
            continue
        tokens = tokenize(text)
        unigrams.update(tokens)
        bigrams.update(pair for pair in itertools.pairwise(tokens) if _is_word(pair[0]) and _is_word(pair[1]))
    n_uni = sum(unigrams.values())
    n_bi = sum(bigrams.values())
    kept = []
    for (a, b), count in bigrams.items():
        if count < min_count:
            continue
        pmi = math.log((count / n_bi) / ((unigrams[a] / n_uni) * (unigrams[b] / n_uni)))
        if pmi >= min_pmi:
            kept.append((f"{a} {b}", count, pmi))
    kept.sort(key=lambda item: (-item[2], -item[1], item[0]))
    return kept


def build_vocab(
    target_size: int = DEFAULT_TARGET,
    *,
    wordnet_dir: str | Path | None = WORDNET_DIR,
    wordnet_pos: Sequence[str] = ("noun",),
    title_files: Iterable[str | Path] = (),
    corpus: Iterable[str | None] | None = None,
    bigram_min_count: int = 10,
    bigram_min_pmi: float = 3.0,
    wordfreq_lang: str | None = "en",
) -> pa.Table:
    """Vocabulary table (id, text, source) filled by source priority up to target_size unique entries.

    Priority: numbers 0-99, WordNet lemmas, user titles, PMI bigrams of corpus, wordfreq words by
    frequency. Duplicates (exact string) keep their first, higher-priority source. A source set to
    None (wordnet_dir, corpus, wordfreq_lang) is skipped; fewer than target_size entries is not an error.
    """
    sources = {
        "number": lambda: numbers(),
        "wordnet": lambda: wordnet_names(wordnet_dir, wordnet_pos) if wordnet_dir is not None else [],
        "title": lambda: read_titles(title_files),
        "bigram": lambda: (
            [b for b, _, _ in pmi_bigrams(corpus, bigram_min_count, bigram_min_pmi)] if corpus is not None else []
        ),
        "wordfreq": lambda: wordfreq_words(wordfreq_lang) if wordfreq_lang is not None else [],
    }
    chosen: dict[str, str] = {}  # text -> source, insertion-ordered
    for source in SOURCE_ORDER:
        if len(chosen) >= target_size:
            break
        for text in sources[source]():
            if text.strip() and text not in chosen:
                chosen[text] = source
                if len(chosen) >= target_size:
                    break
    return make_table(list(chosen), list(chosen.values()))


def make_table(texts: Sequence[str], sources: Sequence[str] | str) -> pa.Table:
    """Vocabulary table with id = row index; sources is one string per text or one for all."""
    if isinstance(sources, str):
        sources = [sources] * len(texts)
    return pa.table(
        {
            "id": pa.array(range(len(texts)), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "source": pa.array(sources, pa.string()),
        },
        schema=SCHEMA,
    )


def source_counts(table: pa.Table) -> dict[str, int]:
    """Number of entries per source, in SOURCE_ORDER first, then any other source."""
    counts = Counter(table.column("source").to_pylist())
    order = [s for s in SOURCE_ORDER if s in counts] + sorted(set(counts) - set(SOURCE_ORDER))
    return {s: counts[s] for s in order}


def vocab_hash(table: pa.Table) -> str:
    """Version of a vocabulary: first 16 hex digits of sha256 over its texts in order (length-prefixed)."""
    digest = hashlib.sha256()
    for text in table.column("text").to_pylist():
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def write_vocab(table: pa.Table, path: str | Path) -> str:
    """Write the vocabulary to Parquet with its hash in the schema metadata; return the hash."""
    version = vocab_hash(table)
    metadata = dict(table.schema.metadata or {})
    metadata[HASH_KEY] = version.encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return version


def read_vocab(path: str | Path) -> pa.Table:
    """Read a vocabulary Parquet file and check its texts against the hash stored in it."""
    table = pq.read_table(path)
    stored = (table.schema.metadata or {}).get(HASH_KEY)
    if stored is None:
        raise ValueError(f"{path}: no {HASH_KEY.decode()} in the Parquet schema metadata; write it with write_vocab")
    if stored.decode() != vocab_hash(table):
        raise ValueError(
            f"{path}: texts do not match the stored {HASH_KEY.decode()} {stored.decode()}; the file was edited, "
            f"rebuild it"
        )
    return table


def import_metaclip(path: str | Path) -> pa.Table:
    """Vocabulary from MetaCLIP's metadata.json (a JSON list of strings; id = list index, source 'metaclip')."""
    with Path(path).open(encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(
            f"{path}: expected a JSON list of strings (MetaCLIP metadata.json), got {type(entries).__name__}"
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(f"{path}: entry {i} is {type(entry).__name__} {entry!r}, expected a string")
    return make_table(entries, "metaclip")
