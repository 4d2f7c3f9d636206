"""The dedup op on its own: representatives, per-part group files, empty parts."""

import io

import pyarrow as pa
from PIL import Image as PILImage

from curation.ops.dedup import Dedup, DedupParams
from schemas import Image, arrow_schema


def _jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    im = PILImage.new("RGB", size, color)
    im.paste((255 - color[0], 40, 200), (10, 10, 30, 30))
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rows(specs) -> pa.Table:
    rows = [
        {
            "uid": uid,
            "url": f"http://127.0.0.1/{uid}",
            "caption": None,
            "sha256": sha,
            "width": w,
            "height": h,
            "original_width": w,
            "original_height": h,
            "image": data,
            "exif": None,
        }
        for uid, sha, data, w, h in specs
    ]
    return pa.Table.from_pylist(rows, schema=arrow_schema(Image))


def test_largest_image_represents_its_group_and_empty_parts_pass(tmp_path):
    op = Dedup(DedupParams(max_distance=6), "dedup", tmp_path / "_work")
    a, b = _jpeg((20, 120, 60)), _jpeg((200, 30, 90))
    part0 = _rows([("u1", "s1", a, 64, 48), ("u2", "s2", b, 64, 48)])
    part1 = _rows([("u3", "s1", a, 64, 48), ("u4", "s4", a, 640, 480)])  # exact copy of u1; u4 a bigger original
    summaries = [
        op.analyze(t).append_column("part", pa.array([p] * t.num_rows)) for p, t in (("p0", part0), ("p1", part1))
    ]
    op.aggregate(pa.concat_tables(summaries))
    out0, rej0 = op.process("p0", part0)
    out1, rej1 = op.process("p1", part1)
    assert out0.column("uid").to_pylist() == ["u2"] and out1.column("uid").to_pylist() == ["u4"]
    assert dict(zip(rej0.column("uid").to_pylist(), rej0.column("reason").to_pylist())) == {"u1": "near_duplicate"}
    assert dict(zip(rej1.column("uid").to_pylist(), rej1.column("reason").to_pylist())) == {"u3": "near_duplicate"}
    assert out1.column("dup_count").to_pylist() == [3] and "duplicate of u4" in rej0.column("detail")[0].as_py()
    empty_out, empty_rej = op.process("p2", _rows([]))
    assert empty_out.num_rows == empty_rej.num_rows == 0


def _two_tone(bg, fg, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    im = PILImage.new("RGB", size, bg)
    im.paste(fg, (8, 8, 40, 30))
    im.save(buf, "PNG")
    return buf.getvalue()


def test_a_phash_match_of_different_colours_or_plain_images_is_not_a_duplicate(tmp_path):
    """Same luminance layout, other colours: pHash (grey) cannot tell them apart, the colour thumbnail can; plain
    images get exact-duplicate decisions only."""
    op = Dedup(DedupParams(max_distance=6), "dedup", tmp_path / "_work")
    red, green = _two_tone((200, 0, 0), (255, 255, 255)), _two_tone((0, 102, 0), (255, 255, 255))
    grey_a, grey_b = _two_tone((90, 90, 90), (90, 90, 90)), _two_tone((91, 91, 91), (91, 91, 91))
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(red)).resize((128, 96), PILImage.BILINEAR).save(buf, "PNG")
    big_red = buf.getvalue()
    part = _rows(
        [
            ("r", "s1", red, 64, 48),
            ("g", "s2", green, 64, 48),
            ("a", "s3", grey_a, 64, 48),
            ("b", "s4", grey_b, 64, 48),
            ("R", "s5", big_red, 128, 96),
        ]
    )
    summary = op.analyze(part)
    hashes = summary.column("phash").to_pylist()
    assert (hashes[0] ^ hashes[1]).bit_count() <= 6 and (hashes[2] ^ hashes[3]).bit_count() <= 6  # pHash alone: dups
    op.aggregate(summary.append_column("part", pa.array(["p0"] * part.num_rows)))
    out, rej = op.process("p0", part)
    assert sorted(out.column("uid").to_pylist()) == ["R", "a", "b", "g"]  # r is a smaller copy of R, the rest stay
    assert rej.column("uid").to_pylist() == ["r"] and "duplicate of R" in rej.column("detail")[0].as_py()
    off = Dedup(DedupParams(max_distance=6, max_thumb_diff=None, min_detail=0), "dedup", tmp_path / "_off")
    off.aggregate(off.analyze(part).append_column("part", pa.array(["p0"] * part.num_rows)))
    assert off.process("p0", part)[0].num_rows < 4  # pHash alone merges some of them
