"""Bad pipeline configs fail before anything runs, naming the file, stage and field."""

import textwrap

import pytest
from typer.testing import CliRunner

from curation.cli import app
from curation.engine.config import ConfigError, load_pipeline, parse_pipeline
from tests.conftest import ROOT

GOOD = {
    "name": "t",
    "stages": {
        "ingest": {"op": "ingest", "params": {"urls": "u.parquet"}},
        "dedup": {"op": "dedup", "after": ["ingest"]},
        "filter": {"op": "filter", "after": ["dedup"], "params": {"min_size": 10}},
    },
}


def _with(**stage_changes):
    import copy

    raw = copy.deepcopy(GOOD)
    for stage, change in stage_changes.items():
        raw["stages"][stage] = change
    return raw


def test_good_config_orders_stages():
    p = parse_pipeline(_with(), "p.yaml")
    assert p.order == ["ingest", "dedup", "filter"]
    assert p.stages["filter"].params.min_size == 10


@pytest.mark.parametrize(
    "raw, expected",
    [
        (_with(dedup={"op": "dedupe", "after": ["ingest"]}), "p.yaml: stage 'dedup': op: unknown op 'dedupe'"),
        (_with(ingest={"op": "ingest", "after": ["filter"], "params": {"urls": "u"}}), "cycle"),
        (_with(dedup={"op": "dedup", "after": ["ingets"]}), "stage 'dedup': after: depends on 'ingets'"),
        (
            _with(dedup={"op": "dedup", "after": ["ingest"], "params": {"max_distance": "far"}}),
            "p.yaml: stage 'dedup': params.max_distance: Input should be a valid integer",
        ),
        (
            _with(dedup={"op": "dedup", "after": ["ingest"], "params": {"max_dist": 3}}),
            "stage 'dedup': params.max_dist: Extra inputs are not permitted",
        ),
        (_with(ingest={"op": "ingest", "params": {}}), "stage 'ingest': params.urls: Field required"),
        (_with(dedup={"op": "dedup"}), "stage 'dedup': after: op 'dedup' takes 1 input stage(s), got 0"),
        (
            _with(dedup={"op": "dedup", "after": ["ingest"], "resources": {"num_gpu": 1}}),
            "stages.dedup.resources.num_gpu",
        ),
    ],
)
def test_bad_configs_name_stage_and_field(raw, expected):
    with pytest.raises(ConfigError) as e:
        parse_pipeline(raw, "p.yaml")
    assert expected in str(e.value)


def test_overrides_are_validated():
    p = parse_pipeline(_with(), "p.yaml", ["dedup.max_distance=3", "ingest.urls=x.parquet"])
    assert p.stages["dedup"].params.max_distance == 3
    with pytest.raises(ConfigError, match=r"params.max_distance"):
        parse_pipeline(_with(), "p.yaml", ["dedup.max_distance=far"])
    with pytest.raises(ConfigError, match=r"expected STAGE.PARAM"):
        parse_pipeline(_with(), "p.yaml", ["nosuch.x=1"])


def test_cli_fails_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""
        name: bad
        stages:
          ingest: {op: ingest, params: {urls: u.parquet, shard_size: many}}
          dedup: {op: dedup, after: [ingest]}
    """)
    )
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(bad), "--run-dir", str(run_dir)])
    assert res.exit_code == 2
    assert "stage 'ingest': params.shard_size" in res.output
    assert not run_dir.exists()


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"no such pipeline file"):
        load_pipeline(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_pipeline(tmp_path / "x.yaml")


def test_shipped_pipelines_validate():
    from tests.conftest import ROOT

    for path in (ROOT / "curation" / "pipelines").glob("*.yaml"):
        load_pipeline(path)


def _concepts(**changes):
    raw = _with()
    raw["stages"].update(
        {
            "embed": {"op": "embed", "after": ["filter"]},
            "match": {
                "op": "match_concepts",
                "after": ["embed", "filter"],
                "params": {"vocab": "v.parquet", "mode": "hybrid"},
            },
            "balance": {"op": "balance", "after": ["match", "filter"], "params": {"target_size": 10}},
        }
    )
    raw["stages"].update(changes)
    return raw


def test_each_column_an_op_reads_comes_from_the_nearest_stage_that_wrote_it():
    p = parse_pipeline(_concepts(), "p.yaml")
    assert p.order[-3:] == ["embed", "match", "balance"] and p.stages["match"].after == ["embed", "filter"]
    # one copy of each image: the alt-text is read where ingest wrote it, the embeddings where embed did
    lineage = p.stages["match"].lineage
    assert lineage["caption"] == "ingest" and lineage["image_embedding"] == lineage["model"] == "embed"
    assert p.stages["balance"].lineage["concept_ids"] == "match" and p.stages["dedup"].lineage["image"] == "ingest"
    only_embed = _concepts(
        match={"op": "match_concepts", "after": ["embed"], "params": {"vocab": "v", "mode": "hybrid"}}
    )
    assert parse_pipeline(only_embed, "p.yaml").stages["match"].lineage["caption"] == "ingest"  # through embed
    with pytest.raises(
        ConfigError, match=r"stage 'match': after: op 'match_concepts' needs column\(s\) image_embedding, model"
    ):
        parse_pipeline(
            _concepts(match={"op": "match_concepts", "after": ["filter"], "params": {"vocab": "v", "mode": "feature"}}),
            "p.yaml",
        )
    parse_pipeline(
        _concepts(match={"op": "match_concepts", "after": ["filter"], "params": {"vocab": "v", "mode": "substring"}}),
        "p.yaml",
    )
    with pytest.raises(ConfigError, match=r"stage 'balance': after: op 'balance' needs column\(s\) concept_ids, vocab"):
        parse_pipeline(_concepts(balance={"op": "balance", "after": ["filter"], "params": {"t": 5}}), "p.yaml")
    with pytest.raises(ConfigError, match=r"takes 1 to 3 input stage"):
        parse_pipeline(_concepts(balance={"op": "balance", "after": [], "params": {"t": 5}}), "p.yaml")
    with pytest.raises(ConfigError, match=r"params.*exactly one of"):
        parse_pipeline(_concepts(balance={"op": "balance", "after": ["match", "filter"], "params": {}}), "p.yaml")


def test_shipped_pipelines_are_valid():
    for path in ["curation/pipelines/demo.yaml", "curation/pipelines/metaclip.yaml"]:
        p = load_pipeline(ROOT / path)
        order = p.order
        assert order.index("embed") < order.index("match_concepts") < order.index("balance") < order.index("recaption")
        assert {p.stages[s].params.kind for s in order if p.stages[s].op.name == "instruct"} >= {
            "conversation",
            "detail_description",
            "complex_reasoning",
        }
    assert load_pipeline(ROOT / "curation/pipelines/metaclip.yaml").stages["embed"].params.model == "ViT-H-14-quickgelu"
