"""What the demo DAG would cost at 10M images on a Ray cluster with the real models, from measured per-stage figures.

Stages with a model use published (or here-measured) rates of the real one; CPU stages use the rate measured in the
e2e bench, per core. A stage's global step (dedup's grouping, balance's selection) runs in one process: its measured
time is scaled linearly with the rows (grouping is O(n log n) at best), not divided over the cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rate:
    per_unit: float  # items per second per unit
    unit: str  # "core" or "gpu"
    source: str


VLLM_TOK_S = 3000  # output tokens/s of one A100 80GB serving a 7B model with vLLM (DeepSeek-R1-Distill-Qwen-7B: 3,363)
VLLM_SOURCE = "vLLM ~3,000 output tok/s per A100 for a 7B model (morphllm.com/vllm-benchmarks; H100 ~2x, Lambda)"
OUTPUT_TOKENS = {"recaption": 150, "conversation": 250, "detail": 150, "reasoning": 250, "short_answer": 30}

PUBLISHED = {
    "ingest": Rate(1300 / 16, "core", "img2dataset laion400m.md: 1,300 sample/s on one 16-core 2 Gbps machine"),
    "embed": Rate(
        312 * 175.33 / 381.68,
        "gpu",
        "clip-retrieval: ViT-L/14 312 sample/s per A100; x 175.3/381.7 GFLOPs (open_clip model_profile, L/14 vs H/14)",
    ),
    **{
        k: Rate(VLLM_TOK_S / t, "gpu", f"{VLLM_SOURCE}; {t} output tokens per sample assumed")
        for k, t in OUTPUT_TOKENS.items()
    },
}


def faiss_rate(n_concepts: int = 500_000, dim: int = 1024, k: int = 20, queries: int = 2000) -> Rate:
    """Measured here: top-k search of a flat inner-product index of `n_concepts` (MetaCLIP's 500K at ViT-H/14's
    1024 dims), one thread, the way match_concepts searches."""
    import faiss

    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    for start in range(0, n_concepts, 50_000):
        index.add(rng.standard_normal((min(50_000, n_concepts - start), dim), dtype=np.float32))
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        t = time.perf_counter()
        index.search(q, k)
        rate = queries / (time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    return Rate(rate, "core", f"measured here: FAISS IndexFlatIP {n_concepts:,} x {dim}, top-{k}, 1 thread")


def estimate(run: dict, cores_here: int, images: int, nodes: int, cores: int, gpus: int, match: Rate) -> list[dict]:
    """Per stage of a measured e2e run (`bench_e2e.run`'s dict): items at `images` URLs, the rate assumed, hours."""
    scale = images / run["stages"]["ingest"]["in"]
    rows = []
    for name, s in run["stages"].items():
        op = s.get("op", name)
        items = s["in"] * scale
        serial_s = s.get("aggregate_s", 0.0) * scale  # the global step: one process, linear in rows
        key = name if name in PUBLISHED else op
        if key == "match_concepts":
            rate = match
        elif key in PUBLISHED:
            rate = PUBLISHED[key]
        else:
            parallel = max(s["seconds"] - s.get("aggregate_s", 0.0), 1e-9)
            rate = Rate(s["in"] / parallel / cores_here, "core", f"measured here ({cores_here} cores)")
        units = nodes * cores if rate.unit == "core" else gpus
        seconds = items / (rate.per_unit * units) + serial_s
        rows.append(
            {
                "stage": name,
                "items": round(items),
                "rate": rate.per_unit,
                "unit": rate.unit,
                "source": rate.source,
                "serial_s": serial_s,
                "hours": seconds / 3600,
            }
        )
    return rows
