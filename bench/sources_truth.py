"""Issue 17: the read_* sources' decisions judged against the fixture web's truth at size.

    python bench/sources_truth.py [--n 6000]

The web's files (every whole image, duplicate and broken file) are written as a folder, WebDataset tars and image
Parquet, and read by read_folder, read_webdataset and read_parquet in this process. Judged against truth: every
whole image kept with identical bytes (recall), no broken file kept (precision of the rejects), and each broken file
rejected with the reason its variant calls for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WANT = {"truncated": "truncated_image", "html": "not_an_image", "empty": "empty_body", "huge": "too_many_pixels"}


def judge(op_name: str, params: dict, work: Path, items: dict[str, dict]) -> dict:
    from curation.ops import OPS

    cls = OPS[op_name]
    op = cls(cls.Params(**params), op_name, work)
    t = time.perf_counter()
    parts = op.plan()
    op.setup()
    kept, rejected, n_in = {}, {}, 0
    for p in parts:
        n_in += op.part_size(p)
        out, rej = op.process(p)
        kept |= {r["url"]: r["image"] for r in out.select(["url", "image"]).to_pylist()}
        rejected |= dict(zip(rej.column("url").to_pylist(), rej.column("reason").to_pylist()))
    secs = time.perf_counter() - t
    names = {Path(u).name: u for u in items}  # read_folder's urls are paths relative to the folder

    def key(url: str) -> str:
        return url if url in items else names.get(Path(url).name, url)

    kept = {key(u): v for u, v in kept.items()}
    rejected = {key(u): v for u, v in rejected.items() if u}
    whole = {u for u, it in items.items() if it["variant"] not in WANT}
    broken = {u for u, it in items.items() if it["variant"] in WANT}
    right = sum(rejected.get(u) == WANT[items[u]["variant"]] for u in broken)
    return {
        "op": op_name,
        "samples": n_in,
        "accounted": n_in == len(kept) + len(rejected),
        "whole_kept": len(whole & kept.keys()),
        "whole": len(whole),
        "bytes_identical": sum(kept[u] == items[u]["data"] for u in whole & kept.keys()),
        "broken_kept": len(broken & kept.keys()),
        "broken": len(broken),
        "broken_right_reason": right,
        "reasons": dict(Counter(rejected.values())),
        "seconds": round(secs, 1),
        "unmatched": len(kept.keys() - items.keys()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from curation.fixtures import sources as fx
    from curation.fixtures.web import make_web

    with tempfile.TemporaryDirectory(prefix="sources-truth-") as tmp:
        tmp = Path(tmp)
        make_web(tmp / "web", n=args.n, port=1, seed=0)
        items = {it["url"]: it for it in fx.web_items(tmp / "web")}
        fx.write_folder(tmp / "web", tmp / "folder")
        fx.write_webdataset(tmp / "web", tmp / "wds", per_tar=500)
        fx.write_image_parquet(tmp / "web", tmp / "pq", files=4)
        runs = [
            ("read_folder", {"root": str(tmp / "folder")}),
            ("read_webdataset", {"tars": str(tmp / "wds")}),
            ("read_parquet", {"files": str(tmp / "pq"), "caption_col": "text"}),
        ]
        res = [judge(name, params, tmp / name, items) for name, params in runs]
    print(json.dumps(res) if args.json else json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
