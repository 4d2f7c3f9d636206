"""recaption and instruct on their own: rules offline, and the openai backend against a loopback server with faults."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from curation.fixtures.llm_server import LLMServer
from curation.ops.instruct import Instruct, InstructParams
from curation.ops.recaption import Recaption, RecaptionParams
from schemas import Caption, Instruction, Reject, conform

KEY = "sk-test-SECRET-0123456789"


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (64, 48), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def data(tmp_path):
    urls = [f"http://127.0.0.1:1/img{i}.jpg" for i in range(12)]
    ann = tmp_path / "ann.parquet"
    objs = [
        [
            {"category": "circle", "color": "red", "box": [10, 10, 30, 30]},
            {"category": "star", "color": "blue", "box": [40, 20, 60, 40]},
        ]
        if i % 6
        else []
        for i in range(12)
    ]  # every 6th image has no boxes
    pq.write_table(pa.table({"url": urls, "width": [64] * 12, "height": [48] * 12, "objects": objs}), ann)
    caps = [
        f"a red circle and a blue star on white, photo {i}" if i != 5 else "Ignore me caption: a red circle"
        for i in range(12)
    ]
    table = pa.table(
        {
            "uid": [f"u{i:02d}" for i in range(12)],
            "url": urls,
            "caption": caps,
            "image": pa.array([_jpeg((20 * i, 90, 200)) for i in range(12)], pa.binary()),
        }
    )
    return table, str(ann), tmp_path


def _run(op_cls, params_cls, tmp, table, **params):
    op = op_cls(params_cls(**params), "s", tmp / "_work")
    op.setup()
    out, rej = op.process("part-00000", table)
    assert out.num_rows + rej.num_rows == table.num_rows
    return op, conform(out, op.output, "test"), conform(rej, Reject, "test")


@pytest.mark.parametrize(
    "kind", ["conversation", "detail_description", "complex_reasoning", "short_answer", "multiple_choice"]
)
def test_rules_backend_offline(data, kind):
    table, ann, tmp = data
    op, out, rej = _run(Instruct, InstructParams, tmp, table, backend="rules", kind=kind, annotations=ann)
    assert out.num_rows == 10 and rej.column("reason").to_pylist() == ["no_objects"] * 2
    rows = out.to_pylist()
    assert all(
        r["id"] == f"{r['uid']}-{kind}" and r["model"] == "rules" and r["prompt_version"] == op.prompt.version
        for r in rows
    )
    assert all(sum(t["value"].count("<image>") for t in r["conversations"]) == 1 for r in rows)
    if kind == "short_answer":
        assert "Answer the question using a single word or phrase." in rows[0]["conversations"][0]["value"]


def test_openai_backend_with_faults_reasks_and_caches(data):
    table, ann, tmp = data
    plan = {"Ignore me caption": ["refusal"]}  # the first answer for u05 is a refusal; the re-ask is answered
    faults = {"429": 0.2, "500": 0.1, "timeout": 0.05, "malformed": 0.1, "truncated": 0.05}
    with LLMServer(faults=faults, plan=plan, max_failures=1, stall=1.0, api_key=KEY) as server:
        common = {
            "backend": "openai",
            "kind": "conversation",
            "annotations": ann,
            "base_url": server.url,
            "model": "fake-llm",
            "api_key_env": "TEST_LLM_KEY",
            "timeout": 0.5,
            "max_retries": 3,
            "cache": str(tmp / "llm.sqlite"),
        }
        import os

        os.environ["TEST_LLM_KEY"] = KEY
        op, out, rej = _run(Instruct, InstructParams, tmp, table, **common)
        assert out.num_rows + rej.num_rows == 12
        assert set(rej.column("reason").to_pylist()) <= {"truncated"}  # retries absorb the transient faults
        assert "u05" in out.column("uid").to_pylist()  # re-asked after its refusal
        calls = server.calls
        assert max(server.requests.values()) <= 1 + 3
        _, out2, _rej2 = _run(Instruct, InstructParams, tmp, table, **common)
        assert out2.column("conversations").to_pylist() == out.column("conversations").to_pylist()
        assert server.calls - calls == rej.num_rows  # only the rejected (not cached) requests were sent again
        usage = op.client.usage()
        assert usage["successes"] > 0 and KEY not in repr(usage) and KEY not in repr(op.client.backend)
        server.reset_counts()  # the planned refusal comes again
        _, _, rej3 = _run(
            Instruct,
            InstructParams,
            tmp,
            table.slice(5, 1),
            **{**common, "reask": 0, "cache": str(tmp / "fresh.sqlite")},
        )
        assert rej3.column("reason").to_pylist() == ["refusal"]


def test_recaption_sends_the_image_and_rules_describe_boxes(data):
    table, ann, tmp = data
    with LLMServer() as server:
        _op, out, rej = _run(
            Recaption,
            RecaptionParams,
            tmp,
            table.slice(0, 3),
            backend="openai",
            base_url=server.url,
            model="fake-vlm",
            api_key_env="NO_SUCH_KEY_VAR",
            cache=str(tmp / "r.sqlite"),
        )
        assert server.calls == 3
    conform(out, Caption, "test")
    assert out.num_rows == 3 and set(out.column("recaption_lang").to_pylist()) == {"en"} and rej.num_rows == 0
    _, rules, _rrej = _run(Recaption, RecaptionParams, tmp, table, backend="rules", annotations=ann)
    assert rules.num_rows == 10 and "red circle" in rules.column("recaption")[1].as_py()
    with pytest.raises(ValueError, match="English recaptions only"):
        RecaptionParams(backend="rules", lang="zh")
    with pytest.raises(ValueError, match="comes from the rules backend"):
        InstructParams(backend="openai", kind="short_answer")


def test_instruction_rows_validate(data):
    table, ann, tmp = data
    _, out, _ = _run(Instruct, InstructParams, tmp, table, backend="rules", kind="conversation", annotations=ann)
    conform(out, Instruction, "test")


def test_rules_question_choice_and_no_question_reject(data):
    table, ann, tmp = data
    _, out, rej = _run(
        Instruct,
        InstructParams,
        tmp,
        table,
        backend="rules",
        kind="short_answer",
        annotations=ann,
        max_turns=1,
        ask=["colour"],
    )
    assert out.num_rows == 10 and rej.column("reason").to_pylist() == ["no_objects"] * 2
    assert all(
        len(r["conversations"]) == 2 and "What color is the" in r["conversations"][0]["value"] for r in out.to_pylist()
    )
    _, out, rej = _run(
        Instruct,
        InstructParams,
        tmp,
        table,
        backend="rules",
        kind="short_answer",
        annotations=ann,
        ask=["count_total"],
        max_turns=3,
    )
    assert all(len(r["conversations"]) == 2 for r in out.to_pylist())  # one all-shapes count per image
    twins = tmp / "twins.parquet"  # two red circles: "What color is the circle?" would be ambiguous
    pq.write_table(
        pa.table(
            {
                "url": table["url"],
                "width": [64] * 12,
                "height": [48] * 12,
                "objects": [[{"category": "circle", "color": "red", "box": [x, 10, x + 10, 20]} for x in (5, 40)]] * 12,
            }
        ),
        twins,
    )
    _, out, rej = _run(
        Instruct,
        InstructParams,
        tmp,
        table,
        backend="rules",
        kind="short_answer",
        annotations=str(twins),
        ask=["colour"],
    )
    assert out.num_rows == 0 and set(rej.column("reason").to_pylist()) == {"no_question"}


def test_rules_settings_keep_old_config_hashes_and_need_rules():
    plain = InstructParams(backend="rules", kind="short_answer")
    assert not {"max_turns", "ask", "vllm"} & set(plain.hashed()) and {"max_turns", "ask"} <= set(plain.model_dump())
    assert InstructParams(backend="rules", kind="short_answer", max_turns=2).hashed()["max_turns"] == 2
    with pytest.raises(ValueError, match="rules backend"):
        InstructParams(kind="conversation", ask=["colour"])
    with pytest.raises(ValueError):
        InstructParams(backend="rules", kind="short_answer", ask=["colour", "shape"])


def test_each_part_loads_the_boxes_of_its_own_images(data):
    """A part converts its own rows of the annotations only (each part loading every row made synthesis grow as
    N^2); the vocabulary the rules draw from is the whole file's, whatever the split."""
    from curation.synth.annotations import Annotations

    table, ann, _ = data
    whole = Annotations.load(ann)
    part = Annotations.load(ann, table.column("url").slice(3, 4))
    assert set(part.objects) == set(table.column("url").slice(3, 4).to_pylist())
    assert all(part.objects[u] == whole.objects[u] for u in part.objects)
    assert part.vocab == whole.vocab == {"category": ["circle", "star"], "color": ["blue", "red"]}
