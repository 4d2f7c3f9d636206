"""read_parquet: Parquet files holding the images themselves (img2dataset's Parquet output, Hugging Face image
datasets: a binary column or an `image` struct of bytes and path) as Image rows, no download. The plan is cut from
the files' metadata (row counts), not their data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curation.download.reasons import download_failure
from curation.ops.local_source import LocalSource, LocalSourceParams, Sample
from curation.sources.files import find_files

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "bytes")


class ReadParquetParams(LocalSourceParams):
    files: str | list[str] = Field(description="Parquet files, folders of them or globs")
    image_col: str | None = Field(
        None, description=f"binary column or {{bytes, path}} struct; default the first of {', '.join(IMAGE_COLUMNS)}"
    )
    caption_col: str | None = Field("caption", description="the caption column (HF sets often call it text)")
    url_col: str | None = Field("url", description="the web URL column, where there is one")


class ReadParquet(LocalSource):
    """Image rows from image Parquet: url from url_col, else the struct's path, else file#row; img2dataset's failed
    rows (status other than success) are rejects with the download's reason."""

    name = "read_parquet"
    version = "1"
    Params = ReadParquetParams
    plan_schema = pa.schema([("file", pa.string()), ("row", pa.int64())])

    def inputs(self) -> list[Path]:
        return find_files(self.params.files, (".parquet",), "Parquet")

    def list_samples(self) -> Iterator[pa.Table]:
        for f in self.inputs():
            self._image_col(pq.read_schema(f), f)  # a file without images fails the plan, not its parts
            n = pq.ParquetFile(f).metadata.num_rows
            yield pa.table({"file": pa.array([str(f)] * n, pa.string()), "row": pa.array(range(n), pa.int64())})

    def _image_col(self, schema: pa.Schema, f: Path) -> str:
        col = self.params.image_col or next((c for c in IMAGE_COLUMNS if c in schema.names), None)
        if col is None or col not in schema.names:
            raise ValueError(f"{f}: no image column {col or IMAGE_COLUMNS} (columns: {schema.names}); set image_col")
        return col

    def read(self, plan: pa.Table) -> Iterator[Sample]:
        for name in plan.column("file").unique().to_pylist():
            rows = plan.filter(pc.equal(plan.column("file"), name)).column("row").to_numpy()
            yield from self._read_file(Path(name), rows)

    def _read_file(self, f: Path, rows) -> Iterator[Sample]:
        p = self.params
        pf = pq.ParquetFile(f)
        image_col = self._image_col(pf.schema_arrow, f)
        names = pf.schema_arrow.names
        wanted = [
            c for c in {image_col, p.caption_col, p.url_col, "status", "error_message", *p.metadata} if c in names
        ]
        wanted += [c for c in ("sha256", "original_width", "original_height", "exif") if c in names and c not in wanted]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        groups, start = [], 0
        for g in range(pf.num_row_groups):  # the row groups that hold rows lo..hi-1
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                groups.append((g, start))
            start += n
        table = pf.read_row_groups([g for g, _ in groups], columns=wanted)
        first = groups[0][1] if groups else 0
        data = table.take(pa.array(rows - first)).to_pylist()
        for row, r in zip(rows.tolist(), data):
            yield self._sample(f, row, r, image_col)

    def _sample(self, f: Path, row: int, r: dict, image_col: str) -> Sample:
        p = self.params
        image = r.get(image_col)
        path = image.get("path") if isinstance(image, dict) else None
        data = image.get("bytes") if isinstance(image, dict) else image
        url = (r.get(p.url_col) if p.url_col else None) or path or f"{f.name}#{row}"
        caption = r.get(p.caption_col) if p.caption_col else None
        caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
        known = {k: r[k] for k in ("sha256", "original_width", "original_height", "exif") if r.get(k) is not None}
        s = Sample(url, caption, f"{f}#{row}", meta={k: r.get(k) for k in p.metadata}, known=known)
        if r.get("status") not in (None, "success"):
            s.error = download_failure(r.get("error_message"))  # img2dataset kept the failed row
        elif data is None:
            s.error = ("missing_image", f"column {image_col} is null")
        else:
            s.data = data
        return s
