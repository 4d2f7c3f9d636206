"""Peak memory of building packed shards (trainer.packed.build_packed) vs holding every encoded sample in memory.

    .venv/bin/python bench/bench_build_packed.py [--n 40000] [--image-kb 16] [--json]

Writes Instruction rows (a colour question each, one random-noise JPEG of ~image-kb KB) to a shard of n/4 rows and
one of n rows; for each, in fresh processes side by side: `build_packed` (two streaming passes, spill files per
packed file) and the baseline, the earlier build: every encoded sample with its image bytes in one list
(`list(trainer.packed.encoded(...))`, before any writing). Reported: peak RSS of each process above its RSS after
imports, and its growth from n/4 to n next to the growth of the shard's image bytes (streaming: bounded by a few
times FILE_BYTES + SPILL_BYTES, set by --file-mib, so it should not grow with n; the baseline grows with the data).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Current RSS of this process, MiB (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def make_shard(root: Path, n: int, image_kb: int) -> tuple[Path, int]:
    """One Instruction shard of n rows and the tiny tokenizer; returns (shard, image bytes in all)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from schemas import ImageInstruction, arrow_schema
    from trainer.tiny import make_tiny_tokenizer

    make_tiny_tokenizer(root / "tok")
    rng = np.random.default_rng(0)
    side = int((image_kb * 1024 / 0.95) ** 0.5)  # noise JPEG at q90: ~0.95 bytes per pixel
    pool = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    shard, total = root / "data" / "part-00000.parquet", 0
    shard.parent.mkdir(parents=True)
    with pq.ParquetWriter(shard, arrow_schema(ImageInstruction)) as w:
        for start in range(0, n, 1000):
            rows = []
            for i in range(start, min(start + 1000, n)):
                conv = [
                    {"from": "human", "value": "<image>\nWhat color is the square?" + " Look closely." * (i % 7)},
                    {"from": "gpt", "value": "Red."},
                ]
                img = pool[i % len(pool)]
                total += len(img)
                rows.append(
                    ImageInstruction(
                        id=f"s{i:07d}",
                        uid=f"u{i}",
                        kind="short_answer",
                        conversations=conv,
                        model="bench",
                        prompt_version="v0",
                        image=img,
                    ).model_dump(by_alias=True)
                )
            w.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(ImageInstruction)))
    return shard, total


def child(mode: str, root: Path, file_mib: int) -> dict:
    """Run one side in this process: import, note RSS, build; return peak RSS above the post-import RSS."""
    from collections import Counter

    from transformers import AutoTokenizer

    import trainer.packed as tp
    from trainer.packed import build_packed, encoded, resolve_shards

    tp.FILE_BYTES = tp.SPILL_BYTES = file_mib << 20

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    base = rss_mib()
    t0 = time.perf_counter()
    if mode == "stream":
        rep = build_packed([str(root / "data")], root / f"out-{mode}", tok, "chat", 16, 1024)
        samples = rep["samples"]
    else:
        samples = len(list(encoded(resolve_shards([str(root / "data")]), tok, "chat", 16, 1024, None, Counter())))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {
        "mode": mode,
        "samples": samples,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_above_start_mib": round(peak - base, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40000, help="rows of the larger shard (the smaller has n/4)")
    ap.add_argument("--image-kb", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="one JSON line")
    ap.add_argument(
        "--file-mib",
        type=int,
        default=32,
        help="FILE_BYTES and SPILL_BYTES of the build, MiB (256 by "
        "default in trainer.packed; scaled down so that the bound shows at bench sizes)",
    )
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.file_mib)))
        return
    runs = []
    for n in (args.n // 4, args.n):
        with tempfile.TemporaryDirectory(prefix="bench-build-packed-") as tmp:
            root = Path(tmp)
            _, image_bytes = make_shard(root, n, args.image_kb)
            run = {"n": n, "image_mib": round(image_bytes / 2**20, 1)}
            for mode in ("stream", "memory"):
                p = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--root", str(root), "--file-mib", str(args.file_mib)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                run[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            runs.append(run)
    small, big = runs
    grow = {
        m: round(big[m]["peak_above_start_mib"] - small[m]["peak_above_start_mib"], 1) for m in ("stream", "memory")
    }
    out = {
        "file_mib": args.file_mib,
        "runs": runs,
        "image_growth_mib": round(big["image_mib"] - small["image_mib"], 1),
        "peak_growth_mib": grow,
        "ratio_at_n": round(big["stream"]["peak_above_start_mib"] / big["memory"]["peak_above_start_mib"], 3),
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
