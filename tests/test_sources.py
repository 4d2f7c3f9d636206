"""Issue 17: the sources users already have (sharded URL lists, WebDataset tars, image Parquet, folders, COCO) read
into the same Image rows, every bad item a reject with a reason, rows in = rows out + rejects."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from curation.fixtures import sources as fx
from curation.ops import OPS
from curation.synth.annotations import Annotations
from schemas import conform


def run_op(tmp: Path, opname: str, **params):
    """Plan and process every part of a source op in this process: (rows, rejects, rows in)."""
    cls = OPS[opname]
    op = cls(cls.Params(**params), opname, tmp / opname / "work")
    parts = op.plan()
    op.setup()
    outs, rejs, n_in = [], [], 0
    for p in parts:
        n_in += op.part_size(p)
        out, rej = op.process(p)
        outs.append(conform(out, cls.output_model(op.params)))
        rejs.append(rej)
    out, rej = pa.concat_tables(outs), pa.concat_tables(rejs)
    assert n_in == out.num_rows + rej.num_rows, f"{opname}: {n_in} in, {out.num_rows} out, {rej.num_rows} rejected"
    assert len(out.column("uid").unique()) == out.num_rows
    return out, rej, n_in


def reasons(rej: pa.Table) -> Counter:
    return Counter(rej.column("reason").to_pylist())


def good_items(web: Path) -> dict[str, bytes]:
    """url -> bytes of the web's files that are whole images (what every source must keep)."""
    truth = {r["url"]: r for r in pq.read_table(web / "truth.parquet").to_pylist()}
    return {it["url"]: it["data"] for it in fx.web_items(web) if truth[it["url"]]["variant"] not in fx.BROKEN_FILES}


# ---- sharded URL lists


def test_a_sharded_list_in_four_formats_plans_the_rows_of_the_single_file(web, tmp_path):
    web_dir, _ = web
    shards = fx.write_url_shards(web_dir, tmp_path / "urls", files=4)
    assert sorted(p.name.split(".", 1)[1] for p in shards) == ["csv", "jsonl", "parquet", "tsv.gz"]
    ingest = OPS["ingest"]

    def planned(**params):
        op = ingest(ingest.Params(**params), "ingest", tmp_path / str(len(params)) / "work")
        return pa.concat_tables([op._plan(p) for p in op.plan()])

    one = planned(urls=str(web_dir / "urls.parquet"))
    many = planned(urls=str(tmp_path / "urls"), metadata={"similarity": "float32", "uid": "string"}, shard_size=17)
    for col in ("uid", "url", "caption", "repeat"):
        assert many.column(col).to_pylist() == one.column(col).to_pylist(), col
    assert many.schema.field("meta_similarity").type == pa.float32()
    want = [fx.similarity(u) for u in one.column("url").to_pylist()]
    assert many.column("meta_similarity").to_pylist() == pytest.approx(want, rel=1e-6)
    assert many.column("meta_uid").to_pylist() == [hashlib.md5(u.encode()).hexdigest() for u in one["url"].to_pylist()]
    # a glob names the same list; a declared column no file has is an error, not a column of nulls
    assert planned(urls=str(tmp_path / "urls" / "part-*"), shard_size=5).column("uid") == one.column("uid")
    with pytest.raises(ValueError, match="similarty"):
        planned(urls=str(tmp_path / "urls"), metadata={"similarty": "float32"})


def test_header_less_tsv_malformed_rows_and_bad_json_lines_are_rejects(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    cc3m = tmp_path / "cc3m.tsv"  # CC3M's TSV: caption, url, no header row
    cc3m.write_text("a dog on grass\thttp://127.0.0.1:1/a.jpg\nNA\thttp://127.0.0.1:1/b.jpg\n")
    (d / "b.csv").write_text("url,caption\nhttp://127.0.0.1:1/c.jpg,ok\nhttp://127.0.0.1:1/d.jpg,one,too many\n")
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"url": "ftp://x/e.jpg", "caption": "e"}\n{not json\n'))
    ingest = OPS["ingest"]
    with pytest.raises(ValueError, match="no column 'url'"):  # a header-less TSV's first row is not a header
        ingest(ingest.Params(urls=str(cc3m)), "ingest", tmp_path / "w0").plan()
    op = ingest(ingest.Params(urls=str(cc3m), column_names=["caption", "url"]), "ingest", tmp_path / "w1")
    rows = op._plan(op.plan()[0])
    assert rows.column("caption").to_pylist() == ["a dog on grass", "NA"]  # "NA" is a caption, not a null
    op = ingest(ingest.Params(urls=str(d), timeout=2), "ingest", tmp_path / "w2")
    op.setup()
    parts = op.plan()
    n_in = sum(op.part_size(p) for p in parts)
    out, rej = (pa.concat_tables(t) for t in zip(*(op.process(p) for p in parts)))
    assert out.num_rows == 0 and n_in == rej.num_rows
    got = dict(zip(rej.column("url").to_pylist(), rej.column("reason").to_pylist()))
    assert got.pop(None) == "malformed_row" and Counter(rej.column("reason").to_pylist())["malformed_row"] == 2
    assert got["ftp://x/e.jpg"] == "unsupported_scheme"
    assert {got["http://127.0.0.1:1/c.jpg"]} <= {"unreachable", "blocked_address", "loopback_refused"} | set(
        got.values()
    )
    details = " ".join(d or "" for d in rej.column("detail").to_pylist())
    assert "expected 2 fields, got 3" in details and "not a JSON object" in details


# ---- sources that need no download


def test_webdataset_tars_with_sidecars_a_truncated_tar_and_a_corrupt_one(web, tmp_path):
    web_dir, _ = web
    tars = fx.write_webdataset(web_dir, tmp_path / "wds", per_tar=25)
    whole = {k for t in tars[:-1] for k in _keys(t)}
    fx.truncate(tars[-1], keep=0.5)
    (tmp_path / "wds" / "zz-garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    fx.write_tar(tmp_path / "wds" / "zz-noimage.tar", [("k1", {"txt": b"a caption without its image"})])
    out, rej, _ = run_op(
        tmp_path, "read_webdataset", tars=str(tmp_path / "wds"), shard_size=30, metadata={"similarity": "float64"}
    )
    r = reasons(rej)
    assert r["corrupt_archive"] >= 2 and r["missing_image"] == 1  # the garbage tar, the samples the cut tar lost
    assert r["truncated_image"] == r["empty_body"] == r["not_an_image"] == 1  # the web's own broken files
    rows = {x["url"]: x for x in out.to_pylist()}
    items = {it["url"]: it for it in fx.web_items(web_dir)}
    for url, x in rows.items():  # url, caption, sha256 and metadata from the sidecars, bytes as they were
        it = items[url]
        assert x["caption"] == it["caption"] and x["image"] == it["data"]
        assert x["sha256"] == hashlib.sha256(it["data"]).hexdigest()
        assert x["meta_similarity"] == pytest.approx(fx.similarity(url))
        assert "#" in x["source"] and x["source"].split("#")[0].endswith(".tar")
    kept = {x["source"].rsplit("#", 1)[1] for x in rows.values()}
    assert whole - kept <= {k for k, v in _keys_with_bad(tars[:-1], web_dir)}  # every whole sample read
    assert len(kept - whole) > 0  # and the truncated tar's samples before the cut


def _keys(tar: Path) -> set[str]:
    from curation.ops.read_webdataset import scan_keys

    return set(scan_keys(tar)[0])


def _keys_with_bad(tars, web_dir):
    """(key, url) of the samples whose image is one of the web's broken files."""
    import tarfile

    broken = {r["url"] for r in pq.read_table(web_dir / "truth.parquet").to_pylist() if r["variant"] in fx.BROKEN_FILES}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    info = json.loads(tf.extractfile(m).read())
                    if info["url"] in broken:
                        yield info["key"], info["url"]


def test_image_parquet_struct_binary_and_img2dataset_status(web, tmp_path):
    web_dir, _ = web
    fx.write_image_parquet(web_dir, tmp_path / "hf", files=2)
    out, rej, _ = run_op(tmp_path, "read_parquet", files=str(tmp_path / "hf"), caption_col="text", shard_size=11)
    good = good_items(web_dir)
    assert {x["url"]: x["image"] for x in out.to_pylist()} == good
    assert reasons(rej) == Counter({"truncated_image": 1, "empty_body": 1, "not_an_image": 1, "too_many_pixels": 1})
    # img2dataset's own Parquet: a jpg column, and its failed rows kept with status and error_message
    jpeg = _jpeg()
    i2d = pa.table(
        {
            "key": ["0", "1"],
            "url": ["http://127.0.0.1:1/ok.jpg", "http://127.0.0.1:1/gone.jpg"],
            "caption": ["ok", "gone"],
            "jpg": [jpeg, None],
            "status": ["success", "failed_to_download"],
            "error_message": [None, "HTTP Error 404: Not Found"],
            "sha256": ["f" * 64, None],
        }
    )
    pq.write_table(i2d, tmp_path / "i2d.parquet")
    out, rej, _ = run_op(tmp_path / "b", "read_parquet", files=str(tmp_path / "i2d.parquet"))
    assert out.column("sha256").to_pylist() == ["f" * 64]  # the hash of the download, as img2dataset took it
    assert rej.column("reason").to_pylist() == ["http_404"]


def _jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_image_folder_with_txt_captions_or_a_sidecar(web, tmp_path):
    web_dir, _ = web
    fx.write_folder(web_dir, tmp_path / "f")
    out, rej, _ = run_op(tmp_path, "read_folder", root=str(tmp_path / "f"))
    items = {it["path"].name: it for it in fx.web_items(web_dir)}
    for x in out.to_pylist():
        it = items[Path(x["url"]).name]
        assert x["url"].split("/")[0] in ("a", "b") and x["image"] == it["data"]
        assert x["caption"] == (it["caption"].strip() if it["caption"] else None)
    assert len(out) == len(good_items(web_dir)) and sum(reasons(rej).values()) == 4
    fx.write_folder(web_dir, tmp_path / "s", sidecar=True)
    csv = tmp_path / "s" / "captions.csv"
    csv.write_text(csv.read_text() + "../../etc/passwd,escape\n")
    out2, rej2, _ = run_op(tmp_path / "b", "read_folder", root=str(tmp_path / "s"), captions=str(csv))
    assert reasons(rej2)["missing_file"] == 1 and reasons(rej2)["path_outside_root"] == 1
    assert sorted(out2.column("uid").to_pylist()) == sorted(out.column("uid").to_pylist())  # same url and caption
    small, _, _ = run_op(tmp_path / "c", "read_folder", root=str(tmp_path / "f"), image_size=32, verify="header")
    for x, y in zip(small.to_pylist(), out.to_pylist(), strict=True):  # resized as ingest resizes, sizes kept
        assert max(x["width"], x["height"]) == 32 and x["image"][:2] == b"\xff\xd8"
        assert (x["original_width"], x["original_height"], x["sha256"]) == (y["width"], y["height"], y["sha256"])


def test_coco_images_captions_boxes_and_its_rejects(web, tmp_path):
    web_dir, _ = web
    paths = fx.write_coco(web_dir, tmp_path / "coco")
    out, rej, n_in = run_op(
        tmp_path,
        "read_coco",
        images=str(paths["images"]),
        captions=[str(paths["captions"])],
        instances=[str(paths["instances"])],
        metadata={"flickr_url": "string"},
    )
    assert reasons(rej) == Counter({"missing_file": 1, "orphan_annotation": 1})
    listed = json.loads(paths["captions"].read_text())["images"]
    assert n_in == len(listed) + 1 and len(out) == len(listed) - 1
    for x in out.to_pylist():
        assert len(x["captions"]) == 3 and x["caption"] == x["captions"][0]
        assert x["url"].startswith("http://images.cocodataset.org/train2017/")
        assert x["meta_flickr_url"].endswith(f"/{x['coco_id']}.jpg")
    # the boxes as the synthesis stages read them: normalised by the image's size, keyed by read_coco's url
    ann = Annotations.load(str(paths["instances"]), out.column("url"))
    truth = {r["url"].rsplit("/", 1)[1]: r for r in pq.read_table(web_dir / "truth.parquet").to_pylist()}
    for x in out.to_pylist():
        src = next(t for t in truth.values() if hashlib.sha256(_file(web_dir, t)).hexdigest() == x["sha256"])
        w, h = src["width"], src["height"]
        want = sorted(
            (o["category"], [o["box"][0] / w, o["box"][1] / h, o["box"][2] / w, o["box"][3] / h])
            for o in src["objects"]
        )
        got = sorted((o["category"], o["box"]) for o in ann.objects[x["url"]])
        assert [c for c, _ in got] == [c for c, _ in want]
        assert [b for _, b in got] == [pytest.approx(b) for _, b in want]
    assert ann.vocab["category"] == sorted(
        {c["name"] for c in json.loads(paths["instances"].read_text())["categories"]}
    )


def _file(web_dir: Path, truth_row: dict) -> bytes:
    p = web_dir / "files" / truth_row["url"].rsplit("/", 1)[1]
    return p.read_bytes() if p.is_file() else b""


# ---- round trip: img2dataset's CLI output read back


@pytest.mark.slow
def test_tars_written_by_img2dataset_cli_give_ingest_s_uids_and_images(web, tmp_path):
    web_dir, _ = web
    common = {"image_size": 256, "resize_mode": "keep_ratio_largest", "encode_quality": 95}
    ingest = OPS["ingest"]
    op = ingest(
        ingest.Params(urls=str(web_dir / "urls.parquet"), allow_loopback=True, timeout=5, **common),
        "ingest",
        tmp_path / "w",
    )
    op.setup()
    ours = pa.concat_tables([op.process(p)[0] for p in op.plan()])
    cli = Path(sys.executable).parent / "img2dataset"
    cmd = [str(cli), "--url_list", str(web_dir / "urls.parquet"), "--input_format", "parquet", "--url_col", "url"]
    cmd += ["--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(tmp_path / "i2d")]
    cmd += ["--image_size", "256", "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True"]
    cmd += ["--encode_quality", "95", "--processes_count", "1", "--thread_count", "8", "--timeout", "5"]
    cmd += ["--number_sample_per_shard", "50", "--enable_wandb", "False", "--disallowed_header_directives", "[]"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    theirs, rej, _ = run_op(tmp_path, "read_webdataset", tars=str(tmp_path / "i2d"))
    flaky = {r["url"] for r in pq.read_table(web_dir / "truth.parquet").to_pylist() if r["variant"] == "flaky"}
    a = {x["uid"]: x for x in ours.to_pylist() if x["url"] not in flaky}
    b = {x["uid"]: x for x in theirs.to_pylist() if x["url"] not in flaky}
    assert len(a) > 90 and a.keys() == b.keys() and rej.num_rows == 0
    for uid in a:
        assert b[uid]["sha256"] == a[uid]["sha256"] and b[uid]["image"] == a[uid]["image"]
        assert (b[uid]["original_width"], b[uid]["original_height"]) == (
            a[uid]["original_width"],
            a[uid]["original_height"],
        )
