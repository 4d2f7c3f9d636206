"""Offline packing (BFD and gap-aware): coverage, capacity, rejects, determinism, hand-worked cases, row contract."""

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
    result = pack(list(lengths), np.array(list(lengths.values())), max_len, "bfd")
    assert [ids for ids, _ in result.sequences] == expected
    assert [lens for _, lens in result.sequences] == [[lengths[i] for i in b] for b in expected]
    assert result.rejects == []


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_bfd(seed: int) -> None:
    max_len = [16, 50, 97, 256, 1000, 4096][seed]
    ids, lengths = random_case(400, max_len, seed)
    result = pack(ids, lengths, max_len, "bfd")
    assert [s for s, _ in result.sequences] == brute_bfd(ids, lengths.tolist(), max_len)


def test_gap_aware_hand_worked_case_beats_bfd() -> None:
    # BFD: 5 opens A, 4 (c) -> A (room 1, nothing fits there again), 4 (e) opens B, 3 -> B, 2,2 -> B + new C.
    # gap-aware: row 1 takes 5, then not 4 (room 1 < every sample) but 3 (leaves room for a 2), then 2: full.
    lengths = {"a": 2, "b": 5, "c": 4, "d": 3, "e": 4, "f": 2}
    bfd = pack(list(lengths), np.array(list(lengths.values())), 10, "bfd")
    gap = pack(list(lengths), np.array(list(lengths.values())), 10, "gap_aware")
    assert [ids for ids, _ in bfd.sequences] == [["b", "c"], ["e", "d", "a"], ["f"]]
    assert [ids for ids, _ in gap.sequences] == [["b", "d", "a"], ["c", "e", "f"]]
    assert gap.report()["fill_ratio"] == 1.0
    with pytest.raises(ValueError, match="method must be one of"):
        pack(["a"], np.array([1]), 4, "first_fit")  # type: ignore[arg-type]


def test_gap_aware_fills_image_heavy_mix_better() -> None:
    """Image samples of 600-1500 tokens and a few short text-only ones at 4096: the mix where BFD strands rooms."""
    rng = np.random.default_rng(0)
    n = 20_000
    lengths = np.where(rng.random(n) < 0.9, rng.integers(600, 1500, n), rng.integers(20, 400, n))
    ids = [f"s{k:05d}" for k in range(n)]
    bfd, gap = (pack(ids, lengths, 4096, m).report()["fill_ratio"] for m in ("bfd", "gap_aware"))
    assert gap >= 0.97 and gap > bfd + 0.005, (gap, bfd)


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_every_sample_once_and_capacity_respected(method: str) -> None:
    ids, lengths = random_case(3000, 300, seed=11)
    result = pack(ids, lengths, 300, method)
    packed = [i for s, _ in result.sequences for i in s]
    rejected = [i for i, _, _ in result.rejects]
    assert sorted(packed + rejected) == sorted(ids)
    assert len(set(packed)) == len(packed)
    by_id = dict(zip(ids, lengths.tolist()))
    for s, lens in result.sequences:
        assert lens == [by_id[i] for i in s]
        assert 0 < sum(lens) <= 300
        assert result.cu_lengths(result.sequences.index((s, lens)))[-1] == sum(lens)


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_too_long_rejected_never_cut(method: str) -> None:
    ids = ["ok1", "long", "ok2", "huge", "edge"]
    result = pack(ids, np.array([100, 513, 400, 10_000, 512]), 512, method)
    assert sorted(result.rejects) == [
        ("huge", "too_long", "length 10000 > max_len 512"),
        ("long", "too_long", "length 513 > max_len 512"),
    ]
    assert sorted(result.ids.tolist()) == ["edge", "ok1", "ok2"]
    assert result.lengths.max() == 512  # exactly max_len fits
    rej = rejects_table(result)
    assert rej.column("reason").to_pylist() == ["too_long", "too_long"]
    assert set(rej.column("stage").to_pylist()) == {"pack"}


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_empty_sample_rejected_and_bad_input_raises(method: str) -> None:
    assert pack(["a", "b"], np.array([0, 3]), 4, method).rejects == [("a", "empty", "length 0")]
    with pytest.raises(ValueError, match="duplicate sample id 'a'"):
        pack(["a", "a"], np.array([1, 2]), 4, method)
    with pytest.raises(ValueError, match="negative length"):
        pack(["a", "b"], np.array([1, -2]), 4, method)
    with pytest.raises(TypeError):
        pack(["a"], np.array([1.5]), 4, method)


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_deterministic_across_runs_and_input_order(method: str) -> None:
    ids, lengths = random_case(2000, 200, seed=3)
    first = pack(ids, lengths, 200, method)
    perm = np.random.default_rng(9).permutation(len(ids))
    again = pack([ids[k] for k in perm], lengths[perm], 200, method)
    assert first.sequences == again.sequences and first.rejects == again.rejects
    assert to_table(first).equals(to_table(again))


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_report_matches_recomputation(method: str) -> None:
    ids, lengths = random_case(1500, 128, seed=5)
    result = pack(ids, lengths, 128, method)
    rep = result.report()
    tokens = sum(sum(lens) for _, lens in result.sequences)
    n_seq = len(result.sequences)
    assert rep["fill_ratio"] == pytest.approx(tokens / (n_seq * 128))
    assert rep["compression"] == pytest.approx(sum(len(s) for s, _ in result.sequences) / n_seq)
    counts = (rep["samples"], rep["sequences"], rep["rejected"], rep["max_len"])
    assert counts == (1500, n_seq, len(result.rejects), 128)
    assert rep["tokens"] == int(lengths[(lengths > 0) & (lengths <= 128)].sum())


@pytest.mark.parametrize("method", ["gap_aware", "bfd"])
def test_table_conforms_to_packed_sequence(method: str) -> None:
    ids, lengths = random_case(500, 64, seed=2)
    result = pack(ids, lengths, 64, method)
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
    anyres = sample_lengths(np.array([120, 300, 10]), np.array([1, 0, 2]), np.array([2000, 5, 100]))
    assert anyres.tolist() == [120 - 1 + 2000, 300, 8 + 2 * 100]  # per-sample image tokens (AnyRes)
    out = sample_lengths(np.array([120, 300, 10]), np.array([1, 0, 2]), 576)
    assert out.tolist() == [695, 300, 1160] and out.dtype == np.int64
    with pytest.raises(ValueError):
        sample_length(0, 1, 576)
    with pytest.raises(ValueError, match="row 1"):
        sample_lengths(np.array([5, 0]), np.array([1, 1]), 576)
