"""Decontamination (issue 15): precision and recall on planted copies of a held-out set, and time per image against
the eval set's size.

    python bench/bench_decontaminate.py --n 2000 --held-out 100 [--sizes 100,1000,10000,100000] [--json]

A fixture web of --n pairs (no server: the files as written, then shrunk the way ingest stores them, longest side
--image-size, JPEG q95) holds originals and their planted copies (exact, reencode, resize, crop). --held-out
originals, half of them with copies, are the eval set (a folder). The op (prepare + process, hashes only) runs over
every decodable image of the web; a row is positive when it is an eval original or a copy of one. Recall is given
per variant; precision over all rejects. Then the eval index is padded with random hashes and thumbnails up to each
of --sizes items and one pass over the same images is timed: hashing the inputs is the same at every size, the
matching (chunked popcounts over the whole eval set) grows with it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.dedup.signals import THUMB_BYTES
from curation.engine.store import atomic_write_parquet
from curation.fixtures.web import make_web
from curation.ops.decontaminate import Decontaminate, DecontaminateParams


def stored(data: bytes, side: int) -> bytes:
    """The image as ingest would store it: longest side at most `side`, JPEG q95."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        return buf.getvalue()


def rows(web: Path, truth: pl.DataFrame, side: int) -> pa.Table:
    out = []
    for url in truth.filter(pl.col("width").is_not_null())["url"]:
        f = web / "files" / url.rsplit("/", 1)[1]
        if not (f.is_file() and f.stat().st_size):
            continue
        data = f.read_bytes()
        try:
            image = stored(data, side)
        except Exception:
            continue
        out.append({"uid": url, "url": url, "sha256": hashlib.sha256(data).hexdigest(), "image": image})
    return pa.Table.from_pylist(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--sizes", default="100,1000,10000,100000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-decon-"))
    try:
        t0 = time.time()
        make_web(tmp / "web", n=a.n, port=1, seed=a.seed)
        truth = pl.read_parquet(tmp / "web" / "truth.parquet")
        copied = truth.filter(pl.col("source_url").is_not_null())["source_url"].unique().sort().to_list()
        others = truth.filter((pl.col("kind") == "ok") & ~pl.col("url").is_in(copied))["url"].sort().to_list()
        held = copied[: a.held_out // 2] + others[: a.held_out - min(len(copied), a.held_out // 2)]
        (tmp / "eval").mkdir()
        for u in held:
            shutil.copyfile(tmp / "web" / "files" / u.rsplit("/", 1)[1], tmp / "eval" / u.rsplit("/", 1)[1])
        table = rows(tmp / "web", truth, a.image_size)
        setup_s = time.time() - t0
        op = Decontaminate(DecontaminateParams(eval_set=str(tmp / "eval")), "decontaminate", tmp / "_work")
        t = time.time()
        op.prepare()
        prepare_s = time.time() - t
        op.setup()
        t = time.time()
        _, rej = op.process("p", table)
        process_s = time.time() - t
        got = dict(zip(rej.column("url").to_pylist(), rej.column("detail").to_pylist()))
        item = {u: u.rsplit("/", 1)[1] for u in held}
        variant = {}
        for r in truth.filter(pl.col("source_url").is_in(held)).iter_rows(named=True):
            item[r["url"]] = r["source_url"].rsplit("/", 1)[1]
            variant[r["url"]] = r["variant"]
        present = set(table.column("url").to_pylist())
        positives = {u for u in item if u in present}
        right = sum(u in item and got[u].startswith(f"matches eval item {item[u]} (") for u in got)
        # baseline side by side: exact-file decontamination (sha256 of the bytes against the eval files')
        eval_sha = {hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp / "eval").iterdir()}
        exact = {
            u for u, h in zip(table.column("url").to_pylist(), table.column("sha256").to_pylist()) if h in eval_sha
        }
        recall = {}
        for v in ("original", "exact", "reencode", "resize", "crop"):
            us = [u for u in positives if variant.get(u, "original") == v]
            recall[v] = f"{sum(u in got for u in us)}/{len(us)}"
        res = {
            "n_web": a.n,
            "images": table.num_rows,
            "eval_items": len(held),
            "positives": len(positives),
            "rejected": len(got),
            "precision": round(right / max(1, len(got)), 4),
            "recall_all": round(len(positives & set(got)) / max(1, len(positives)), 4),
            "recall_without_crop": round(
                sum(u in got for u in positives if variant.get(u) != "crop")
                / max(1, sum(variant.get(u) != "crop" for u in positives)),
                4,
            ),
            "recall_by_variant": recall,
            "sha256_baseline": {
                "rejected": len(exact),
                "precision": round(len(exact & positives) / max(1, len(exact)), 4),
                "recall_all": round(len(positives & exact) / max(1, len(positives)), 4),
            },
            "prepare_s": round(prepare_s, 3),
            "ms_per_image": round(1000 * process_s / table.num_rows, 3),
            "web_setup_s": round(setup_s, 1),
            "by_eval_size": [],
        }
        real = pq.read_table(op.index_path)
        rng = np.random.default_rng(a.seed)
        for size in (int(s) for s in a.sizes.split(",")):
            pad = max(0, size - real.num_rows)
            extra = pa.table(
                {
                    "id": pa.array([f"pad{i:07d}" for i in range(pad)], pa.string()),
                    "sha256": pa.array([f"{i:064x}" for i in range(pad)], pa.string()),
                    "phash": pa.array(rng.integers(0, 2**64, pad, dtype=np.uint64), pa.uint64()),
                    "thumb": pa.array(
                        [bytes(b) for b in rng.integers(0, 256, (pad, THUMB_BYTES), np.uint8)], pa.binary(THUMB_BYTES)
                    ),
                }
            )
            atomic_write_parquet(pa.concat_tables([real, extra]), op.index_path)
            op.setup()
            t = time.time()
            _, rej = op.process("p", table)
            s = time.time() - t
            res["by_eval_size"].append(
                {
                    "eval_items": real.num_rows + pad,
                    "ms_per_image": round(1000 * s / table.num_rows, 3),
                    "rejected": rej.num_rows,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(res))
        return
    for k, v in res.items():
        if k != "by_eval_size":
            print(f"{k:>20}: {v}")
    print(f"{'eval items':>12} {'ms/image':>10} {'rejected':>9}")
    for r in res["by_eval_size"]:
        print(f"{r['eval_items']:>12} {r['ms_per_image']:>10} {r['rejected']:>9}")


if __name__ == "__main__":
    main()
