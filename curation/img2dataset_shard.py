"""Download one shard with img2dataset's own Downloader (in this process), behind a checked resizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import ParquetSampleWriter

from curation.download_reasons import decode_reason, sniff


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
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer, thread_count=p.thread_count, save_caption=True,
        extract_exif=True, output_folder=str(out_dir), column_list=rows.column_names, timeout=p.timeout,
        number_sample_per_shard=max(2, rows.num_rows), oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
        encode_format="jpg", retries=p.retries, user_agent_token=None, disallowed_header_directives=None,
    )
    downloader((0, str(shard)))
    got = pq.read_table(out_dir / "00000.parquet")
    shutil.rmtree(out_dir, ignore_errors=True)
    return got
