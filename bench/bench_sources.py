"""Issue 17: planning a sharded URL list and reading WebDataset tars, each next to a baseline in the same run.

    python bench/bench_sources.py [--files 100 --rows 10000] [--tars 4 --per-tar 500] [--json]

1. Planning: a list of FILES Parquet files of ROWS rows each (LAION-style: url, caption, similarity, uid), planned
   by ingest (streamed: one batch at a time) in a fresh process; the baseline is what ingest did before sharded lists,
   reading the whole list into one table in the driver. Time and peak RSS over the process's RSS after imports.
2. Reading tars: read_webdataset (plan: header scan; process: each image checked, Image rows) against the
   `webdataset` library's own reader on the same tars, best of ROUNDS, alternating: verify decode (each image
   decoded once) against webdataset decoding to PIL (what a training loader does); verify header (the header read)
   against webdataset not decoding at all (bytes only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_list(d: Path, files: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["dog", "cat", "red", "car", "tree", "on", "a", "the", "beach", "photo", "of", "house", "blue"]
    for f in range(files):
        ids = range(f * rows, (f + 1) * rows)
        caps = [" ".join(rng.choices(words, k=8)) for _ in ids]
        pq.write_table(
            pa.table(
                {
                    "url": [f"https://img.example.com/{i:09d}.jpg" for i in ids],
                    "caption": caps,
                    "similarity": [rng.random() for _ in ids],
                    "uid": [f"{i:032x}" for i in ids],
                }
            ),
            d / f"part-{f:05d}.parquet",
        )


def _plan_child(kind: str, urls: str, work: str, q) -> None:
    """In a fresh process: plan (kind ours) or load-all (kind baseline); put (seconds, peak RSS over imports)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from curation.ops.ingest import Ingest, IngestParams, make_uid

    base = _rss_mib()
    t = time.perf_counter()
    if kind == "ours":
        op = Ingest(IngestParams(urls=urls, metadata={"similarity": "float32", "uid": "string"}), "ingest", Path(work))
        parts = len(op.plan())
    else:  # before sharded lists: the whole list in one table, uids and the repeat check in Python
        table = ds.dataset(urls, format="parquet").to_table()
        uids = [make_uid(u, c) for u, c in zip(table["url"].to_pylist(), table["caption"].to_pylist())]
        seen: set[str] = set()
        repeat = []
        for u in uids:
            repeat.append(u in seen)
            seen.add(u)
        table = table.append_column("uid_", pa.array(uids)).append_column("repeat", pa.array(repeat))
        parts = -(-table.num_rows // 1000)
    q.put((time.perf_counter() - t, _rss_mib() - base, parts))


def bench_plan(files: int, rows: int, tmp: Path) -> dict:
    urls = tmp / "list"
    _write_list(urls, files, rows)
    ctx = mp.get_context("spawn")
    out = {"files": files, "rows": files * rows}
    for kind in ("ours", "baseline"):
        q = ctx.Queue()
        p = ctx.Process(target=_plan_child, args=(kind, str(urls), str(tmp / f"work-{kind}"), q))
        p.start()
        secs, mib, parts = q.get()
        p.join()
        out[kind] = {"seconds": round(secs, 2), "peak_rss_mib": round(mib, 1), "parts": parts}
    return out


def _write_tars(d: Path, tars: int, per_tar: int) -> list[Path]:
    from PIL import Image

    from curation.fixtures.sources import write_tar

    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pool = []
    for _ in range(64):  # img2dataset's output: 256 px JPEGs
        im = Image.new("RGB", (256, rng.choice((192, 256))), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(30):
            x, y = rng.randrange(200), rng.randrange(150)
            im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + rng.randrange(8, 56), y + 40))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        pool.append(buf.getvalue())
    paths = []
    for t in range(tars):
        samples = []
        for i in range(per_tar):
            key = f"{t:05d}{i:04d}"
            data = pool[(t * per_tar + i) % len(pool)]
            info = {"url": f"https://img.example.com/{key}.jpg", "caption": f"photo {key}", "key": key}
            info |= {"status": "success", "sha256": hashlib.sha256(data).hexdigest(), "width": 256}  # img2dataset's
            samples.append(
                (
                    key,
                    {
                        "jpg": pool[(t * per_tar + i) % len(pool)],
                        "txt": info["caption"].encode(),
                        "json": json.dumps(info).encode(),
                    },
                )
            )
        paths.append(write_tar(d / f"{t:05d}.tar", samples))
    return paths


def bench_tars(tars: int, per_tar: int, rounds: int, tmp: Path) -> dict:
    import webdataset as wds

    from curation.ops.read_webdataset import ReadWebDataset, ReadWebDatasetParams

    paths = _write_tars(tmp / "tars", tars, per_tar)
    n = tars * per_tar
    urls = [str(p) for p in paths]

    def ours(k: int, verify: str = "decode") -> int:
        params = ReadWebDatasetParams(tars=str(tmp / "tars"), shard_size=per_tar, verify=verify)
        op = ReadWebDataset(params, "read", tmp / f"w{k}-{verify}")
        op.setup()
        return sum(op.process(p)[0].num_rows for p in op.plan())

    def wds_pil(k: int) -> int:
        return sum(1 for s in wds.WebDataset(urls, shardshuffle=False).decode("pil") if s["jpg"].size)

    def wds_raw(k: int) -> int:
        return sum(1 for s in wds.WebDataset(urls, shardshuffle=False) if s["jpg"])

    runs = {"ours": ours, "wds_pil": wds_pil, "ours_header": lambda k: ours(k, "header"), "wds_raw": wds_raw}
    best = dict.fromkeys(runs, float("inf"))
    for k in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            got = fn(k)
            best[name] = min(best[name], time.perf_counter() - t)
            assert got == n, f"{name} read {got} of {n} samples"
    rate = {k: n / v for k, v in best.items()}
    return {
        "samples": n,
        "tars": tars,
        "ours_per_s": round(rate["ours"], 1),
        "wds_pil_per_s": round(rate["wds_pil"], 1),
        "wds_raw_per_s": round(rate["wds_raw"], 1),
        "ours_header_per_s": round(rate["ours_header"], 1),
        "ratio_pil": round(rate["ours"] / rate["wds_pil"], 3),
        "ratio_header_raw": round(rate["ours_header"] / rate["wds_raw"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--rows", type=int, default=10_000, help="rows per file")
    ap.add_argument("--tars", type=int, default=4)
    ap.add_argument("--per-tar", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        result = {
            "plan": bench_plan(args.files, args.rows, Path(tmp)),
            "tars": bench_tars(args.tars, args.per_tar, args.rounds, Path(tmp)),
        }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
