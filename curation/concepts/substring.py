"""MetaCLIP substring matching of captions against a concept vocabulary (Aho-Corasick)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ahocorasick

# MetaCLIP's rule (facebookresearch/MetaCLIP metaclip/substr_matching.py), reproduced exactly:
# pad the text with one space on each side, wrap each of these seven characters in spaces, and
# turn tab / newline / carriage return into a space. Nothing else: no lower-casing (the test is
# case-sensitive), no collapsing of repeated spaces, and apostrophes, brackets, quotes and
# hyphens stay attached ("cat's", "(cat)" and "cat-like" do not contain the entry "cat").
PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")


def spacing(text: str) -> str:
    """MetaCLIP's normalisation: pad with spaces, wrap ,.;:?!` in spaces, tab/newline/CR to space."""
    spaced = f" {text} "
    for punct in PUNCTS_TO_WRAP:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in CHARS_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def spaced_entry(entry: str, space_entries: bool = True) -> str | None:
    """The form an entry must occur in within a spaced text; None for a blank entry (never matches)."""
    if not entry or not entry.strip():
        return None
    return spacing(entry) if space_entries else f" {entry} "


def naive_match(entries: Sequence[str], text: str | None, space_entries: bool = True) -> list[int]:
    """Reference matcher: ids of entries whose spaced form is a substring of the spaced text."""
    if text is None:
        return []
    spaced_text = spacing(text)
    matched = []
    for entry_id, entry in enumerate(entries):
        key = spaced_entry(entry, space_entries)
        if key is not None and key in spaced_text:
            matched.append(entry_id)
    return matched


class SubstringMatcher:
    """Aho-Corasick automaton over spaced entries; same answers as naive_match, in one pass per text.

    space_entries=True runs entries through spacing() too, so an entry holding one of the wrapped
    characters ("St. Louis", "u.s.") can match; False pads entries with spaces only, as MetaCLIP
    does, which leaves such entries unmatchable. Entries without those characters behave the same.
    Pickling stores the entries and rebuilds the automaton, so the matcher can be shipped to a Ray
    actor.
    """

    def __init__(self, entries: Iterable[str], space_entries: bool = True) -> None:
        self.entries = list(entries)
        self.space_entries = space_entries
        self._automaton = self._build()

    def _build(self) -> ahocorasick.Automaton:
        """Build the automaton; repeated spaced forms share one key whose value lists every id."""
        ids_by_key: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(self.entries):
            if not isinstance(entry, str):
                raise TypeError(f"vocabulary entry {entry_id} is {type(entry).__name__}, expected str: {entry!r}")
            key = spaced_entry(entry, self.space_entries)
            if key is not None:
                ids_by_key.setdefault(key, []).append(entry_id)
        automaton = ahocorasick.Automaton()
        for key, ids in ids_by_key.items():
            automaton.add_word(key, tuple(ids))
        if ids_by_key:
            automaton.make_automaton()
        return automaton

    def __len__(self) -> int:
        """Number of entries (ids run from 0 to len - 1)."""
        return len(self.entries)

    def __getstate__(self) -> dict:
        """Pickle the entries only; the automaton is rebuilt on unpickling."""
        return {"entries": self.entries, "space_entries": self.space_entries}

    def __setstate__(self, state: dict) -> None:
        """Restore from entries and rebuild the automaton."""
        self.entries = state["entries"]
        self.space_entries = state["space_entries"]
        self._automaton = self._build()

    def match(self, text: str | None) -> list[int]:
        """Sorted unique ids of the entries found in text ([] for None or when nothing matches)."""
        if text is None or len(self._automaton) == 0:
            return []
        found: set[int] = set()
        for _end, ids in self._automaton.iter(spacing(text)):
            found.update(ids)
        return sorted(found)

    def match_many(self, texts: Iterable[str | None]) -> list[list[int]]:
        """match() for each text, in order."""
        return [self.match(text) for text in texts]
