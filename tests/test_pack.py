"""Offline best-fit-decreasing packing: coverage, capacity, rejects, determinism, hand-worked cases, row contract."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import PackedSequence, arrow_schema
from trainer.pack import pack, rejects_table, sample_length, sample_lengths, to_table


def brute_bfd(ids: list[str], lengths: list[int], max_len: int) -> list[list[str]]:
    """Reference BFD by linear scan: length descending, ties by id; smallest fitting room, ties to the oldest bin."""
    bins: list[list[str]] = []
    room: list[int] = []
    for n, i in sorted((-n, i) for i, n in zip(ids, lengths) if 0 < n <= max_len):
        n = -n
        fits = [(r, b) for b, r in enumerate(room) if r >= n]
        if fits:
            b = min(fits)[1]
        else:
            bins.append([])
            room.append(max_len)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    return bins


def random_case(n: int, max_len: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n ids and lengths in [1, 1.2 * max_len], with many repeated lengths."""
    rng = np.random.default_rng(seed)
    ids = [f"s{k:05d}" for k in rng.permutation(n)]
    lengths = rng.integers(1, int(max_len * 1.2) + 1, size=n)
    lengths[: n // 3] = rng.choice([max_len // 2, max_len // 3, max_len // 4, 7], size=n // 3)
    return ids, lengths


@pytest.mark.parametrize(
    ("lengths", "max_len", "expected"),
    [
        # 7 opens A (room 3); 5 opens B (room 5); 4 -> B (room 1); 3 -> A (room 0, best fit over B's 1); 2 opens C
        ({"a": 7, "b": 5, "c": 4, "d": 3, "e": 2}, 10, [["a", "d"], ["b", "c"], ["e"]]),
        # equal lengths sort by id; 6,6 open A and B (room 4 each); 4 -> A (tie to the oldest); 3 -> B; 1 -> B
        ({"y": 6, "x": 6, "z": 4, "w": 3, "v": 1}, 10, [["x", "z"], ["y", "w", "v"]]),
        # 4,4 fill A to room 2; 3s open B (7 -> 4 -> 1); 1 goes to B (room 1, best fit), not A (room 2, first fit)
        ({"a": 4, "b": 4, "c": 3, "d": 3, "e": 3, "f": 1}, 10, [["a", "b"], ["c", "d", "e", "f"]]),
    ],
)
def test_hand_worked_cases(lengths: dict[str, int], max_len: int, expected: list[list[str]]) -> None:
    result = pack(list(lengths), np.array(list(lengths.values())), max_len)
    assert [ids for ids, _ in result.sequences] == expected
    assert [lens for _, lens in result.sequences] == [[lengths[i] for i in b] for b in expected]
    assert result.rejects == []


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_bfd(seed: int) -> None:
    max_len = [16, 50, 97, 256, 1000, 4096][seed]
    ids, lengths = random_case(400, max_len, seed)
    result = pack(ids, lengths, max_len)
    assert [s for s, _ in result.sequences] == brute_bfd(ids, lengths.tolist(), max_len)


def test_every_sample_once_and_capacity_respected() -> None:
    ids, lengths = random_case(3000, 300, seed=11)
    result = pack(ids, lengths, 300)
    packed = [i for s, _ in result.sequences for i in s]
    rejected = [i for i, _, _ in result.rejects]
    assert sorted(packed + rejected) == sorted(ids)
    assert len(set(packed)) == len(packed)
    by_id = dict(zip(ids, lengths.tolist()))
    for s, lens in result.sequences:
        assert lens == [by_id[i] for i in s]
        assert 0 < sum(lens) <= 300
        assert result.cu_lengths(result.sequences.index((s, lens)))[-1] == sum(lens)


def test_too_long_rejected_never_cut() -> None:
    ids = ["ok1", "long", "ok2", "huge", "edge"]
    result = pack(ids, np.array([100, 513, 400, 10_000, 512]), 512)
    assert sorted(result.rejects) == [
        ("huge", "too_long", "length 10000 > max_len 512"),
        ("long", "too_long", "length 513 > max_len 512"),
    ]
    assert sorted(result.ids.tolist()) == ["edge", "ok1", "ok2"]
    assert result.lengths.max() == 512  # exactly max_len fits
    rej = rejects_table(result)
    assert rej.column("reason").to_pylist() == ["too_long", "too_long"]
    assert set(rej.column("stage").to_pylist()) == {"pack"}


def test_empty_sample_rejected_and_bad_input_raises() -> None:
    assert pack(["a", "b"], np.array([0, 3]), 4).rejects == [("a", "empty", "length 0")]
    with pytest.raises(ValueError, match="duplicate sample id 'a'"):
        pack(["a", "a"], np.array([1, 2]), 4)
    with pytest.raises(ValueError, match="negative length"):
        pack(["a", "b"], np.array([1, -2]), 4)
    with pytest.raises(TypeError):
        pack(["a"], np.array([1.5]), 4)


def test_deterministic_across_runs_and_input_order() -> None:
    ids, lengths = random_case(2000, 200, seed=3)
    first = pack(ids, lengths, 200)
    perm = np.random.default_rng(9).permutation(len(ids))
    again = pack([ids[k] for k in perm], lengths[perm], 200)
    assert first.sequences == again.sequences and first.rejects == again.rejects
    assert to_table(first).equals(to_table(again))


def test_report_matches_recomputation() -> None:
    ids, lengths = random_case(1500, 128, seed=5)
    result = pack(ids, lengths, 128)
    rep = result.report()
    tokens = sum(sum(lens) for _, lens in result.sequences)
    n_seq = len(result.sequences)
    assert rep["fill_ratio"] == pytest.approx(tokens / (n_seq * 128))
    assert rep["compression"] == pytest.approx(sum(len(s) for s, _ in result.sequences) / n_seq)
    counts = (rep["samples"], rep["sequences"], rep["rejected"], rep["max_len"])
    assert counts == (1500, n_seq, len(result.rejects), 128)
    assert rep["tokens"] == int(lengths[(lengths > 0) & (lengths <= 128)].sum())


def test_table_conforms_to_packed_sequence() -> None:
    ids, lengths = random_case(500, 64, seed=2)
    result = pack(ids, lengths, 64)
    table = to_table(result)
    assert table.schema == arrow_schema(PackedSequence)
    assert table.column("seq_id").to_pylist()[:2] == ["seq-00000001", "seq-00000002"]
    rows = table.to_pylist()
    assert [(r["sample_ids"], r["lengths"]) for r in rows] == result.sequences
    assert all(r["total_tokens"] == sum(r["lengths"]) <= 64 for r in rows)


def test_sample_length_counts_image_tokens() -> None:
    assert sample_length(120, 1, 576) == 120 - 1 + 576  # the one <image> token becomes 576 tokens
    assert sample_length(300, 0, 576) == 300
    assert sample_length(10, 2, 729) == 8 + 2 * 729
    out = sample_lengths(np.array([120, 300, 10]), np.array([1, 0, 2]), 576)
    assert out.tolist() == [695, 300, 1160] and out.dtype == np.int64
    with pytest.raises(ValueError):
        sample_length(0, 1, 576)
    with pytest.raises(ValueError, match="row 1"):
        sample_lengths(np.array([5, 0]), np.array([1, 1]), 576)
