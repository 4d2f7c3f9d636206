"""Semantic dedup (issue 15): the library against brute force on planted duplicates, the op's global step on any
partitioning, and the stage on local Ray after embed (exact copies in the fixture web are semantic duplicates)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.dedup.semantic import brute_force_semantic, semantic_dedup
from curation.dedup.semantic_parts import semantic_dedup_parts
from curation.ops.semdedup import SemDedup, SemDedupParams
from tests.conftest import stage_rows


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted(n=2000, d=32, n_dup=300, seed=0):
    """n unit vectors around 8 topics plus n_dup noisy copies: half well inside eps=0.01 (cosine ~0.999), half
    outside (cosine ~0.95)."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((8, d)))
    base = _unit(topics[rng.integers(0, 8, n)] + 0.12 * rng.standard_normal((n, d)))
    src = rng.choice(n, n_dup, replace=False)
    scale = np.where(np.arange(n_dup) < n_dup // 2, 0.008, 0.06)[:, None]  # per-dim noise -> cos ~0.999 / ~0.95
    copies = _unit(base[src] + scale * rng.standard_normal((n_dup, d)))
    return np.concatenate([base, copies]), src, np.arange(n_dup) < n_dup // 2


def test_library_matches_brute_force_on_planted_duplicates():
    emb, src, inside = _planted()
    ref = brute_force_semantic(emb, 0.01)
    n = emb.shape[0] - src.size
    dup_rows = n + np.flatnonzero(inside)
    assert (ref.leader[dup_rows] == src[inside]).all() and ref.kept[n + np.flatnonzero(~inside)].all()
    one = semantic_dedup(emb, 0.01, labels=np.zeros(emb.shape[0]), chunk_floats=5000)  # one cluster, small chunks
    np.testing.assert_array_equal(one.leader, ref.leader)
    np.testing.assert_allclose(one.cosine, ref.cosine, atol=1e-5)
    km = semantic_dedup(emb, 0.01, n_clusters=8, seed=1)  # close copies land in their original's cluster
    np.testing.assert_array_equal(km.leader, ref.leader)
    assert km.cluster.max() == 7 and (km.cluster[dup_rows] == km.cluster[src[inside]]).all()
    assert (km.dup_count()[src[inside]] >= 2).all() and (km.cosine[dup_rows] > 0.99).all()


def test_a_priority_order_is_the_same_as_rows_in_that_order():
    emb, _, inside = _planted(n=800, n_dup=120, seed=3)
    perm = np.random.default_rng(4).permutation(emb.shape[0])  # perm[j]: the row that comes j-th
    moved = semantic_dedup(emb[perm], 0.01, n_clusters=5, seed=2)
    given = semantic_dedup(emb, 0.01, n_clusters=5, seed=2, priority=perm)
    np.testing.assert_array_equal(perm[moved.leader], given.leader[perm])
    np.testing.assert_array_equal(moved.cluster, given.cluster[perm])
    ref = brute_force_semantic(emb, 0.01, priority=perm)
    np.testing.assert_array_equal(ref.leader, given.leader)
    assert (~given.kept).sum() == inside.sum()
    with pytest.raises(ValueError, match="permutation"):
        semantic_dedup(emb, 0.01, n_clusters=5, priority=perm[:-1])


def test_leaders_do_not_chain():
    """a~b and b~c but a !~ c: b is a's duplicate, c stays (NeMo's max-over-earlier rule would drop c too)."""
    t = np.deg2rad(7.0)  # cos 7 deg = 0.9925 >= 0.99; cos 14 deg = 0.970 < 0.99
    emb = np.array([[1, 0], [np.cos(t), np.sin(t)], [np.cos(2 * t), np.sin(2 * t)]], np.float32)
    for r in (semantic_dedup(emb, 0.01, n_clusters=1), brute_force_semantic(emb, 0.01)):
        assert r.leader.tolist() == [0, 0, 2]


def _parts(emb: np.ndarray, size: int, pixels=None) -> list[tuple[str, pa.Table]]:
    uids = [f"u{i:05d}" for i in range(emb.shape[0])]
    pixels = np.full(emb.shape[0], 100) if pixels is None else pixels
    t = pa.table(
        {
            "uid": uids,
            "image_embedding": pa.array(list(emb), pa.list_(pa.float32())),
            "original_width": pa.array(pixels, pa.int32()),
            "original_height": pa.array(np.ones_like(pixels), pa.int32()),
        }
    )
    return [(f"part-{i:05d}", t.slice(s, size)) for i, s in enumerate(range(0, t.num_rows, size))]


def _analyses(op: SemDedup, parts, folder) -> dict:
    """Each part's summary file, as the engine's analyze phase writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for p, t in parts:
        pq.write_table(op.analyze(t), folder / f"{p}.parquet")
    return {p: folder / f"{p}.parquet" for p, _ in parts}


def _decide(tmp_path, parts, **params) -> tuple[dict, pa.Table]:
    op = SemDedup(SemDedupParams(**params), "semdedup", tmp_path / "_work")
    op.aggregate_files(_analyses(op, parts, tmp_path / "analysis"))
    outs, rejs = zip(*(op.process(p, t) for p, t in parts))
    out, rej = pa.concat_tables(outs), pa.concat_tables(rejs)
    assert out.num_rows + rej.num_rows == sum(t.num_rows for _, t in parts)
    return dict(zip(rej.column("uid").to_pylist(), rej.column("detail").to_pylist())), out


def test_op_decides_the_same_on_any_partitioning_and_keeps_the_bigger_image(tmp_path):
    emb, src, inside = _planted(n=600, n_dup=100, seed=2)
    perm = np.random.default_rng(5).permutation(emb.shape[0])  # uids out of priority order in the parts
    a, out_a = _decide(tmp_path / "a", _parts(emb[perm], 97), n_clusters=3)
    b, out_b = _decide(tmp_path / "b", _parts(emb[perm], 250), n_clusters=3)
    assert a == b and out_a.sort_by("uid").equals(out_b.sort_by("uid")) and len(a) == inside.sum()
    pos = np.argsort(perm)  # row i of emb has uid u{pos[i]}
    for k in np.flatnonzero(inside):
        detail = a[f"u{pos[600 + k]:05d}"] if pos[600 + k] > pos[src[k]] else a[f"u{pos[src[k]]:05d}"]
        assert detail.startswith("semantic duplicate of u") and "(cosine 0.99" in detail
    # pixels first: make every copy bigger than its original, and the copies are kept instead
    pixels = np.full(emb.shape[0], 100)
    pixels[600:] = 400
    c, _ = _decide(tmp_path / "c", _parts(emb, 128, pixels), n_clusters=3)
    assert sorted(c) == sorted(f"u{i:05d}" for i in src[inside])
    assert all(c[f"u{i:05d}"].startswith(f"semantic duplicate of u{600 + k:05d}") for k, i in enumerate(src[inside]))
    empty_out, empty_rej = SemDedup(SemDedupParams(), "semdedup", tmp_path / "c" / "_work").process(
        "p9", _parts(emb, 1)[0][1].slice(0, 0)
    )
    assert empty_out.num_rows == empty_rej.num_rows == 0


def test_clusters_spread_over_tasks_decide_as_one_array(tmp_path):
    """The global step in buckets of clusters (no task holds every embedding) gives the one-array decisions."""
    emb, _, inside = _planted(n=900, n_dup=150, seed=6)
    perm = np.random.default_rng(7).permutation(emb.shape[0])
    pixels = np.random.default_rng(8).integers(1, 4, emb.shape[0]) * 100  # ties broken by uid
    parts = _parts(emb[perm], 111, pixels)
    op = SemDedup(SemDedupParams(), "semdedup", tmp_path / "_work")
    files = _analyses(op, parts, tmp_path / "analysis")
    bucket_sizes = [emb.nbytes * 2, emb.nbytes // 10]  # one bucket; a bucket per cluster
    got = []
    for i, bucket_bytes in enumerate(bucket_sizes):
        out = tmp_path / f"dec{i}"
        info = semantic_dedup_parts(files, out, 0.01, n_clusters=6, seed=3, bucket_bytes=bucket_bytes)
        assert info == {"rows": emb.shape[0], "clusters": 6, "buckets": 1 if i == 0 else 6}
        assert not (tmp_path / f"dec{i}.spill").exists()  # the spilled embeddings are gone once decided
        dec = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*/*.parquet"))]).sort_by("uid")
        got.append(dec)
    assert got[0].equals(got[1])
    # the library on the whole array, rows in priority order (most pixels, then smallest uid)
    table = pa.concat_tables([t for _, t in parts])
    order = np.lexsort((np.array(table.column("uid").to_pylist()), -table.column("original_width").to_numpy()))
    vecs = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    ref = semantic_dedup(vecs, 0.01, n_clusters=6, seed=3, priority=order)
    uid = np.array(table.column("uid").to_pylist(), dtype=object)
    want = dict(zip(uid[~ref.kept], uid[ref.leader[~ref.kept]]))
    dec = got[0]
    mine = {u: k for u, k in zip(dec.column("uid").to_pylist(), dec.column("kept_uid").to_pylist()) if k}
    assert mine == want and len(mine) == inside.sum()


@pytest.fixture(scope="module")
def runs(ray_session, web, demo_assets, tmp_path_factory):
    """ingest -> embed -> semdedup on the session web (no pHash dedup: its exact copies reach semdedup), at two
    part sizes."""
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline

    model = next(a.split("=", 1)[1] for a in demo_assets if a.startswith("embed.pretrained="))
    urls = tmp_path_factory.mktemp("semurls") / "urls.parquet"  # the flaky URL (503 once) belongs to test_pipeline
    pl.read_parquet(web[0] / "urls.parquet").filter(~pl.col("url").str.contains("/flaky/")).write_parquet(urls)
    out = {}
    for shard in (60, 25):
        raw = {
            "name": "semdedup-test",
            "stages": {
                "ingest": {
                    "op": "ingest",
                    "params": {"urls": str(urls), "image_size": 128, "allow_loopback": True},
                },
                "embed": {
                    "op": "embed",
                    "after": ["ingest"],
                    "params": {"model": "curation-tiny-clip", "pretrained": model, "text": False},
                },
                "semdedup": {"op": "semdedup", "after": ["embed"], "params": {"eps": 0.001, "rows_per_cluster": 20}},
            },
        }
        run = tmp_path_factory.mktemp(f"sem{shard}")
        out[shard] = run, run_pipeline(parse_pipeline(raw, "sem.yaml", [f"ingest.shard_size={shard}"]), run)
    return out


def test_stage_rejects_semantic_duplicates_with_the_kept_uid(runs):
    run, manifests = runs[60]
    c = manifests["semdedup"]["counts"]
    assert c["in"] == manifests["embed"]["counts"]["out"] == c["out"] + c["rejected"]
    assert len(manifests["semdedup"]["parts"]) == len(manifests["embed"]["parts"]) > 1
    out, rej = stage_rows(run, "semdedup", also=("sha256",)), stage_rows(run, "semdedup", rejects=True)
    assert rej.height > 0 and set(rej["reason"]) == {"semantic_duplicate"}
    emb = stage_rows(run, "embed", also=("sha256",))
    vec = dict(zip(emb["uid"], (np.asarray(v, np.float32) for v in emb["image_embedding"])))
    kept = set(out["uid"])
    for uid, detail in zip(rej["uid"], rej["detail"]):
        k = detail.removeprefix("semantic duplicate of ").split(" ")[0]
        assert k in kept and float(vec[uid] @ vec[k]) >= 0.999 - 1e-5
    # every exact copy (same bytes, same embedding) is rejected against the one image kept for its sha256
    by_sha = emb.with_columns(kept=pl.col("uid").is_in(list(kept)))
    copies = by_sha.group_by("sha256").agg(pl.len().alias("n"), pl.col("kept").sum().alias("kept"))
    assert (copies.filter(pl.col("n") > 1)["kept"] <= 1).all() and copies.filter(pl.col("n") > 1).height > 0
    assert out["sem_dup_count"].sum() == c["in"]
    work = run / "semdedup" / "_work"  # the analyze phase's copies of the embeddings are gone once decided
    assert not list((work / "analyze").glob("*.parquet")) and (work / "clusters.json").is_file()


def test_stage_decides_the_same_with_another_part_size(runs):
    (run_a, man_a), (run_b, man_b) = runs[60], runs[25]
    assert len(man_b["semdedup"]["parts"]) > len(man_a["semdedup"]["parts"])
    assert man_a["semdedup"]["counts"] == man_b["semdedup"]["counts"]
    ra, rb = (stage_rows(r, "semdedup", rejects=True).select("uid", "detail").sort("uid") for r in (run_a, run_b))
    assert ra.equals(rb)
