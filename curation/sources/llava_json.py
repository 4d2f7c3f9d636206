"""`curate import llava-json`: a LLaVA-format instruction set ([{id, image, conversations: [{from, value}]}] plus an
image folder: LLaVA-Instruct, ShareGPT4V, llava_v1_5_mix665k) as ImageInstruction shards (our schema, each sample
with its image bytes), so that external instruction data can be mixed with ours for training. Every sample is
checked as our own are (one `<image>`, leading the first human turn; roles alternate, human first; no empty turn;
the image there and whole); each that fails is a reject with a reason, never a crash."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa

from curation.engine.store import atomic_write_json, atomic_write_parquet, make_rejects
from curation.ops.ingest import make_uid
from curation.sources.images import ImageOptions, ImageReader
from curation.synth.parse import IMAGE, image_slots
from schemas import ImageInstruction, arrow_schema, conform

ROLES = ("human", "gpt")


def _turns(conversations) -> tuple[list[dict] | None, tuple[str, str] | None]:
    """The turns in our form, `<image>` moved to lead the first human turn as LLaVA's preprocessing moves it, or
    (reason, detail)."""
    if not isinstance(conversations, list) or not conversations:
        return None, ("malformed_sample", "no conversations list")
    turns = []
    for i, t in enumerate(conversations):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ROLES:
            return None, ("malformed_sample", f"turn {i} is not {{from: human|gpt, value: text}}")
        if t["from"] != ROLES[i % 2]:
            return None, ("roles_not_alternating", f"turn {i} is from {t['from']}; human first, then alternating")
        if not t["value"].strip():
            return None, ("empty_turn", f"turn {i} is empty")
        turns.append({"from": t["from"], "value": t["value"]})
    first = turns[0]["value"]
    if first.count(IMAGE) == 1 and not first.startswith(IMAGE):
        turns[0]["value"] = f"{IMAGE}\n" + first.replace(IMAGE, "").strip()
    if why := image_slots(turns):
        return None, ("image_token_in_text", why)
    return turns, None


def import_llava_json(path: Path, images: Path, out: Path, kind: str = "imported", shard_size: int = 10_000) -> dict:
    """Write OUT/part-NNNNN.parquet (ImageInstruction rows), OUT/rejects.parquet and OUT/_import.json."""
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a LLaVA JSON file (a list of samples), but a JSON {type(data).__name__}")
    if out.exists() and any(out.glob("part-*.parquet")):
        raise ValueError(f"{out} already holds shards: choose an empty --out")
    version = hashlib.sha256(raw).hexdigest()[:12]
    root = Path(images).resolve()
    check = ImageReader(ImageOptions())
    ids = Counter(str(r.get("id")) for r in data if isinstance(r, dict) and r.get("id") is not None)
    seen: Counter = Counter()
    cache: dict[str, bytes | tuple[str, str]] = {}  # an image shared by several samples is read and checked once
    rows, bad = [], []
    for i, rec in enumerate(data):
        image = rec.get("image") if isinstance(rec, dict) else None
        head = {"uid": make_uid(image if isinstance(image, str) else None, None), "url": str(image), "caption": None}
        if not isinstance(rec, dict):
            bad.append({**head, "reason": "malformed_sample", "detail": f"sample {i} is a JSON {type(rec).__name__}"})
            continue
        if isinstance(image, list):
            if len(image) != 1:
                reason = "no_image" if not image else "multiple_images"
                bad.append({**head, "reason": reason, "detail": f"sample {i}: {len(image)} images; one is imported"})
                continue
            image = image[0]
            head["uid"], head["url"] = make_uid(image, None), str(image)
        if not isinstance(image, str) or not image:
            bad.append({**head, "url": None, "reason": "no_image", "detail": f"sample {i}: text only"})
            continue
        turns, why = _turns(rec.get("conversations"))
        if why is None:
            got = cache.get(image)
            if got is None:
                got = cache[image] = _read(root, image, check)
            why = got if isinstance(got, tuple) else None
        if why is not None:
            bad.append({**head, "reason": why[0], "detail": f"sample {i}: {why[1]}"[:300]})
            continue
        sid = str(rec.get("id")) if rec.get("id") is not None else head["uid"]
        seen[sid] += 1
        if ids[sid] > 1 or rec.get("id") is None:
            sid = f"{sid}-{seen[sid]}"  # repeated ids (mixes of several sets) made unique, in file order
        rows.append(
            {
                "id": sid,
                "uid": head["uid"],
                "kind": kind,
                "conversations": turns,
                "model": "imported",
                "prompt_version": version,
                "source": "imported",
                "image": got,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(ImageInstruction)
    shards = 0
    for shards, start in enumerate(range(0, len(rows), shard_size), 1):
        table = pa.Table.from_pylist(rows[start : start + shard_size], schema=schema)
        atomic_write_parquet(conform(table, ImageInstruction, str(path)), out / f"part-{shards - 1:05d}.parquet")
    rejects = make_rejects(bad, "import", [b["reason"] for b in bad], [b["detail"] for b in bad])
    atomic_write_parquet(rejects, out / "rejects.parquet")
    summary = {
        "source": str(path),
        "prompt_version": version,
        "samples_in": len(data),
        "imported": len(rows),
        "rejected": len(bad),
        "rejected_by_reason": dict(Counter(b["reason"] for b in bad).most_common()),
        "shards": shards,
        "images": len({r["uid"] for r in rows}),
    }
    atomic_write_json(out / "_import.json", summary)
    return {"out": str(out), **summary}


def _read(root: Path, image: str, check: ImageReader) -> bytes | tuple[str, str]:
    """The image's bytes as they are, or (reason, detail)."""
    path = (root / image).resolve()
    if Path(image).is_absolute() or not path.is_relative_to(root):
        return "path_outside_root", f"{image} is not under {root}"
    if not path.is_file():
        return "missing_file", f"{image}: no such file under {root}"
    try:
        data = path.read_bytes()
    except OSError as e:
        return "unreadable_file", str(e)[:200]
    got = check(data)
    return got if isinstance(got, tuple) else data
