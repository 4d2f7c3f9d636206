"""WebDataset tar shards in img2dataset's layout: NNNNN.tar of key.jpg, key.txt, key.json, and NNNNN.parquet beside.

key.txt is the image's alt-text (as img2dataset writes it), for instruction samples too: their turns are in key.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from curation.engine.store import atomic_write_parquet
from curation.export.mixture import export_samples


def image_ext(data: bytes) -> str:
    """The member extension for encoded image bytes (sources that keep bytes as they are may hold PNG or WebP)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def refuse_old_shards(out: Path, pattern: str) -> None:
    """A folder that already holds shards would mix them with these (readers glob the folder)."""
    if out.is_dir() and (old := sorted(out.glob(pattern))):
        raise ValueError(f"{out} already holds shards ({old[0].name}...): choose an empty --out")


def manifest_path(out: Path) -> Path:
    """A folder export's mixture manifest, beside the folder (not in it, where readers glob): out.mixture.parquet."""
    return out.with_name(out.name + ".mixture.parquet")


def export_webdataset(
    paths: list[Path],
    out: Path,
    shard_size: int = 10_000,
    stages: list[str] | None = None,
    mixture: Path | None = None,
) -> dict:
    """Write the samples of `paths` (or those `mixture` chooses) as tar shards of at most `shard_size` samples each,
    each shard's metadata beside it, and the mixture manifest of the samples (schemas.mixture)."""
    import webdataset as wds

    _, tables, manifest = export_samples(paths, stages, mixture, manifest_path(out))
    refuse_old_shards(out, "*.tar")
    out.mkdir(parents=True, exist_ok=True)
    pending: list[pa.Table] = []  # the open shard's metadata rows
    shards: list[str] = []
    schema = pa.schema([("key", pa.string())])  # of an export without samples

    def finished(tar: str) -> None:
        meta = pa.concat_tables(pending) if pending else schema.empty_table()
        atomic_write_parquet(meta, Path(tar).with_suffix(".parquet"))
        shards.append(tar)
        pending.clear()

    total = 0
    # mtime fixed: the same rows give the same bytes; verbose off: stdout carries the CLI's JSON
    with wds.ShardWriter(
        str(out / "%05d.tar"), maxcount=shard_size, post=finished, verbose=0, encoder=False, mtime=0
    ) as sink:
        for table in tables:
            meta = table.drop_columns(["image"])
            schema = meta.schema
            for i, (row, image) in enumerate(zip(meta.to_pylist(), table.column("image").to_pylist(), strict=True)):
                if "." in row["key"]:  # WebDataset groups a sample's files by the name up to the first dot
                    raise ValueError(f"sample key {row['key']!r} has a dot: WebDataset readers would split it")
                sink.write(
                    {
                        "__key__": row["key"],
                        image_ext(image): image,
                        "txt": (row.get("caption") or "").encode(),
                        "json": json.dumps(row, ensure_ascii=False).encode(),
                    }
                )
                pending.append(meta.slice(i, 1))
                total += 1
    return {"out": str(out), "shards": len(shards), "samples": total, **manifest.finish(sort=False)}
