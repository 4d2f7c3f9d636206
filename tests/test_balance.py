"""Tests for concept balancing: exact MetaCLIP probabilities, reproducible sampling, partition independence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from curation.concepts import sampling as bal


def zipf_pool(n: int, k: int, n_concepts: int, s: float = 1.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic CSR pool: n images with up to k Zipf(s)-distributed entries each, deduplicated."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, k + 1, n)  # [n] some images match nothing
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ranks = np.arange(1, n_concepts + 1, dtype=np.float64)
    p = ranks**-s / (ranks**-s).sum()
    ids = rng.choice(n_concepts, size=int(offsets[-1]), p=p)  # [M] rank = entry id, 0 most frequent
    return bal.dedupe_rows(offsets, ids)


def test_csr_from_lists_dedupes_within_an_image():
    offsets, ids = bal.csr_from_lists([[3, 1, 3], [], [2, 2, 2], [0]])
    assert offsets.tolist() == [0, 2, 2, 3, 4]
    assert ids.tolist() == [1, 3, 2, 0]
    assert bal.concept_counts(ids, 5).tolist() == [1, 1, 1, 1, 0]  # the repeated 3 and 2 count once


def test_dedupe_ragged_and_uniform_paths_agree(monkeypatch):
    monkeypatch.setattr(bal, "DEDUPE_BLOCK", 3)  # several blocks, the last one partial
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, 60)
    uniform = bal.dedupe_rows(np.arange(0, 61, 6), ids)
    ragged_offsets = np.arange(0, 61, 6)
    ragged = bal.dedupe_rows(np.append(ragged_offsets, 60), ids)  # one extra empty row forces the keyed path
    assert np.array_equal(uniform[1], ragged[1]) and np.array_equal(uniform[0], ragged[0][:-1])


def test_metaclip_probs_hand_computed():
    counts = np.array([100, 10, 1, 20])  # t=10: p = [0.1, 1, 1, 0.5]
    assert np.allclose(bal.entry_probs(counts, 10), [0.1, 1.0, 1.0, 0.5])
    offsets, ids = bal.csr_from_lists([[0], [0, 3], [1], [], [2, 0], [0, 3, 3]])
    probs = bal.metaclip_probs(offsets, ids, counts, 10)
    assert probs[0] == pytest.approx(0.1)
    assert probs[1] == pytest.approx(1 - 0.9 * 0.5)  # 0.55
    assert probs[2] == 1.0 and probs[4] == 1.0  # any entry with p=1 keeps the image
    assert probs[3] == 0.0  # no match, never kept
    assert probs[5] == pytest.approx(0.55)  # the duplicate 3 was dropped


def test_keep_rate_converges_to_probs():
    probs = np.array([0.0, 0.05, 0.3, 0.55, 0.9, 1.0])
    uids = np.arange(probs.size) * 7919
    seeds = 4000
    rate = np.mean([bal.keep_mask(uids, probs, seed) for seed in range(seeds)], axis=0)
    sigma = np.sqrt(probs * (1 - probs) / seeds)
    assert np.all(np.abs(rate - probs) <= 4 * sigma + 1e-12)
    # and across images with a single seed: 200k images at p=0.3
    many = bal.keep_mask(np.arange(200_000), np.full(200_000, 0.3), seed=5)
    assert abs(many.mean() - 0.3) < 4 * np.sqrt(0.21 / 200_000)


def test_string_and_int_uids_are_deterministic():
    uids = np.array([f"img-{i}" for i in range(1000)])
    u1, u2 = bal.uniforms(uids, 3), bal.uniforms(list(uids), 3)
    assert np.array_equal(u1, u2) and np.all((u1 > 0) & (u1 < 1))
    assert not np.array_equal(u1, bal.uniforms(uids, 4))
    assert np.array_equal(bal.uniforms(np.arange(10), 1)[::-1], bal.uniforms(np.arange(10)[::-1], 1))


def exact_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement, by enumerating ordered draws."""
    incl = np.zeros(w.size)
    for order in itertools.permutations(range(w.size), k):
        prob, left = 1.0, w.sum()
        for i in order:
            prob *= w[i] / left
            left -= w[i]
        incl[list(order)] += prob
    return incl


def test_weighted_sample_matches_exact_inclusion():
    w = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.0])
    uids = np.array([11, 22, 33, 44, 55, 66])
    seeds = 2000
    masks = np.array([bal.weighted_sample(uids, w, 2, seed) for seed in range(seeds)])  # [seeds, 6]
    assert np.all(masks.sum(axis=1) == 2)  # exact target size
    assert not masks[:, 5].any()  # zero weight never drawn
    expected = exact_inclusion(w, 2)
    sigma = np.sqrt(expected * (1 - expected) / seeds)
    assert np.all(np.abs(masks.mean(axis=0) - expected) <= 4 * sigma + 1e-12)


def test_weighted_sample_min_weight_and_errors():
    w = np.array([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="only 1 have a positive weight"):
        bal.weighted_sample(np.arange(3), w, 2, seed=0)
    assert bal.weighted_sample(np.arange(3), w, 3, seed=0, min_weight=1e-3).all()


def test_inverse_frequency_weights_sum_and_mean():
    counts = np.array([4, 2, 0, 1])
    offsets, ids = bal.csr_from_lists([[0, 1], [3], []])
    assert np.allclose(bal.inverse_frequency_weights(offsets, ids, counts), [0.75, 1.0, 0.0])
    assert np.allclose(bal.inverse_frequency_weights(offsets, ids, counts, reduce="mean"), [0.375, 1.0, 0.0])
    assert np.allclose(bal.inverse_frequency_weights(offsets, ids, counts, power=2), [1 / 16 + 1 / 4, 1.0, 0.0])


def test_a_larger_power_keeps_more_of_the_tail_at_the_same_budget():
    n_concepts = 2_000
    offsets, ids = zipf_pool(20_000, 3, n_concepts, seed=5)
    counts = bal.concept_counts(ids, n_concepts)
    uids = np.arange(offsets.size - 1)
    t = float(np.quantile(counts[counts > 0], 0.5))  # tail: the rarer half of the entries present
    shares = [
        bal.coverage(offsets, ids, n_concepts, bal.select(uids, offsets, ids, counts, "inverse_frequency", 2_000,
                                                          power=p, seed=1)[0], t)["tail_share"]
        for p in (1, 2, 3)
    ]  # fmt: skip
    assert shares[0] < shares[1] < shares[2]


def test_power_belongs_to_inverse_frequency_and_stays_out_of_old_hashes():
    from curation.ops.balance import BalanceParams

    assert "power" not in BalanceParams(target_fraction=0.5).hashed()
    assert BalanceParams(method="inverse_frequency", target_fraction=0.5, power=2).hashed()["power"] == 2
    with pytest.raises(ValueError, match="power is inverse_frequency"):
        BalanceParams(method="metaclip", target_fraction=0.5, power=2)


def test_partition_independence():
    offsets, ids = zipf_pool(20_000, 8, 2_000, seed=2)
    counts = bal.concept_counts(ids, 2_000)
    uids = np.arange(offsets.size - 1, dtype=np.int64) * 31 + 5
    probs = bal.metaclip_probs(offsets, ids, counts, t=50)
    whole = bal.keep_mask(uids, probs, seed=9)
    cuts = [0, 3_333, 3_334, 12_000, 20_000]
    pieces = [bal.keep_mask(uids[a:b], probs[a:b], seed=9) for a, b in itertools.pairwise(cuts)]
    assert np.array_equal(whole, np.concatenate(pieces))
    perm = np.random.default_rng(0).permutation(uids.size)  # row order does not matter either
    assert np.array_equal(bal.keep_mask(uids[perm], probs[perm], seed=9), whole[perm])

    w = bal.inverse_frequency_weights(offsets, ids, counts)
    target = 2_000
    all_at_once = bal.weighted_sample(uids, w, target, seed=9)
    keys = np.concatenate([bal.es_keys(uids[a:b], w[a:b], seed=9) for a, b in itertools.pairwise(cuts)])
    assert np.array_equal(bal.top_k_mask(keys, target), all_at_once)
    assert all_at_once.sum() == target


def test_balancing_flattens_zipf():
    n_concepts = 5_000
    offsets, ids = zipf_pool(50_000, 10, n_concepts, seed=3)
    counts = bal.concept_counts(ids, n_concepts)
    t = 100.0
    keep = bal.keep_mask(np.arange(offsets.size - 1), bal.metaclip_probs(offsets, ids, counts, t), seed=1)
    before = bal.coverage(offsets, ids, n_concepts, t=t)
    after = bal.coverage(offsets, ids, n_concepts, keep=keep, t=t)
    assert after["gini_present"] < before["gini_present"] and after["gini_all"] < before["gini_all"]
    assert after["head_share_top1pct"] < before["head_share_top1pct"]
    assert after["tail_retention"] == 1.0 and after["entries_covered"] == before["entries_covered"]
    assert after["tail_share"] > before["tail_share"]


def test_gini_known_values():
    assert bal.gini(np.ones(10)) == pytest.approx(0.0)
    assert bal.gini(np.array([0, 0, 0, 1.0])) == pytest.approx(0.75)


def test_t_for_target_size_and_monotonicity():
    n_concepts = 3_000
    offsets, ids = zipf_pool(30_000, 10, n_concepts, seed=4)
    counts = bal.concept_counts(ids, n_concepts)
    sizes = [bal.expected_size(offsets, ids, counts, t) for t in (1, 5, 20, 100, 1000, counts.max())]
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    for target in (2_000, 8_000, 15_000):
        t = bal.t_for_target_size(offsets, ids, counts, target)
        assert abs(bal.expected_size(offsets, ids, counts, t) - target) <= 0.01 * target
    with pytest.raises(ValueError, match="exceeds"):
        bal.t_for_target_size(offsets, ids, counts, offsets.size * 2)


def test_t_for_tail_mass_inverts_tail_mass():
    counts = np.array([1, 1, 2, 5, 5, 10, 100, 0])  # total 124
    assert bal.tail_mass(counts, 3) == pytest.approx(4 / 124)
    masses = [bal.tail_mass(counts, t) for t in range(1, 120)]
    assert all(a <= b for a, b in itertools.pairwise(masses))
    for m in (0.01, 4 / 124, 0.05, 0.2, 0.5, 1.0):
        t = bal.t_for_tail_mass(counts, m)
        assert bal.tail_mass(counts, t) >= m - 1e-12
        assert t == 1 or bal.tail_mass(counts, t - 1) < m  # smallest such integer t
