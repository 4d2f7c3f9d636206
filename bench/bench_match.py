"""Benchmark concept matching: the match_concepts stage vs. raw faiss.IndexFlatIP.search, and IVF speed and recall
vs flat."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from curation.concepts.clip import model_id_for
from curation.concepts.embeddings import ConceptCache, _npy_bytes
from curation.concepts.index import ConceptIndex, clustered_vectors, normalize_rows, recall_at_k
from curation.concepts.vocab import make_table, write_vocab
from curation.engine.config import parse_pipeline
from curation.engine.store import StageDir, atomic_write_bytes, atomic_write_json, atomic_write_parquet
from curation.engine.workers import build_op, run_step
from schemas import Embedding, conform

MODEL = "bench-clip"  # a name only: the concept vectors are synthetic, no text tower runs


def seed_cache(root: Path, concepts: np.ndarray) -> tuple[Path, str]:
    """A vocabulary and its concept embeddings in the cache layout match_concepts reads; return (vocab, model id)."""
    vocab = root / "vocab.parquet"
    write_vocab(make_table([f"concept {i}" for i in range(len(concepts))], "title"), vocab)
    model_id = model_id_for(MODEL, None, "fp32", "cpu")
    cache = ConceptCache(vocab, model_id, "{}", root / "cache")
    atomic_write_bytes(cache.embeddings_path, _npy_bytes(concepts))
    atomic_write_json(cache.dir / "meta.json", {"key": cache.key, "count": len(concepts), "dim": concepts.shape[1]})
    return vocab, model_id


def embed_parts(run: Path, queries: np.ndarray, model_id: str, part_rows: int) -> list[str]:
    """Write the queries as the embed stage's output parts (what match_concepts reads)."""
    parts = []
    for i, a in enumerate(range(0, len(queries), part_rows)):
        q = queries[a : a + part_rows]
        table = pa.table(
            {
                "uid": [f"{a + j:08d}" for j in range(len(q))],
                "model": [model_id] * len(q),
                "image_embedding": pa.array(list(q), pa.list_(pa.float32())),
                "text_embedding": [None] * len(q),
            }
        )
        part = f"part-{i:05d}"
        atomic_write_parquet(conform(table, Embedding, "bench"), StageDir(run, "embed").part(part))
        # the url and alt-text of each row stay where ingest wrote them (the stage reads them for its rejects)
        urls = [f"http://127.0.0.1/{u}.jpg" for u in table.column("uid").to_pylist()]
        atomic_write_parquet(
            pa.table({"uid": table.column("uid"), "url": urls, "caption": urls}), StageDir(run, "ingest").part(part)
        )
        parts.append(part)
    return parts


def stage_vs_raw(concepts: np.ndarray, queries: np.ndarray, k: int, part_rows: int, rounds: int) -> dict:
    """Per part: read Parquet, search, build and validate rows, write Parquet (run_step) vs index.search alone."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vocab, model_id = seed_cache(root, concepts)
        raw = {
            "name": "bench",
            "stages": {  # only the match stage runs; it reads the embed parts written below
                "ingest": {"op": "ingest", "params": {"urls": "unused.parquet"}},
                "embed": {
                    "op": "embed",
                    "after": ["ingest"],
                    "params": {"model": MODEL, "pretrained": None, "precision": "fp32"},
                },
                "match": {
                    "op": "match_concepts",
                    "after": ["embed"],
                    "params": {
                        "vocab": str(vocab),
                        "model": MODEL,
                        "pretrained": None,
                        "precision": "fp32",
                        "k": k,
                        "cache_dir": str(root / "cache"),
                    },
                },
            },
        }
        stage = parse_pipeline(raw, "bench.yaml").stages["match"]
        run = root / "run"
        parts = embed_parts(run, queries, model_id, part_rows)
        op = build_op(stage, str(run))
        t = time.perf_counter()
        op.prepare()  # builds and saves the flat index once
        op.setup()  # loads it, as each actor does
        load_s = time.perf_counter() - t
        index = faiss.IndexFlatIP(concepts.shape[1])
        index.add(normalize_rows(concepts))
        index.search(queries[:10], k)  # warm both
        raw_s, stage_s = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            for a in range(0, len(queries), part_rows):
                index.search(queries[a : a + part_rows], k)
            raw_s.append(time.perf_counter() - t)
            sd = StageDir(run, "match")
            for p in parts:
                sd.uncommit(p)
            t = time.perf_counter()
            for p in parts:
                res = run_step(op, stage, str(run), "process", p)
                assert not res["error"], res["error"]
            stage_s.append(time.perf_counter() - t)
        out = pa.concat_tables([pa.parquet.read_table(sd.part(p)) for p in parts])
        _, exact = index.search(queries, k)
        same = np.mean([a == b for a, b in zip(out.column("concept_ids").to_pylist(), exact.tolist())])
    return {
        "raw_s": round(min(raw_s), 3),
        "stage_s": round(min(stage_s), 3),
        "overhead": round(min(stage_s) / min(raw_s) - 1, 3),
        "index_load_s": round(load_s, 2),
        "raw_q_s": round(len(queries) / min(raw_s)),
        "stage_q_s": round(len(queries) / min(stage_s)),
        "same_top_k_as_raw": round(float(same), 4),
    }


def ivf_vs_flat(concepts: np.ndarray, queries: np.ndarray, k: int, nlist: int, nprobes: list[int]) -> dict:
    flat = ConceptIndex(concepts, "flat")
    t = time.perf_counter()
    _, exact = flat.search(queries, k)
    flat_s = time.perf_counter() - t
    t = time.perf_counter()
    ivf = ConceptIndex(concepts, "ivf", nlist=nlist, nprobe=nprobes[0])
    build_s = time.perf_counter() - t
    rows = []
    for nprobe in nprobes:
        ivf._search.nprobe = ivf.nprobe = nprobe
        t = time.perf_counter()
        _, ids = ivf.search(queries, k)
        secs = time.perf_counter() - t
        rows.append(
            {
                "nprobe": nprobe,
                "q_s": round(len(queries) / secs),
                "speedup": round(flat_s / secs, 1),
                "recall_at_k": round(recall_at_k(ids, exact), 4),
            }
        )
    return {"flat_q_s": round(len(queries) / flat_s), "nlist": nlist, "build_s": round(build_s, 1), "ivf": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--part-rows", type=int, default=1000, help="rows per stage part")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=5000, help="clusters of the synthetic concept embeddings")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--skip-ivf", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    concepts = clustered_vectors(args.concepts, args.dim, args.clusters, spread=0.5, seed=0)  # [C, D]
    queries = clustered_vectors(args.queries, args.dim, args.clusters, spread=0.5, seed=0)  # same centres, new noise
    queries = normalize_rows(
        queries + 0.1 * np.random.default_rng(1).standard_normal(queries.shape).astype(np.float32) / np.sqrt(args.dim)
    )
    res = {
        "concepts": args.concepts,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "stage_vs_raw": stage_vs_raw(concepts, queries, args.k, args.part_rows, args.rounds),
    }
    if not args.skip_ivf:
        res["ivf_vs_flat"] = ivf_vs_flat(concepts, queries, args.k, args.nlist, args.nprobe)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(res))
        return
    s = res["stage_vs_raw"]
    print(
        f"top-{args.k} of {args.queries} queries over {args.concepts} x {args.dim} concepts, "
        f"{res['faiss_threads']} faiss threads"
    )
    print(f"  raw IndexFlatIP.search:         {s['raw_s']:7.2f} s  ({s['raw_q_s']} q/s)")
    print(
        f"  match_concepts stage (per part: read, search, rows, validate, write): {s['stage_s']:7.2f} s  "
        f"({s['stage_q_s']} q/s)"
    )
    print(
        f"  stage overhead:                 {100 * s['overhead']:6.1f} %  (goal <= 25 %); index load per worker "
        f"{s['index_load_s']} s"
    )
    print(
        f"  rows with the same top-{args.k} as raw faiss: {100 * s['same_top_k_as_raw']:.2f} % (the rest differ "
        f"only in near-ties)"
    )
    if "ivf_vs_flat" in res:
        v = res["ivf_vs_flat"]
        print(f"  IVF nlist {v['nlist']} (build {v['build_s']} s) vs flat {v['flat_q_s']} q/s:")
        for r in v["ivf"]:
            print(
                f"    nprobe {r['nprobe']:3d}: {r['q_s']:7d} q/s  x{r['speedup']:5.1f}  recall@{args.k} "
                f"{r['recall_at_k']:.4f}"
            )
    print(f"  total {res['total_s']} s")


if __name__ == "__main__":
    main()
