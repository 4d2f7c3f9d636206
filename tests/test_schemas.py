"""The row contract: Arrow schemas derived from the models, validation of stage outputs, JSON Schema export."""

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from curation.cli import app
from schemas import (
    TABLES,
    Image,
    Instruction,
    Reject,
    RowContractError,
    TrainSample,
    TrainSequence,
    arrow_schema,
    conform,
)
from schemas.rows import subset


def _image_row(**kw):
    row = {
        "uid": "a" * 16,
        "url": "http://127.0.0.1/x.jpg",
        "caption": None,
        "sha256": "0" * 64,
        "width": 4,
        "height": 4,
        "original_width": 4,
        "original_height": 4,
        "image": b"\xff\xd8",
        "exif": None,
        "source": None,
    }
    row.update(kw)
    return row


def test_arrow_schema_follows_the_model():
    s = arrow_schema(Image)
    assert s.field("width").type == pa.int32() and not s.field("width").nullable
    assert s.field("caption").nullable and s.field("image").type == pa.binary()
    conv = arrow_schema(Instruction).field("conversations").type
    assert conv.value_type.names == ["from", "value"]  # the alias, LLaVA's key
    for model in TABLES.values():  # every table maps
        assert arrow_schema(model).names == [f.alias or n for n, f in model.model_fields.items()]


def test_trainer_models_come_from_the_contract():
    sample, inst, image = arrow_schema(TrainSample), arrow_schema(Instruction), arrow_schema(Image)
    assert sample.names == ["id", "uid", "conversations", "image"] and "TrainSample" not in TABLES  # a view
    assert all(sample.field(n) == inst.field(n) for n in sample.names[:3])  # Instruction's definitions, shared
    assert sample.field("image") == image.field("image") and "image" not in inst.names  # the image is stored once
    with pytest.raises(TypeError, match=r"no fields \['Instruction.picture'\]"):  # a rename fails at import
        subset("X", "x", {"id": Instruction, "picture": Instruction})
    packed = arrow_schema(TrainSequence)
    assert packed.names == ["seq_id", "sample_ids", "lengths", "input_ids", "labels", "images"]
    items = [packed.field(n).type.value_type for n in packed.names[1:]]
    assert items == [pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.binary()]  # the types packed files had


def test_conform_accepts_valid_and_names_the_problem():
    good = pa.Table.from_pylist([_image_row()])
    assert conform(good, Image).schema.equals(arrow_schema(Image))
    with pytest.raises(RowContractError, match="missing \\['exif'\\]"):
        conform(good.drop_columns(["exif"]), Image)
    with pytest.raises(RowContractError, match="unexpected \\['extra'\\]"):
        conform(good.append_column("extra", pa.array([1])), Image)
    with pytest.raises(RowContractError, match="row 1 field uid"):
        conform(pa.Table.from_pylist([_image_row(), _image_row(uid=None)]), Image, "t")
    with pytest.raises(RowContractError, match="row 0 field width"):
        conform(pa.Table.from_pylist([_image_row(width="wide")]), Image)
    with pytest.raises(RowContractError, match="cannot cast"):  # valid int, but not an int32
        conform(pa.Table.from_pylist([_image_row(width=2**40)]), Image)


def test_reject_requires_reason():
    rows = pa.Table.from_pylist(
        [{"uid": "u", "url": None, "caption": None, "stage": "s", "reason": None, "detail": None}]
    )
    with pytest.raises(RowContractError, match="reason"):
        conform(rows, Reject)


def test_schema_export_writes_json_schema(tmp_path):
    res = CliRunner().invoke(app, ["schema", "export", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in tmp_path.glob("*.schema.json"))
    assert files == sorted(f"{n}.schema.json" for n in TABLES)
    inst = json.loads((tmp_path / "Instruction.schema.json").read_text())
    turn = inst["$defs"]["Turn"]
    assert set(turn["required"]) == {"from", "value"}
    img = json.loads((tmp_path / "Image.schema.json").read_text())
    assert "uid" in img["required"] and img["properties"]["image"]["format"] == "binary"
