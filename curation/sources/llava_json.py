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
    if turns[-1]["from"] != "gpt":
        return None, ("roles_not_alternating", f"ends on a human turn (turn {len(turns) - 1}): no answer to it")
    first = turns[0]["value"]
    if first.count(IMAGE) == 1 and not first.startswith(IMAGE):
        turns[0]["value"] = f"{IMAGE}\n" + first.replace(IMAGE, "").strip()
    if why := image_slots(turns):
        return None, ("image_token_in_text", why)
    return turns, None


def import_llava_json(path: Path, images: Path, out: Path, kind: str = "imported", shard_size: int = 10_000) -> dict:
    """Write OUT/part-NNNNN.parquet (ImageInstruction rows, shard_size each, written as they fill), OUT/rejects.parquet
    and OUT/_manifest.json (counts; OUT reads as a stage folder)."""
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
    root = Path(images)
    check = ImageReader(ImageOptions())
    taken = {str(r["id"]) for r in data if isinstance(r, dict) and r.get("id") is not None}
    used: set[str] = set()
    verdict: dict[str, tuple[str, str] | None] = {}  # an image shared by several samples is checked once
    out.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(ImageInstruction)
    rows, bad, shards, n_rows, uids = [], [], 0, 0, set()

    def flush() -> None:
        nonlocal shards
        table = pa.Table.from_pylist(rows, schema=schema)
        atomic_write_parquet(conform(table, ImageInstruction, str(path)), out / f"part-{shards:05d}.parquet")
        shards += 1
        rows.clear()

    for i, rec in enumerate(data):
        image = rec.get("image") if isinstance(rec, dict) else None
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        text = image if isinstance(image, str) and _unicode(image) else None
        head = {"uid": make_uid(text, None), "url": text, "caption": None}
        why = _sample_error(rec, image, i)
        turns = None
        if why is None:
            turns, why = _turns(rec.get("conversations"))
        if why is None:
            if image not in verdict:
                verdict[image] = _check(root, image, check)
            why = verdict[image]
        if why is not None:
            bad.append({**head, "reason": why[0], "detail": f"sample {i}: {why[1]}"[:300]})
            continue
        sid = str(rec["id"]) if rec.get("id") is not None else head["uid"]
        if sid in used:  # a repeated id (mixes of several sets): the next free <id>-<n>, in file order
            n = 1
            while f"{sid}-{n}" in taken or f"{sid}-{n}" in used:
                n += 1
            sid = f"{sid}-{n}"
        used.add(sid)
        uids.add(head["uid"])
        rows.append(
            {
                "id": sid,
                "uid": head["uid"],
                "kind": kind,
                "conversations": turns,
                "model": "imported",
                "prompt_version": version,
                "source": "imported",
                "image": (root / image).read_bytes(),
            }
        )
        n_rows += 1
        if len(rows) == shard_size:
            flush()
    if rows:
        flush()
    rejects = make_rejects(bad, "import", [b["reason"] for b in bad], [b["detail"] for b in bad])
    atomic_write_parquet(rejects, out / "rejects.parquet")
    counts = {
        "in": len(data),
        "out": n_rows,
        "rejected": len(bad),
        "rejected_by_reason": dict(Counter(b["reason"] for b in bad).most_common()),
    }
    summary = {"source": str(path), "prompt_version": version, "shards": shards, "images": len(uids), **counts}
    # a stage folder's manifest: the exports and the trainer's loader take OUT as they take a stage of a run
    atomic_write_json(
        out / "_manifest.json", {"stage": out.name, "op": "import", "op_version": "1", "after": []} | summary
    )
    return {"out": str(out), **summary}


def _unicode(text: str) -> bool:
    """Whether a JSON string is valid Unicode (JSON allows lone surrogates, which no file or Parquet can hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sample_error(rec, image, i: int) -> tuple[str, str] | None:
    """Why a record cannot be a sample before its turns are read: not an object, no image or several, a path
    outside the image folder, text that is not Unicode."""
    if not isinstance(rec, dict):
        return "malformed_sample", f"a JSON {type(rec).__name__}, not an object"
    if isinstance(image, list):
        return ("multiple_images", f"{len(image)} images; one is imported") if image else ("no_image", "no image")
    if not isinstance(image, str) or not image:
        return "no_image", "text only"
    if not _unicode(json.dumps(rec, ensure_ascii=False)):
        return "malformed_sample", "text that is not valid Unicode (a lone surrogate)"
    if Path(image).is_absolute() or ".." in Path(image).parts:  # as written: a symlinked folder inside is fine
        return "path_outside_root", f"{image} is not under the image folder"
    return None


def _check(root: Path, image: str, check: ImageReader) -> tuple[str, str] | None:
    """Why the image cannot be used (missing, unreadable, not a whole image), or None."""
    path = root / image
    if not path.is_file():
        return "missing_file", f"{image}: no such file under {root}"
    try:
        got = check(path.read_bytes())
    except OSError as e:
        return "unreadable_file", str(e)[:200]
    return got if isinstance(got, tuple) else None
