"""ingest: download the URL list with img2dataset's downloader, one Ray task per shard of URLs."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from curation.download.guard import tls_context
from curation.download.reasons import TRANSIENT, download_failure, split_reason
from curation.engine.store import atomic_write_json, make_rejects, read_json
from curation.ops.base import Op, Params, Placement
from curation.sources import metadata as meta
from curation.sources.files import TABLE_SUFFIXES, find_files, stat_fingerprint
from curation.sources.tables import INVALID, header, iter_tables
from schemas import Image, Row, arrow_schema

_SCHEMES = ("http://", "https://")


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable row id: blake2b-64 of url and caption."""
    return hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=8).hexdigest()


class IngestParams(Params):
    urls: str | list[str] = Field(
        description="URL list: a file, a folder of files or a glob (Parquet, CSV, TSV, CSV/TSV.GZ, JSONL, JSONL.GZ) "
        "with url (and caption) columns; many files are one list, in path order"
    )
    url_col: str = "url"
    caption_col: str | None = "caption"
    column_names: list[str] | None = Field(
        None, description="the columns of CSV/TSV files without a header row (CC3M's TSV: [caption, url])"
    )
    metadata: dict[str, meta.MetaType] = Field({}, description=meta.METADATA_DOC)
    shard_size: int | None = Field(
        None, ge=1, description="URLs per part; default: n/16 within [100, 1000], so every core stays busy"
    )
    image_size: int = Field(256, ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_quality: int = Field(95, ge=1, le=100)
    thread_count: int = Field(64, ge=1)
    timeout: float = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0, description="img2dataset's immediate retries per URL")
    max_pixels: int = Field(
        89_478_485, ge=1, description="refuse images whose header claims more pixels (decompression bombs)"
    )
    # download safety (curation.download.guard): every request and redirect hop is checked before it connects
    allow_loopback: bool = Field(
        False, description="allow 127.0.0.0/8 and ::1 (tests and the demo's loopback web only)"
    )
    allow_private: bool = Field(
        False,
        description="allow 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7; link-local "
        "and metadata addresses (169.254.169.254) are always refused",
    )
    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="stop reading an image's body past this many bytes")
    max_redirects: int = Field(5, ge=0, description="redirect hops followed per image")
    max_seconds: float = Field(30, gt=0, description="total time per image, all hops and the body included")
    ca_bundle: str | None = Field(
        None,
        description="a PEM file of CAs trusted for HTTPS besides the system's (an internal CA); certificates and "
        "host names are always checked: a failure is the reject tls_error",
    )
    # opt-outs: img2dataset's own X-Robots-Tag check, with its CLI's default directives
    disallowed_header_directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="refuse an image whose X-Robots-Tag header has one of these directives (reject reason "
        "robots_disallowed); [] turns the check off",
    )
    user_agent_token: str | None = Field(
        None,
        pattern=r"^[\w.-]+$",
        description="token added to the User-Agent; X-Robots-Tag directives scoped to it ('token: noai') are "
        "honoured too, those scoped to another agent never are",
    )

    # at these values the fields give the behaviour from before they existed (no opt-out check)
    ADDED_LATER: ClassVar[dict] = {
        "disallowed_header_directives": [],
        "user_agent_token": None,
        "column_names": None,
        "metadata": {},
        "ca_bundle": None,
    }

    _metadata = field_validator("metadata")(meta.check)

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                tls_context(str(Path(v).resolve()))
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"ca_bundle {v}: not a readable PEM file of certificates ({e})") from None
            return str(Path(v).resolve())
        return v


class Ingest(Op):
    """Source stage: URL list -> Image rows; failures become rejects with a reason code."""

    name = "ingest"
    version = "1"
    Params = IngestParams
    output = Image
    retryable = TRANSIENT

    def placement(self) -> Placement:
        return Placement(actor=True)  # queued parts per actor hide Ray Data's dispatch gap between tasks

    def setup(self) -> None:
        from curation.download import shard  # cv2 and albumentations: a second to import, once per worker

        shard.check_img2dataset()  # the guarded download stands in for one img2dataset version's download_image
        self.download_shard = shard.download_shard

    def report(self) -> dict | None:
        """Whether X-Robots-Tag opt-outs were honoured, and which."""
        p = self.params
        if not p.disallowed_header_directives:
            return {"opt_outs": "off"}
        return {"opt_outs": {"honoured": p.disallowed_header_directives, "user_agent_token": p.user_agent_token}}

    @classmethod
    def output_model(cls, params: IngestParams) -> type[Row]:
        return meta.with_metadata(Image, params.metadata)

    def _files(self) -> list[Path]:
        return find_files(self.params.urls, TABLE_SUFFIXES, "URL list")

    def input_fingerprint(self) -> str:
        """A single file: its bytes' hash (as before sharded lists); several: their names, sizes and times."""
        files = self._files()
        if len(files) > 1:
            return stat_fingerprint(files)
        h = hashlib.sha256()
        with open(files[0], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]

    def plan(self) -> list[str]:
        """Stream every file of the list, in order, into one Arrow IPC file of uid, url, caption and metadata (a
        batch at a time: the driver holds 8 bytes per row, for the repeated-row check); parts are row ranges of it."""
        p = self.params
        files = self._files()
        wanted = pa.schema(
            [(p.url_col, pa.string()), *([(p.caption_col, pa.string())] if p.caption_col else [])]
            + [f for f in meta.schema(p.metadata) if f.name not in (p.url_col, p.caption_col)]
        )
        out = arrow_schema(self.output_model(p))
        schema = pa.schema(
            [("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()), (INVALID, pa.string())]
            + [out.field(meta.column(k)) for k in p.metadata]
        )
        keys, valid, seen_meta = [], [], set()
        (self.work / "plan").mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(self.work / "plan" / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for f in files:
                names = header(f, p.column_names)
                if p.url_col not in names:
                    raise ValueError(f"{f}: no column '{p.url_col}' (columns: {names}); set params.url_col")
                seen_meta |= set(names) & set(p.metadata)
                for t in iter_tables(f, wanted, p.column_names):
                    url = t.column(p.url_col)
                    cap = t.column(p.caption_col) if p.caption_col else pa.nulls(len(t), pa.string())
                    bad = t.column(INVALID)
                    uids = [
                        make_uid(u, c) if b is None else None
                        for u, c, b in zip(url.to_pylist(), cap.to_pylist(), bad.to_pylist())
                    ]
                    keys.append(np.array([int(u, 16) if u else 0 for u in uids], np.uint64))
                    valid.append(pc.is_null(bad).to_numpy(zero_copy_only=False))
                    cols = {"uid": uids, "url": url, "caption": cap, INVALID: bad, **meta.rename(t, p.metadata)}
                    w.write_table(pa.table(cols, schema))
        if missing := sorted(set(p.metadata) - seen_meta):
            raise ValueError(f"metadata {missing}: no such column in any file of {p.urls}")
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        valid_all = np.concatenate(valid) if valid else np.zeros(0, bool)
        at = np.flatnonzero(valid_all)
        _, first = np.unique(keys_all[at], return_index=True)
        repeat = np.ones(len(at), bool)
        repeat[first] = False
        np.save(self.work / "plan" / "repeats.npy", at[repeat].astype(np.int64))
        n = len(keys_all)
        size = p.shard_size or min(1000, max(100, -(-n // 16)))
        ranges = {f"part-{i:05d}": [start, min(start + size, n)] for i, start in enumerate(range(0, max(n, 1), size))}
        atomic_write_json(self.work / "plan" / "parts.json", ranges)
        return list(ranges)

    def part_size(self, part: str) -> int:
        return self._plan(part).num_rows

    def _plan(self, part: str) -> pa.Table:
        """A part's rows of the plan, with `repeat` (same uid as an earlier row of the whole list)."""
        ranges = read_json(self.work / "plan" / "parts.json")
        if ranges is None:  # planned before sharded lists: one file per part, repeat included
            with pa.memory_map(str(self.work / "plan" / f"{part}.arrow")) as f:
                return pa.ipc.open_file(f).read_all()
        start, stop = ranges[part]
        with pa.memory_map(str(self.work / "plan" / "rows.arrow")) as f:
            rows = pa.ipc.open_file(f).read_all().slice(start, stop - start)
        repeats = np.load(self.work / "plan" / "repeats.npy")
        here = repeats[(repeats >= start) & (repeats < stop)] - start
        flag = np.zeros(stop - start, bool)
        flag[here] = True
        return rows.append_column("repeat", pa.array(flag))

    def process(self, part: str, table=None) -> tuple[pa.Table, pa.Table]:
        return self._download(part, self._plan(part))

    def retry(self, part: str, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
        plan = self._plan(part)
        return self._download(part, plan.filter(pc.is_in(plan.column("uid"), rejects.column("uid"))), "retry")

    def _download(self, part: str, rows: pa.Table, tag: str = "dl") -> tuple[pa.Table, pa.Table]:
        """Refuse bad input rows, download the rest through img2dataset's Downloader, convert to our rows."""
        url = rows.column("url")
        repeat = rows.column("repeat")
        invalid = pc.is_valid(rows.column(INVALID)) if INVALID in rows.column_names else pa.repeat(False, len(rows))
        no_url = pc.fill_null(pc.equal(pc.utf8_length(url), 0), True)
        low = pc.utf8_lower(url)  # schemes are case-insensitive (RFC 3986): HTTP://... is fetched
        bad_scheme = pc.invert(
            pc.fill_null(pc.or_(pc.starts_with(low, _SCHEMES[0]), pc.starts_with(low, _SCHEMES[1])), False)
        )
        fresh = pc.invert(pc.or_(repeat, invalid))
        malformed = rows.filter(invalid)
        rejects = [
            make_rejects(malformed, self.stage, "malformed_row", malformed.column(INVALID).to_pylist()),
            make_rejects(
                rows.filter(repeat), self.stage, "duplicate_input_row", "same url and caption as an earlier row"
            ),
            make_rejects(rows.filter(pc.and_(fresh, no_url)), self.stage, "missing_url"),
            make_rejects(
                rows.filter(pc.and_(fresh, pc.and_not(bad_scheme, no_url))),
                self.stage,
                "unsupported_scheme",
                "only http(s) URLs are downloaded",
            ),
        ]
        todo = rows.filter(pc.and_not(fresh, bad_scheme))
        schema = arrow_schema(self.output_model(self.params))
        if todo.num_rows == 0:
            return schema.empty_table(), pa.concat_tables(rejects)
        got = self.download_shard(todo.select(["uid", "url", "caption"]), self.work / f"{tag}-{part}", self.params)
        ok = got.filter(pc.equal(got.column("status"), "success"))
        failed = got.filter(pc.not_equal(got.column("status"), "success")).to_pylist()
        reasons, details = [], []
        for r in failed:
            msg = r["error_message"] or ""
            reason, detail = download_failure(msg) if r["status"] == "failed_to_download" else _resize_reason(msg)
            reasons.append(reason)
            details.append(detail[:300])
        rejects.append(make_rejects(failed, self.stage, reasons, details))
        at = pc.index_in(ok.column("uid"), value_set=todo.column("uid"))  # the list's metadata of each image
        images = pa.table(
            {
                "uid": ok.column("uid"),
                "url": ok.column("url"),
                "caption": ok.column("caption"),
                "sha256": ok.column("sha256"),
                "width": ok.column("width"),
                "height": ok.column("height"),
                "original_width": ok.column("original_width"),
                "original_height": ok.column("original_height"),
                "image": ok.column("jpg"),
                "exif": ok.column("exif"),
                "source": pa.nulls(ok.num_rows, pa.string()),
                **{c: todo.column(c).take(at) for c in schema.names if c.startswith(meta.PREFIX)},
            }
        ).sort_by("uid")
        return images, pa.concat_tables(rejects).sort_by([("reason", "ascending"), ("uid", "ascending")])


def _resize_reason(message: str) -> tuple[str, str]:
    """Reason for a failed_to_resize row: ours ('reason: detail') or img2dataset's own text."""
    reason, detail = split_reason(message)
    if " " in reason or not reason:
        return "decode_error", message
    return reason, detail
