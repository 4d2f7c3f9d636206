"""Tests for FAISS concept search: exactness of flat, recall of IVF, caching and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.concepts.index import (
    ConceptIndex,
    cache_key,
    clustered_vectors,
    load_or_build,
    normalize_rows,
    recall_at_k,
    sidecar_path,
)


def _numpy_topk(concepts: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine with a matmul and a stable argsort."""
    sims = normalize_rows(queries) @ normalize_rows(concepts).T  # [N, C]
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [N, k]
    return np.take_along_axis(sims, ids, axis=1), ids


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """20K clustered concepts x 64 d and 500 queries from the same distribution."""
    data = clustered_vectors(20_500, 64, n_clusters=200, spread=1.0, seed=7)  # [20500, 64]
    return data[:20_000], data[20_000:]


def test_flat_matches_numpy_topk():
    rng = np.random.default_rng(0)
    concepts = rng.standard_normal((2_000, 48)).astype(np.float32) * 3.0  # not normalised on purpose
    queries = rng.standard_normal((100, 48)).astype(np.float32)
    scores, ids = ConceptIndex(concepts, kind="flat").search(queries, 10)
    ref_scores, ref_ids = _numpy_topk(concepts, queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_k_clamped_to_concept_count():
    concepts = clustered_vectors(30, 16, n_clusters=3, spread=0.5, seed=1)
    scores, ids = ConceptIndex(concepts).search(concepts[:4], 100)
    assert scores.shape == ids.shape == (4, 30)
    assert sorted(ids[0].tolist()) == list(range(30))
    assert ids[:, 0].tolist() == [0, 1, 2, 3]  # each concept is its own best match


def test_query_shapes_and_errors():
    concepts = clustered_vectors(100, 16, n_clusters=4, spread=0.5, seed=2)
    index = ConceptIndex(concepts)
    scores, ids = index.search(concepts[5], 3)  # 1-D query
    assert scores.shape == (1, 3) and ids[0, 0] == 5
    scores, ids = index.search(np.zeros((0, 16), np.float32), 3)
    assert scores.shape == ids.shape == (0, 3)
    with pytest.raises(ValueError, match=r"query dimension 8 .* dimension 16"):
        index.search(np.ones((2, 8), np.float32), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(concepts[:2], 0)
    with pytest.raises(ValueError, match=r"\[C, D\]"):
        ConceptIndex(np.zeros((0, 16), np.float32))


def test_ivf_recall_on_clustered_data_and_not_on_uniform(clustered):
    concepts, queries = clustered
    _, exact = ConceptIndex(concepts, kind="flat").search(queries, 20)
    _, approx = ConceptIndex(concepts, kind="ivf", nlist=256, nprobe=8).search(queries, 20)
    clustered_recall = recall_at_k(approx, exact)
    assert clustered_recall >= 0.9

    # Uniform random unit vectors have no cluster structure, so nprobe/nlist = 8/256 of the lists
    # misses most true neighbours: recall must be measured on real-like data, never on noise.
    rng = np.random.default_rng(3)
    uniform = normalize_rows(rng.standard_normal((20_500, 64)))  # [20500, 64]
    _, exact_u = ConceptIndex(uniform[:20_000], kind="flat").search(uniform[20_000:], 20)
    _, approx_u = ConceptIndex(uniform[:20_000], kind="ivf", nlist=256, nprobe=8).search(uniform[20_000:], 20)
    uniform_recall = recall_at_k(approx_u, exact_u)
    assert uniform_recall < 0.5 < clustered_recall


def test_ivf_is_deterministic(clustered):
    concepts, queries = clustered
    first = ConceptIndex(concepts, kind="ivf", nlist=128, nprobe=4, seed=11).search(queries, 10)
    second = ConceptIndex(concepts, kind="ivf", nlist=128, nprobe=4, seed=11).search(queries, 10)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


def test_ivf_clamps_nlist_and_pads_missing_results():
    concepts = clustered_vectors(50, 16, n_clusters=5, spread=0.5, seed=4)
    index = ConceptIndex(concepts, kind="ivf", nlist=1000, nprobe=1)
    assert index.nlist == 50 and index.nprobe == 1
    scores, ids = index.search(concepts[:2], 50)
    assert ids.shape == (2, 50) and (ids == -1).any()  # one list of 50 cannot hold 50 results
    assert np.all(scores[ids == -1] < -1e30)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, clustered, kind):
    concepts, queries = clustered
    key = cache_key("ViT-B-32-quickgelu/metaclip_400m", "abc123")
    index = ConceptIndex(concepts, kind=kind, nlist=64, nprobe=4, key=key)
    sidecar = index.save(tmp_path / "concepts.faiss")
    assert sidecar == sidecar_path(tmp_path / "concepts.faiss")
    meta = json.loads(sidecar.read_text())
    assert meta["key"] == key and meta["count"] == 20_000 and meta["d"] == 64 and meta["kind"] == kind

    loaded = ConceptIndex.load(tmp_path / "concepts.faiss", expected_key=key)
    assert (loaded.kind, loaded.nlist, loaded.nprobe, loaded.count) == (index.kind, index.nlist, index.nprobe, 20_000)
    for got, want in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, want)


def test_load_rejects_key_mismatch_and_missing_sidecar(tmp_path):
    concepts = clustered_vectors(200, 16, n_clusters=4, spread=0.5, seed=5)
    path = tmp_path / "idx.faiss"
    ConceptIndex(concepts, key=cache_key("model-a", "vocab1")).save(path)
    with pytest.raises(ValueError, match=r"built for key 'model-a\|vocab1', expected 'model-b\|vocab1'"):
        ConceptIndex.load(path, expected_key=cache_key("model-b", "vocab1"))
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="rebuild"):
        ConceptIndex.load(path)


def test_load_or_build_caches_by_key(tmp_path):
    concepts = clustered_vectors(300, 16, n_clusters=4, spread=0.5, seed=6)
    calls = []

    def embed() -> np.ndarray:
        calls.append(1)
        return concepts

    path = tmp_path / "cache.faiss"
    load_or_build(path, "m|v1", embed)
    load_or_build(path, "m|v1", embed)
    assert len(calls) == 1
    rebuilt = load_or_build(path, "m|v2", embed)  # vocabulary changed: rebuild and overwrite
    assert len(calls) == 2 and rebuilt.key == "m|v2"
    assert ConceptIndex.load(path, expected_key="m|v2").count == 300


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1.0) / 2)
    with pytest.raises(ValueError, match="equal shape"):
        recall_at_k(approx[:, :2], exact)
