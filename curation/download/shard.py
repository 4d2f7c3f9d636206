"""Download one shard with img2dataset's own Downloader (in this process), behind the download guard and a checked
resizer."""

from __future__ import annotations

import inspect
import io
import shutil
import types
from email.message import Message
from functools import partial
from importlib.metadata import version
from pathlib import Path

import img2dataset.downloader as i2d
import pyarrow as pa
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import ParquetSampleWriter

from curation.download.guard import GuardPolicy, fetch
from curation.download.reasons import decode_reason, sniff

SUPPORTED_IMG2DATASET = "1.47.0"
_WRAPPED = ("row", "timeout", "user_agent_token", "disallowed_header_directives")  # 1.47.0's download_image
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


def check_img2dataset() -> None:
    """Refuse an img2dataset whose download_image is not the one _guarded_download_image stands in for."""
    found = inspect.signature(i2d.download_image)
    if tuple(found.parameters) != _WRAPPED:
        raise RuntimeError(
            f"img2dataset {version('img2dataset')} is installed, whose download_image{found} is not "
            f"download_image({', '.join(_WRAPPED)}): the download guard supports img2dataset "
            f"{SUPPORTED_IMG2DATASET} only (pip install img2dataset=={SUPPORTED_IMG2DATASET})"
        )


def _refusing(headers, user_agent_token, directives) -> list[str]:
    """The X-Robots-Tag values that refuse the image, each judged alone by img2dataset's is_disallowed."""
    out = []
    for value in headers.get_all("X-Robots-Tag", []):
        one = Message()
        one["X-Robots-Tag"] = value
        if i2d.is_disallowed(one, user_agent_token, directives):
            out.append(value)
    return out


def _guarded_download_image(row, timeout, user_agent_token, disallowed_header_directives, *, policy: GuardPolicy):
    """img2dataset's download_image with the guard's fetch (checked hops, capped bytes and time) in place of urlopen."""
    key, url = row
    agent = _USER_AGENT + (
        f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)" if user_agent_token else ""
    )
    try:
        body, headers = fetch(url, policy, float(timeout), {"User-Agent": agent})
    except Exception as err:
        return key, None, str(err)
    if disallowed_header_directives and i2d.is_disallowed(headers, user_agent_token, disallowed_header_directives):
        # 'reason: detail', so that a server's header text can never pass for another reason's message
        which = "; ".join(_refusing(headers, user_agent_token, disallowed_header_directives))[:200]
        refused = ", ".join(sorted(disallowed_header_directives))
        return key, None, f"robots_disallowed: X-Robots-Tag: {which} (refused directives: {refused})"
    return key, io.BytesIO(body), None


def _rebind(fn: types.FunctionType, namespace: dict) -> types.FunctionType:
    """A copy of `fn` that looks its global names up in `namespace` instead of its module."""
    return types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)


# Downloader.download_shard reaches download_image through img2dataset's module globals (download_image_with_retry
# looks it up at call time). Our Downloader runs copies of both bound to a copy of those globals holding the guarded
# download_image: no process-wide patch, so another Downloader in this process keeps urlopen and ours never gets it.
_RETRY, _DOWNLOAD_SHARD = i2d.download_image_with_retry, Downloader.download_shard  # img2dataset's, as imported


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with every request through the guard, img2dataset's module left untouched."""

    def __init__(self, policy: GuardPolicy, **kwargs):
        super().__init__(**kwargs)
        namespace = dict(vars(i2d), download_image=partial(_guarded_download_image, policy=policy))
        namespace["download_image_with_retry"] = _rebind(_RETRY, namespace)
        self._download_shard = _rebind(_DOWNLOAD_SHARD, namespace)

    def download_shard(self, row):
        return self._download_shard(self, row)


class CheckedResizer(Resizer):
    """img2dataset's resizer behind a header sniff, with specific reasons for what fails to decode."""

    def __init__(self, max_pixels: int, **kwargs):
        super().__init__(**kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.getvalue()
        refused = sniff(data, self.max_pixels)
        if refused:
            return None, None, None, None, None, ": ".join(refused)
        out = super().__call__(img_stream, blurring_bbox_list)
        if out[-1] == "Image decoding error":
            return (*out[:-1], ": ".join(decode_reason(data)))
        return out


def make_resizer(p) -> CheckedResizer:
    """img2dataset's resizer with ingest's settings (`p`: image_size, resize_mode, resize_only_if_bigger,
    encode_quality, max_pixels), JPEG out; shared by ingest and the read_* sources that resize."""
    return CheckedResizer(
        p.max_pixels,
        image_size=p.image_size,
        resize_mode=p.resize_mode,
        resize_only_if_bigger=p.resize_only_if_bigger,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_quality=p.encode_quality,
        encode_format="jpg",
        skip_reencode=False,
        disable_all_reencoding=False,
        min_image_size=0,
        max_image_area=float("inf"),
        max_aspect_ratio=float("inf"),
        blurrer=None,
    )


def _recording(errors: list[OSError]) -> type[ParquetSampleWriter]:
    """img2dataset's Parquet writer that notes its write errors: img2dataset catches them per sample and goes on,
    so a full disk would show as rows missing from the shard instead of a failure."""

    class Recording(ParquetSampleWriter):
        def write(self, *args, **kwargs):
            try:
                return super().write(*args, **kwargs)
            except OSError as e:
                errors.append(e)
                raise

        def close(self):
            try:
                return super().close()
            except OSError as e:
                errors.append(e)
                raise

    return Recording


def download_shard(rows: pa.Table, out_dir: Path, params) -> pa.Table:
    """Run img2dataset's Downloader over `rows` (url, caption, ...); return its output table (status per row)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    shard = out_dir / "shard.arrow"
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, rows.schema) as w:
        w.write_table(rows)
    p = params
    resizer = make_resizer(p)
    policy = GuardPolicy(
        allow_loopback=p.allow_loopback,
        allow_private=p.allow_private,
        max_bytes=p.max_bytes,
        max_redirects=p.max_redirects,
        max_seconds=p.max_seconds,
        ca_bundle=p.ca_bundle,
    )
    downloader = GuardedDownloader(
        policy,
        sample_writer_class=_recording(write_errors := []),
        resizer=resizer,
        thread_count=p.thread_count,
        save_caption=True,
        extract_exif=True,
        output_folder=str(out_dir),
        column_list=rows.column_names,
        timeout=p.timeout,
        number_sample_per_shard=max(2, rows.num_rows),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=p.retries,
        user_agent_token=p.user_agent_token,
        disallowed_header_directives=p.disallowed_header_directives,  # [] (or None): no X-Robots-Tag check
    )
    try:
        downloader.download_shard((0, str(shard)))  # not downloader(...): that prints a failure and goes on
    except Exception:
        if not write_errors:
            raise
    if write_errors:  # a full disk, an unwritable dir: the first error (later writes fail on the closed file) stops
        # the run as a storage error (exit 2, the path named)
        err = write_errors[0]
        if err.filename is None:
            err.filename = str(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)  # what it wrote would keep a full disk full
        raise err
    got = pq.read_table(out_dir / "00000.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    return got
