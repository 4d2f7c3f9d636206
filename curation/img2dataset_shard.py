"""Download one shard with img2dataset's own Downloader (in this process), behind the download guard and a checked resizer."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import img2dataset.downloader as i2d
import pyarrow as pa
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import ParquetSampleWriter

from curation.download_guard import GuardPolicy, fetch
from curation.download_reasons import decode_reason, sniff

_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


class GuardedTimeout(float):
    """Downloader.timeout, carrying the guard policy: img2dataset hands it unchanged to download_image."""

    def __new__(cls, seconds: float, policy: GuardPolicy):
        self = super().__new__(cls, seconds)
        self.policy = policy
        return self


def _guarded_download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """img2dataset's download_image with the guard's fetch (checked hops, capped bytes and time) in place of urlopen."""
    policy = getattr(timeout, "policy", None)
    if policy is None:  # someone else's Downloader in this process: img2dataset's own behaviour
        return _unguarded_download_image(row, timeout, user_agent_token, disallowed_header_directives)
    key, url = row
    agent = _USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)" if user_agent_token else "")
    try:
        body, headers = fetch(url, policy, float(timeout), {"User-Agent": agent})
    except Exception as err:  # noqa: BLE001 - every failure is a row (GuardError: 'reason: detail'), as in img2dataset
        return key, None, str(err)
    if disallowed_header_directives and i2d.is_disallowed(headers, user_agent_token, disallowed_header_directives):
        return key, None, "Use of image disallowed by X-Robots-Tag directive"
    return key, io.BytesIO(body), None


# img2dataset looks download_image up in its module at call time; only Downloaders given a GuardedTimeout use the guard
_unguarded_download_image = getattr(i2d.download_image, "unguarded", i2d.download_image)
_guarded_download_image.unguarded = _unguarded_download_image
i2d.download_image = _guarded_download_image


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


def download_shard(rows: pa.Table, out_dir: Path, params) -> pa.Table:
    """Run img2dataset's Downloader over `rows` (url, caption, ...); return its output table (status per row)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    shard = out_dir / "shard.arrow"
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, rows.schema) as w:
        w.write_table(rows)
    p = params
    resizer = CheckedResizer(
        p.max_pixels, image_size=p.image_size, resize_mode=p.resize_mode, resize_only_if_bigger=p.resize_only_if_bigger,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=p.encode_quality,
        encode_format="jpg", skip_reencode=False, disable_all_reencoding=False, min_image_size=0,
        max_image_area=float("inf"), max_aspect_ratio=float("inf"), blurrer=None,
    )
    policy = GuardPolicy(allow_loopback=p.allow_loopback, allow_private=p.allow_private, max_bytes=p.max_bytes,
                         max_redirects=p.max_redirects, max_seconds=p.max_seconds)
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer, thread_count=p.thread_count, save_caption=True,
        extract_exif=True, output_folder=str(out_dir), column_list=rows.column_names, timeout=GuardedTimeout(p.timeout, policy),
        number_sample_per_shard=max(2, rows.num_rows), oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
        encode_format="jpg", retries=p.retries, user_agent_token=None, disallowed_header_directives=None,
    )
    if i2d.download_image is not _guarded_download_image:  # never fall back to an unguarded urlopen
        raise RuntimeError("img2dataset.downloader.download_image was replaced; refusing to download without the guard")
    downloader((0, str(shard)))
    got = pq.read_table(out_dir / "00000.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    return got
