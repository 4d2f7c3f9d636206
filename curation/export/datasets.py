"""Parquet shards that Hugging Face `datasets` loads with the image as an Image feature (decoded to PIL)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curation.engine.store import atomic_write_parquet
from curation.export.mixture import export_samples
from curation.export.webdataset import manifest_path, refuse_old_shards


def with_features(table: pa.Table) -> pa.Table:
    """The samples with `image` as datasets' Image struct {bytes, path} and the features in the schema's metadata
    (the `huggingface` key, as `datasets` writes it)."""
    from datasets import Features, Image

    image = table.column("image").combine_chunks()
    struct = pa.StructArray.from_arrays([image, pa.nulls(len(image), pa.string())], names=["bytes", "path"])
    table = table.set_column(table.column_names.index("image"), "image", struct)
    features = Features.from_arrow_schema(table.schema)
    features["image"] = Image()
    return table.cast(features.arrow_schema)


def export_datasets(paths: list[Path], out: Path, stages: list[str] | None = None, mixture: Path | None = None) -> dict:
    """Write the samples of `paths` (or those `mixture` chooses) as out/NNNNN.parquet, one file per part read
    (`load_dataset("parquet", ...)`), and the mixture manifest beside `out` (schemas.mixture)."""
    parts, tables, manifest = export_samples(paths, stages, mixture, manifest_path(out))
    refuse_old_shards(out, "*.parquet")
    total = 0
    for i, table in enumerate(tables):
        atomic_write_parquet(with_features(table), out / f"{i:05d}.parquet")
        total += table.num_rows
    return {"out": str(out), "shards": len(parts), "samples": total, **manifest.finish(sort=False)}
