"""read_folder: a folder of images (searched recursively) as Image rows; captions from a sidecar table (file,
caption) or a .txt beside each image. url is the image's path relative to the folder, so uids do not depend on
where the folder is mounted."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from curation.ops.local_source import LocalSource, LocalSourceParams, Sample
from curation.sources.files import TABLE_SUFFIXES
from curation.sources.tables import INVALID, read_text_table

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ReadFolderParams(LocalSourceParams):
    root: str = Field(description="the image folder (searched recursively; hidden files and folders skipped)")
    captions: str | None = Field(
        None,
        description="a table (CSV, TSV, JSONL, Parquet) of file (relative to root) and caption; each row is a sample, "
        "its image read from root; default: every image of root, its caption from NAME.txt beside it (none if absent)",
    )
    file_col: str = "file"
    caption_col: str = "caption"


class ReadFolder(LocalSource):
    """Image rows from local files; a sidecar row whose file is not there is a `missing_file` reject."""

    name = "read_folder"
    version = "1"
    Params = ReadFolderParams
    plan_schema = pa.schema([("file", pa.string()), ("caption", pa.string()), ("error", pa.string())])

    @property
    def root(self) -> Path:
        return Path(self.params.root)

    def inputs(self) -> list[Path]:
        return [*self._images, Path(self.params.captions)] if self.params.captions else self._images

    @cached_property
    def _images(self) -> list[Path]:
        """The folder's images, walked once per op (the fingerprint and the plan both need them)."""
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a folder")
        return sorted(
            f
            for f in self.root.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and not any(x.startswith(".") for x in f.relative_to(self.root).parts)
        )

    def list_samples(self) -> Iterator[pa.Table]:
        p = self.params
        if p.captions is None:
            files = [f.relative_to(self.root).as_posix() for f in self._images]
            yield pa.table({"file": files, "caption": [None] * len(files), "error": [None] * len(files)})
            return
        sidecar = Path(p.captions)
        if not any(sidecar.name.lower().endswith(s) for s in TABLE_SUFFIXES):
            raise ValueError(f"{sidecar}: captions must be one of {', '.join(TABLE_SUFFIXES)}")
        t = read_text_table(sidecar)
        if p.file_col not in t.column_names:
            raise ValueError(f"{sidecar}: no column {p.file_col!r} (columns: {t.column_names}); set file_col")
        caption = t.column(p.caption_col) if p.caption_col in t.column_names else pa.nulls(len(t), pa.string())
        yield pa.table({"file": t.column(p.file_col), "caption": caption, "error": t.column(INVALID)})

    def read(self, plan: pa.Table) -> Iterator[Sample]:
        sidecar = self.params.captions is not None
        for name, caption, error in zip(*(plan.column(c).to_pylist() for c in ("file", "caption", "error"))):
            s = Sample(name, caption, str(self.root / name) if name else None)
            path = self.root / name if name else None
            if error:
                s.error = ("malformed_row", error)
            elif not name:
                s.error = ("missing_file", "no file name")
            elif Path(name).is_absolute() or ".." in Path(name).parts:  # as written: a symlinked sub-folder is fine
                s.error = ("path_outside_root", f"{name} is not under {self.root}")
            elif not path.is_file():
                s.error = ("missing_file", f"{name}: no such file under {self.root}")
            else:
                try:
                    s.data = path.read_bytes()
                    txt = path.with_suffix(".txt")
                    if not sidecar and txt.is_file():
                        s.caption = txt.read_bytes().decode("utf-8", "replace").strip()
                except OSError as e:
                    s.error = ("unreadable_file", str(e)[:200])
            yield s
