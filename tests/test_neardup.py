"""Tests for pHash packing and Hamming-distance near-duplicate grouping."""

from __future__ import annotations

import io
from collections import deque

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from curation.dedup import leaders, neardup
from curation.dedup.neardup import brute_force_groups, choose_plan, near_duplicate_groups, phash_u64


def _distance(a: int, b: int) -> int:
    """Hamming distance of two Python ints."""
    return (a ^ b).bit_count()


def _scene(seed: int) -> Image.Image:
    """A synthetic photo-like image: coloured background with random ellipses and rectangles."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, 280)), int(rng.integers(0, 200))
        box = (x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 120)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=fill)
    return img


def _noise(seed: int) -> Image.Image:
    """Smooth colour noise (64x64 random pixels upscaled)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((256, 256), Image.BILINEAR)


def _photo() -> Image.Image:
    """A real photograph shipped with scikit-image."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut())


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    """Re-encode as JPEG at the given quality."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def test_phash_u64_matches_imagehash_bit_order() -> None:
    img = _scene(0)
    value = phash_u64(img)
    assert 0 <= value < 2**64
    assert value == int(str(imagehash.phash(img)), 16)


@pytest.mark.parametrize("make", [_photo, lambda: _scene(1), lambda: _scene(2), lambda: _scene(3)])
def test_phash_u64_is_stable_under_light_edits(make) -> None:
    img = make()
    w, h = img.size
    dx, dy = round(w * 0.015), round(h * 0.015)  # 3% of width and height trimmed, half on each side
    edits = {
        "jpeg q60": _jpeg(img),
        "resize 0.7x": img.resize((round(w * 0.7), round(h * 0.7)), Image.BILINEAR),
        "crop 3%": img.crop((dx, dy, w - dx, h - dy)),
    }
    base = phash_u64(img)
    for name, edited in edits.items():
        assert _distance(base, phash_u64(edited)) <= 8, name


def test_phash_u64_separates_unrelated_images() -> None:
    images = [_photo(), *(_scene(s) for s in range(4)), _noise(0), _noise(1)]
    hashes = [phash_u64(img) for img in images]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert _distance(hashes[i], hashes[j]) > 16, (i, j)


def _flip(value: int, n_bits: int, rng: np.random.Generator) -> int:
    """Flip n_bits distinct random bits of a 64-bit int."""
    for bit in rng.choice(64, size=n_bits, replace=False):
        value ^= 1 << int(bit)
    return value


def _planted(seed: int, n_random: int = 1500, n_clusters: int = 150, max_flips: int = 6) -> np.ndarray:
    """Random hashes plus clusters of 2-8 variants within max_flips bits of a centre, plus exact copies."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in rng.integers(0, 2**64, size=n_random, dtype=np.uint64)]
    for _ in range(n_clusters):
        centre = int(rng.integers(0, 2**64, dtype=np.uint64))
        values += [_flip(centre, int(rng.integers(1, max_flips + 1)), rng) for _ in range(rng.integers(2, 9))]
    values += [values[int(i)] for i in rng.integers(0, len(values), size=200)]  # exact copies
    values += [values[0]] * 300  # one image copied many times
    return rng.permutation(np.array(values, dtype=np.uint64))


def _low_entropy(seed: int, n: int = 2000, n_bits: int = 12) -> np.ndarray:
    """Hashes with only n_bits random bits, so block buckets are huge and near-duplicates are dense."""
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(64, size=n_bits, replace=False)).astype(np.uint64)
    bits = rng.integers(0, 2, size=(n, n_bits), dtype=np.uint64)  # [n, n_bits]
    return (bits << positions).sum(axis=1, dtype=np.uint64)  # [n]


def _bfs_labels(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Independent check: breadth-first search over Python ints, label = smallest index reached."""
    values = [int(v) for v in hashes]
    labels = [-1] * len(values)
    for start in range(len(values)):
        if labels[start] >= 0:
            continue
        labels[start], queue = start, deque([start])
        while queue:
            i = queue.popleft()
            for j, other in enumerate(values):
                if labels[j] < 0 and _distance(values[i], other) <= max_distance:
                    labels[j] = start
                    queue.append(j)
    return np.array(labels, dtype=np.int64)


def _practical_block_counts(n_unique: int, max_distance: int) -> list[int]:
    """Block counts whose multi-index plan is cheap enough to run in a unit test."""
    counts = []
    for m in range(1, max_distance + 2):
        try:
            if choose_plan(n_unique, max_distance, n_blocks=m, method="mih").est_seconds < 0.3:
                counts.append(m)
        except ValueError:
            pass
    return counts


def test_brute_force_matches_breadth_first_search() -> None:
    hashes = _planted(1, n_random=150, n_clusters=20)[:300]
    for max_distance in (0, 3, 6):
        expected = _bfs_labels(hashes, max_distance)
        np.testing.assert_array_equal(brute_force_groups(hashes, max_distance), expected)


@pytest.mark.parametrize("max_distance", [0, 3, 6, 10])
def test_matches_brute_force_on_planted_clusters(max_distance: int) -> None:
    hashes = _planted(seed=max_distance)
    expected = brute_force_groups(hashes, max_distance)
    assert np.unique(expected).size < hashes.size  # the data does contain groups
    np.testing.assert_array_equal(near_duplicate_groups(hashes, max_distance), expected)
    np.testing.assert_array_equal(near_duplicate_groups(hashes, max_distance, method="pairwise"), expected)
    if max_distance:
        counts = _practical_block_counts(np.unique(hashes).size, max_distance)
        assert len(counts) >= 2
        for m in counts:  # every pigeonhole split must be exact, not only the one the planner picks
            labels = near_duplicate_groups(hashes, max_distance, method="mih", n_blocks=m)
            np.testing.assert_array_equal(labels, expected, err_msg=f"n_blocks={m}")


@pytest.mark.parametrize(("n_bits", "max_distance"), [(12, 1), (20, 1), (20, 3), (12, 6), (12, 12)])
def test_matches_brute_force_with_huge_buckets(n_bits: int, max_distance: int, monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = _low_entropy(seed=max_distance, n_bits=n_bits)
    expected = brute_force_groups(hashes, max_distance)
    np.testing.assert_array_equal(near_duplicate_groups(hashes, max_distance, method="mih"), expected)
    monkeypatch.setattr(neardup, "LINK_BATCH", 1000)  # merge early, so whole buckets get skipped
    monkeypatch.setattr(neardup, "PAIR_CHUNK", 4096)
    np.testing.assert_array_equal(near_duplicate_groups(hashes, max_distance, method="mih"), expected)


def test_small_chunks_and_early_merges_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = np.concatenate([_planted(7), _low_entropy(7, n=500)])
    expected = brute_force_groups(hashes, 4)
    monkeypatch.setattr(neardup, "PAIR_CHUNK", 64)
    monkeypatch.setattr(neardup, "LINK_BATCH", 100)
    for m in (2, 3, 5):
        np.testing.assert_array_equal(near_duplicate_groups(hashes, 4, method="mih", n_blocks=m), expected)
    np.testing.assert_array_equal(near_duplicate_groups(hashes, 4, method="pairwise"), expected)


def test_chaining_joins_a_path_into_one_group() -> None:
    a = 0x0123_4567_89AB_CDEF
    b = a ^ 0b111  # 3 bits from a
    c = b ^ (0b111 << 40)  # 3 bits from b, 6 from a
    far = ~a & (2**64 - 1)
    hashes = np.array([far, c, a, b, far], dtype=np.uint64)
    assert _distance(a, c) == 6
    expected = np.array([0, 1, 1, 1, 0])
    for labels in (near_duplicate_groups(hashes, 3), brute_force_groups(hashes, 3)):
        np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(near_duplicate_groups(hashes, 2), [0, 1, 2, 3, 0])


def test_many_identical_hashes_form_one_group() -> None:
    rng = np.random.default_rng(3)
    blank = np.uint64(phash_u64(Image.new("L", (64, 64), 128)))
    others = rng.integers(0, 2**64, size=500, dtype=np.uint64)
    hashes = rng.permutation(np.concatenate([np.full(1000, blank), others, np.full(5, blank ^ np.uint64(1))]))
    labels = near_duplicate_groups(hashes, 1)
    blank_idx = np.flatnonzero((hashes == blank) | (hashes == blank ^ np.uint64(1)))
    assert np.all(labels[blank_idx] == blank_idx.min())
    np.testing.assert_array_equal(labels, brute_force_groups(hashes, 1))
    exact = near_duplicate_groups(hashes, 0)
    np.testing.assert_array_equal(exact[hashes == blank], np.flatnonzero(hashes == blank)[0])


def test_labels_are_order_independent_partitions() -> None:
    hashes = _planted(11)
    labels = near_duplicate_groups(hashes, 6)
    assert np.all(labels <= np.arange(hashes.size))
    perm = np.random.default_rng(0).permutation(hashes.size)
    permuted = near_duplicate_groups(hashes[perm], 6)  # permuted[k] labels hashes[perm[k]]
    groups = labels[perm]  # [N] group of each permuted position in the original run
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        assert np.all(permuted[members] == members.min())


def test_edge_cases_and_input_types() -> None:
    for fn in (near_duplicate_groups, brute_force_groups):
        assert fn(np.array([], dtype=np.uint64), 5).shape == (0,)
        np.testing.assert_array_equal(fn(np.array([42], dtype=np.uint64), 5), [0])
        assert fn(np.array([1, 2], dtype=np.uint64), 5).dtype == np.int64
    big = [2**64 - 1, 2**64 - 2, 5]  # Python ints beyond int64, e.g. from phash_u64
    np.testing.assert_array_equal(near_duplicate_groups(big, 1), [0, 0, 2])
    signed = np.array(big, dtype=np.uint64).view(np.int64)  # the same bits from an Arrow int64 column
    np.testing.assert_array_equal(near_duplicate_groups(signed, 1), [0, 0, 2])
    with pytest.raises(ValueError, match="max_distance"):
        near_duplicate_groups(np.array([1], dtype=np.uint64), 65)
    with pytest.raises(TypeError, match="integers"):
        near_duplicate_groups(np.array([1.5]), 3)


def test_leader_groups_do_not_chain() -> None:
    """The path a ~ b ~ c: components put c with a (6 bits apart at max_distance 3); leaders do not."""
    a = 0x0123_4567_89AB_CDEF
    b, far = a ^ 0b111, ~a & (2**64 - 1)
    c = b ^ (0b111 << 40)
    hashes = np.array([a, b, c, far, b], dtype=np.uint64)  # best first: a leads, takes b; c leads its own group
    np.testing.assert_array_equal(leaders.leader_groups(hashes, 3), [0, 0, 2, 3, 0])
    np.testing.assert_array_equal(near_duplicate_groups(hashes, 3), [0, 0, 0, 3, 0])
    # the order decides: with b first, b takes both a and c (each 3 bits from it)
    np.testing.assert_array_equal(leaders.leader_groups(hashes[[1, 0, 2]], 3), [0, 0, 0])


@pytest.mark.parametrize("max_distance", [0, 3, 6, 10])
def test_leader_groups_match_the_brute_force_definition(max_distance: int, monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = np.concatenate([_planted(seed=max_distance, n_random=400, n_clusters=60), _low_entropy(1, n=300)])
    expected = leaders.brute_force_leaders(hashes, max_distance)
    assert np.unique(expected).size < hashes.size
    for method in ("auto", "pairwise", "mih") if max_distance else ("auto",):
        np.testing.assert_array_equal(leaders.leader_groups(hashes, max_distance, method=method), expected)
    monkeypatch.setattr(neardup, "PAIR_CHUNK", 64)  # small chunks: the same pairs
    np.testing.assert_array_equal(leaders.leader_groups(hashes, max_distance), expected)
    dist = neardup.popcount64(hashes ^ hashes[expected])
    assert (dist <= max_distance).all()  # every member near its leader
    heads = hashes[np.unique(expected)]
    close = neardup.popcount64(heads[:, None] ^ heads[None, :]) <= max_distance
    assert close.sum() == heads.size  # no two leaders are near duplicates of each other


@pytest.mark.parametrize("max_distance", [0, 4, 8])
def test_verified_leader_groups_match_the_brute_force_definition(max_distance: int) -> None:
    """A second signal refuses some candidates (here: a fixed rule on the two indices); those stay free to lead."""
    hashes = np.concatenate([_planted(seed=3, n_random=200, n_clusters=40), _low_entropy(2, n=200)])

    def verify(leader: int, cand: np.ndarray) -> np.ndarray:
        return (leader * 7 + cand) % 3 != 0

    expected = leaders.brute_force_leaders(hashes, max_distance, verify)
    got = leaders.leader_groups(hashes, max_distance, verify=verify)
    np.testing.assert_array_equal(got, expected)
    refused = got != leaders.leader_groups(hashes, max_distance)
    assert refused.any()  # the rule changed some groups
    assert (neardup.popcount64(hashes ^ hashes[got]) <= max_distance).all()
    members = np.flatnonzero(got != np.arange(hashes.size))
    assert verify(0, np.zeros(0, int)).size == 0 and all(verify(int(got[m]), np.array([m]))[0] for m in members)
