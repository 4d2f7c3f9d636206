"""read_webdataset: WebDataset tars (img2dataset's output: key.jpg, key.txt, key.json) as Image rows, no download.

Samples are read with the `webdataset` library's tar iterator and key grouping. The plan lists each tar's keys
from its headers; a tar cut short yields its whole samples and a `corrupt_archive` reject for each key it lost."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curation.ops.local_source import LocalSource, LocalSourceParams, Sample
from curation.sources.files import find_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SCAN_ERROR = "\x00scan"  # plan row of a tar whose headers could not be read to the end
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips


class ReadWebDatasetParams(LocalSourceParams):
    tars: str | list[str] = Field(description="tar files, folders of them or globs (.tar, .tar.gz, .tgz)")
    caption_field: str = Field(
        "txt", description="the member holding the caption (key.txt); else the json sidecar's 'caption'"
    )


class ReadWebDataset(LocalSource):
    """Image rows from WebDataset tars: url, sha256, original sizes and exif from the json sidecar where present."""

    name = "read_webdataset"
    version = "1"
    Params = ReadWebDatasetParams
    plan_schema = pa.schema([("tar", pa.string()), ("key", pa.string()), ("error", pa.string())])

    def inputs(self) -> list[Path]:
        return find_files(self.params.tars, TAR_SUFFIXES, "tar")

    def list_samples(self) -> Iterator[pa.Table]:
        for tar in self.inputs():
            keys, error = scan_keys(tar)
            rows = {"tar": [str(tar)] * len(keys), "key": keys, "error": [None] * len(keys)}
            if error:  # the archive itself is a reject (its unread samples are not known)
                rows = {k: v + [x] for (k, v), x in zip(rows.items(), (str(tar), SCAN_ERROR, error))}
            yield pa.table(rows, self.plan_schema)

    def read(self, plan: pa.Table) -> Iterator[Sample]:
        for tar in plan.column("tar").unique().to_pylist():
            rows = plan.filter(pc.equal(plan.column("tar"), tar))
            yield from self._read_tar(Path(tar), rows.column("key").to_pylist(), rows.column("error").to_pylist())

    def _read_tar(self, tar: Path, keys: list[str], errors: list[str | None]) -> Iterator[Sample]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator  # not in every worker venv (vllm's)

        wanted = dict.fromkeys(k for k in keys if k != SCAN_ERROR)
        failure: list[str] = []

        def stop(exn: Exception) -> bool:
            failure.append(f"{type(exn).__name__}: {exn}"[:200])
            return False  # a broken stream cannot be resumed: keep what was read

        try:
            with open(tar, "rb") as f:
                files = ({**s, "__url__": str(tar)} for s in tar_file_iterator(f, handler=stop))
                for sample in group_by_keys(files, handler=stop):
                    key = sample["__key__"]
                    if key in wanted:
                        wanted.pop(key)
                        yield self._sample(tar, key, sample)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # not a tar at all: no header to stream
            stop(e)
        lost = f"archive unreadable after the samples read: {failure[0]}" if failure else "not found in the archive"
        for key in wanted:
            yield Sample(
                f"{tar.name}#{key}",
                source=f"{tar}#{key}",
                error=("corrupt_archive" if failure else "missing_member", lost),
            )
        for key, error in zip(keys, errors):
            if key == SCAN_ERROR:
                yield Sample(None, source=str(tar), error=("corrupt_archive", error))

    def _sample(self, tar: Path, key: str, sample: dict) -> Sample:
        info: dict = {}
        if "json" in sample:
            try:
                info = json.loads(sample["json"])
            except ValueError:
                info = {}
            info = info if isinstance(info, dict) else {}
        text = sample.get(self.params.caption_field)
        # img2dataset writes an empty key.txt for a missing caption (null in its json): an empty one is no caption
        caption = text.decode("utf-8", "replace") if text else info.get("caption")
        url = info.get("url") if isinstance(info.get("url"), str) and info.get("url") else f"{tar.name}#{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        known = {k: info[k] for k in ("sha256", "original_width", "original_height", "exif") if info.get(k) is not None}
        s = Sample(url, caption, f"{tar}#{key}", meta={k: info.get(k) for k in self.params.metadata}, known=known)
        if ext is None:
            s.error = (
                "missing_image",
                f"no image member ({', '.join(IMAGE_EXTENSIONS)}); has {sorted(k for k in sample if k[:2] != '__')}",
            )
        else:
            s.data = sample[ext]
        return s


def scan_keys(tar: Path) -> tuple[list[str], str | None]:
    """The sample keys of a tar in order, from its headers (webdataset's key rule), and the error that stopped the
    scan (a truncated or corrupt archive), if any."""
    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    seen: set[str] = set()
    try:
        with tarfile.open(tar, "r:*") as tf:
            for m in tf:
                if not m.isreg() or _META.match(m.name):
                    continue
                key, _ = base_plus_ext(m.name)
                if key is not None and key not in seen:
                    seen.add(key)
                    keys.append(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        return keys, f"{type(e).__name__}: {e}"[:200]
    return keys, None
