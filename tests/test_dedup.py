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
    rows = [{"uid": uid, "url": f"http://127.0.0.1/{uid}", "caption": None, "sha256": sha, "width": w, "height": h,
             "original_width": w, "original_height": h, "image": data, "exif": None} for uid, sha, data, w, h in specs]
    return pa.Table.from_pylist(rows, schema=arrow_schema(Image))


def test_largest_image_represents_its_group_and_empty_parts_pass(tmp_path):
    op = Dedup(DedupParams(max_distance=6), "dedup", tmp_path / "_work")
    a, b = _jpeg((20, 120, 60)), _jpeg((200, 30, 90))
    part0 = _rows([("u1", "s1", a, 64, 48), ("u2", "s2", b, 64, 48)])
    part1 = _rows([("u3", "s1", a, 64, 48), ("u4", "s4", a, 640, 480)])  # exact copy of u1; u4 a bigger original
    summaries = [op.analyze(t).append_column("part", pa.array([p] * t.num_rows)) for p, t in (("p0", part0), ("p1", part1))]
    op.aggregate(pa.concat_tables(summaries))
    out0, rej0 = op.process("p0", part0)
    out1, rej1 = op.process("p1", part1)
    assert out0.column("uid").to_pylist() == ["u2"] and out1.column("uid").to_pylist() == ["u4"]
    assert dict(zip(rej0.column("uid").to_pylist(), rej0.column("reason").to_pylist())) == {"u1": "near_duplicate"}
    assert dict(zip(rej1.column("uid").to_pylist(), rej1.column("reason").to_pylist())) == {"u3": "near_duplicate"}
    assert out1.column("dup_count").to_pylist() == [3] and "duplicate of u4" in rej0.column("detail")[0].as_py()
    empty_out, empty_rej = op.process("p2", _rows([]))
    assert empty_out.num_rows == empty_rej.num_rows == 0
