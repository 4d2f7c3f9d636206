"""ingest: download the URL list with img2dataset's downloader, one Ray task per shard of URLs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field

from curation.download.reasons import TRANSIENT, download_failure, split_reason
from curation.engine.store import make_rejects
from curation.ops.base import Op, Params, Placement
from schemas import Image, arrow_schema

_SCHEMES = ("http://", "https://")


def _text(col: pa.ChunkedArray) -> pa.Array:
    """A column as strings; bytes that are not UTF-8 (a CSV's or a binary column's) become U+FFFD, which filter
    rejects as caption_encoding (a cast would fail the whole stage on one bad row)."""
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()], pa.string())
    return col.cast(pa.string())


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable row id: blake2b-64 of url and caption."""
    return hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=8).hexdigest()


class IngestParams(Params):
    urls: str = Field(description="URL list: .parquet or .csv with url (and caption) columns")
    url_col: str = "url"
    caption_col: str | None = "caption"
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
    ADDED_LATER: ClassVar[dict] = {"disallowed_header_directives": [], "user_agent_token": None}


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

    def input_fingerprint(self) -> str:
        h = hashlib.sha256()
        with open(self.params.urls, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]

    def _read_urls(self) -> pa.Table:
        p = self.params
        path = Path(p.urls)
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
        if p.url_col not in table.column_names:
            raise ValueError(f"{path}: no column '{p.url_col}' (columns: {table.column_names}); set params.url_col")
        url = _text(table.column(p.url_col))
        cap = (
            _text(table.column(p.caption_col))
            if p.caption_col in table.column_names
            else pa.nulls(len(table), pa.string())
        )
        uids = [make_uid(u, c) for u, c in zip(url.to_pylist(), cap.to_pylist())]
        return pa.table({"uid": uids, "url": url, "caption": cap})

    def plan(self) -> list[str]:
        """Shard the URL list in order into Arrow IPC files (img2dataset's shard format)."""
        table = self._read_urls()
        seen: set[str] = set()
        dup = []
        for u in table.column("uid").to_pylist():
            dup.append(u in seen)
            seen.add(u)
        table = table.append_column("repeat", pa.array(dup))
        size = self.params.shard_size or min(1000, max(100, -(-len(table) // 16)))
        parts = []
        for i, start in enumerate(range(0, max(len(table), 1), size)):
            name = f"part-{i:05d}"
            path = self.work / "plan" / f"{name}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table.slice(start, size))
            parts.append(name)
        return parts

    def part_size(self, part: str) -> int:
        return self._plan(part).num_rows

    def _plan(self, part: str) -> pa.Table:
        with pa.memory_map(str(self.work / "plan" / f"{part}.arrow")) as f:
            return pa.ipc.open_file(f).read_all()

    def process(self, part: str, table=None) -> tuple[pa.Table, pa.Table]:
        return self._download(part, self._plan(part))

    def retry(self, part: str, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
        plan = self._plan(part)
        return self._download(part, plan.filter(pc.is_in(plan.column("uid"), rejects.column("uid"))), "retry")

    def _download(self, part: str, rows: pa.Table, tag: str = "dl") -> tuple[pa.Table, pa.Table]:
        """Refuse bad input rows, download the rest through img2dataset's Downloader, convert to our rows."""
        url = rows.column("url")
        repeat = rows.column("repeat")
        no_url = pc.fill_null(pc.equal(pc.utf8_length(url), 0), True)
        low = pc.utf8_lower(url)  # schemes are case-insensitive (RFC 3986): HTTP://... is fetched
        bad_scheme = pc.invert(
            pc.fill_null(pc.or_(pc.starts_with(low, _SCHEMES[0]), pc.starts_with(low, _SCHEMES[1])), False)
        )
        rejects = [
            make_rejects(
                rows.filter(repeat), self.stage, "duplicate_input_row", "same url and caption as an earlier row"
            ),
            make_rejects(rows.filter(pc.and_(pc.invert(repeat), no_url)), self.stage, "missing_url"),
            make_rejects(
                rows.filter(pc.and_not(pc.and_not(bad_scheme, no_url), repeat)),
                self.stage,
                "unsupported_scheme",
                "only http(s) URLs are downloaded",
            ),
        ]
        todo = rows.filter(pc.invert(pc.or_(repeat, bad_scheme)))
        if todo.num_rows == 0:
            return arrow_schema(Image).empty_table(), pa.concat_tables(rejects)
        got = self.download_shard(todo, self.work / f"{tag}-{part}", self.params)
        ok = got.filter(pc.equal(got.column("status"), "success"))
        failed = got.filter(pc.not_equal(got.column("status"), "success")).to_pylist()
        reasons, details = [], []
        for r in failed:
            msg = r["error_message"] or ""
            reason, detail = download_failure(msg) if r["status"] == "failed_to_download" else _resize_reason(msg)
            reasons.append(reason)
            details.append(detail[:300])
        rejects.append(make_rejects(failed, self.stage, reasons, details))
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
            }
        ).sort_by("uid")
        return images, pa.concat_tables(rejects).sort_by([("reason", "ascending"), ("uid", "ascending")])


def _resize_reason(message: str) -> tuple[str, str]:
    """Reason for a failed_to_resize row: ours ('reason: detail') or img2dataset's own text."""
    reason, detail = split_reason(message)
    if " " in reason or not reason:
        return "decode_error", message
    return reason, detail
