"""MetaCLIP substring matching: spacing rule, Aho-Corasick equals the naive reference."""

from __future__ import annotations

import pickle
import random

import pytest

from curation.concepts.substring import SubstringMatcher, naive_match, spacing

ENTRIES = [
    "cat",
    "dog",
    "Cat",
    "hot dog",
    "hotdog",
    "a cat",
    "cat's",
    "(cat)",
    "New York",
    "new york",
    "St. Louis",
    "u.s.",
    "café",
    "東京",
    "über",
    "naïve",
    "🐱",
    "cat",
    "a",
    "dog.",
    "",
    "  ",
    "ice cream",
    "cream",
    "ice",
    "concatenate",
    "cat dog",
] + [str(i) for i in range(100)]

CAPTIONS = [
    "a cat, a dog.",
    "cat's toy",
    "(cat)",
    "the cat (cat) sat",
    "Cat on a mat",
    "CAT",
    "hot dog stand",
    "a hotdog",
    "hot  dog with two spaces",
    "hot\tdog",
    "hot\ndog",
    "concatenate the files",
    "category",
    "New York, New York!",
    "new york? yes",
    "St. Louis arch",
    "the u.s. army",
    "Café au lait, café.",
    "東京 tower",
    "東京タワー",
    "über cool",
    "a naïve cat",
    "🐱 emoji",
    "🐱🐱",
    "0",
    "7 cats and 10 dogs",
    "room 101",
    "3.5 stars",
    "99 red balloons, 100 more",
    "ice cream; cream: ice",
    "cat dog",
    "cat, dog",
    "",
    " ",
    "a",
    "dog.",
    "dog..",
    "`cat`",
    "cat-like",
    "cat/dog",
    "ends with cat",
    "cat",
]


def ids_of(matched: list[int], *texts: str) -> bool:
    """Whether every text is among the entries at the matched ids."""
    found = {ENTRIES[i] for i in matched}
    return all(t in found for t in texts)


def test_spacing_reproduces_metaclip_rule():
    assert spacing("a cat, a dog.") == " a cat ,  a dog .  "
    assert spacing("hot\tdog\r\n") == " hot dog   "
    assert spacing("") == "  "
    assert spacing("(cat's)") == " (cat's) "  # apostrophes and brackets stay attached, as in MetaCLIP
    assert spacing("x`y;z:w?v!") == " x ` y ; z : w ? v !  "


@pytest.mark.parametrize("caption", CAPTIONS)
def test_automaton_equals_naive_on_tricky_captions(caption):
    matcher = SubstringMatcher(ENTRIES)
    assert matcher.match(caption) == naive_match(ENTRIES, caption)


def test_expected_matches_on_tricky_captions():
    m = SubstringMatcher(ENTRIES)
    assert ids_of(m.match("a cat, a dog."), "cat", "dog", "a cat", "a", "dog.")
    assert not ids_of(m.match("a cat, a dog."), "cat dog")  # the comma breaks the phrase
    assert ids_of(m.match("cat's toy"), "cat's") and not ids_of(m.match("cat's toy"), "cat")
    assert ids_of(m.match("(cat)"), "(cat)") and not ids_of(m.match("(cat)"), "cat")
    assert ids_of(m.match("Cat on a mat"), "Cat") and not ids_of(m.match("Cat on a mat"), "cat")
    assert m.match("CAT") == []
    assert ids_of(m.match("hot dog stand"), "hot dog", "dog") and not ids_of(m.match("hot dog stand"), "hotdog")
    assert ids_of(m.match("a hotdog"), "hotdog", "a") and not ids_of(m.match("a hotdog"), "hot dog", "dog")
    assert ids_of(m.match("hot\tdog"), "hot dog")
    assert not ids_of(m.match("hot  dog with two spaces"), "hot dog")  # MetaCLIP does not collapse spaces
    assert m.match("concatenate the files") == [ENTRIES.index("concatenate")]
    assert m.match("category") == []
    assert ids_of(m.match("St. Louis arch"), "St. Louis")
    assert ids_of(m.match("Café au lait, café."), "café") and ids_of(m.match("東京 tower"), "東京")
    assert not ids_of(m.match("東京タワー"), "東京")  # no spaces in Japanese: word-bounded test misses it
    assert ids_of(m.match("🐱 emoji"), "🐱") and m.match("🐱🐱") == []


def test_digits_and_numbers():
    m = SubstringMatcher(ENTRIES)
    assert m.match("0") == [ENTRIES.index("0")]
    assert {ENTRIES[i] for i in m.match("7 cats and 10 dogs")} == {"7", "10"}
    assert {ENTRIES[i] for i in m.match("room 101")} == set()
    assert {ENTRIES[i] for i in m.match("3.5 stars")} == {"3", "5"}  # the period splits the number
    assert {ENTRIES[i] for i in m.match("99 red balloons, 100 more")} == {"99"}


def test_repeated_entries_all_reported_sorted_unique():
    m = SubstringMatcher(ENTRIES)
    first, second = ENTRIES.index("cat"), len(ENTRIES) - 1 - ENTRIES[::-1].index("cat")
    assert first != second
    got = m.match("cat cat cat")
    assert first in got and second in got and got == sorted(set(got))


def test_empty_none_and_blank():
    m = SubstringMatcher(ENTRIES)
    assert m.match(None) == [] and m.match("") == [] and m.match("   ") == []
    assert naive_match(ENTRIES, None) == []
    assert SubstringMatcher([]).match("anything") == []
    assert SubstringMatcher(["", " "]).match("a  b") == []  # blank entries never match
    assert m.match_many(["cat", None, "dog"]) == [m.match("cat"), [], m.match("dog")]


def test_metaclip_entry_padding_leaves_punctuated_entries_unmatched():
    strict = SubstringMatcher(ENTRIES, space_entries=False)
    for caption in CAPTIONS:
        assert strict.match(caption) == naive_match(ENTRIES, caption, space_entries=False)
    assert not ids_of(strict.match("St. Louis arch"), "St. Louis")
    assert ids_of(strict.match("New York, New York!"), "New York")


def test_rejects_non_string_entries():
    with pytest.raises(TypeError, match="entry 1"):
        SubstringMatcher(["cat", None])


def test_pickle_rebuilds_automaton():
    m = SubstringMatcher(ENTRIES)
    clone = pickle.loads(pickle.dumps(m))
    assert len(clone) == len(ENTRIES)
    assert clone.match_many(CAPTIONS) == m.match_many(CAPTIONS)


def random_vocab(rng: random.Random, size: int) -> list[str]:
    """Words, two-word phrases, numbers and punctuated forms over a small alphabet so that they collide."""
    syllables = ["ca", "t", "do", "g", "ho", "a", "n", "é", "東", "Ca", "'s", "-"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(size)})
    vocab = [rng.choice(words) for _ in range(size // 2)]
    vocab += [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(size // 4)]
    vocab += [f"{rng.choice(words)}{rng.choice('.,!?;:`')}" for _ in range(size // 8)]
    vocab += [str(rng.randint(0, 120)) for _ in range(size // 8)]
    rng.shuffle(vocab)
    return vocab


def random_caption(rng: random.Random, vocab: list[str]) -> str:
    """Concatenate entries, random syllables, digits, punctuation and whitespace."""
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.5:
            parts.append(rng.choice(vocab))
        elif kind < 0.7:
            parts.append(rng.choice(["ca", "t", "dog", "東", "(", ")", "'", "3.5", "cat's"]))
        else:
            parts.append(rng.choice([" ", "  ", ",", ".", "\t", "\n", "!", "`", ""]))
        parts.append(rng.choice([" ", " ", " ", "", ", ", ". "]))
    return "".join(parts)


@pytest.mark.parametrize("space_entries", [True, False])
def test_randomized_automaton_equals_naive(space_entries):
    rng = random.Random(1234)
    vocab = random_vocab(rng, 3000)
    captions = [random_caption(rng, vocab) for _ in range(400)]
    matcher = SubstringMatcher(vocab, space_entries=space_entries)
    got = matcher.match_many(captions)
    assert got == [naive_match(vocab, c, space_entries=space_entries) for c in captions]
    assert sum(map(len, got)) > 1000  # the property was exercised on many real matches
