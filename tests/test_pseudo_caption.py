"""Pseudo-captions (issue 16, LLaVA-OneVision-1.5): images whose alt-text is missing or was flagged unusable by
filter get a caption of their top feature-matched concepts, and the stages after (recaption, instruct) use it."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest
from pydantic import ValidationError

from curation.concepts.vocab import make_table, vocab_hash, write_vocab
from curation.engine.config import parse_pipeline
from curation.engine.driver import run_pipeline
from curation.ops.filter import Filter, FilterParams, usable_captions
from curation.ops.pseudo_caption import PseudoCaption, PseudoCaptionParams
from schemas import Filtered, PseudoCaptioned, conform
from tests.conftest import stage_rows

NAMES = ["red circle", "blue square", "green star", "sky"]


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "vocab.parquet"
    write_vocab(make_table(NAMES, "title"), path)
    return path


def _matches(vocab_path, rows) -> pa.Table:
    """Rows as pseudo_caption reads them: (uid, caption, caption_issue, [(id, score, source)...])."""
    from curation.concepts.vocab import read_vocab

    vh = vocab_hash(read_vocab(vocab_path))
    return pa.table(
        {
            "uid": [r[0] for r in rows],
            "url": [f"http://127.0.0.1/{r[0]}.jpg" for r in rows],
            "caption": pa.array([r[1] for r in rows], pa.string()),
            "caption_issue": pa.array([r[2] for r in rows], pa.string()),
            "vocab": [vh] * len(rows),
            "concept_ids": pa.array([[m[0] for m in r[3]] for r in rows], pa.list_(pa.int64())),
            "scores": pa.array([[m[1] for m in r[3]] for r in rows], pa.list_(pa.float32())),
            "source": pa.array([[m[2] for m in r[3]] for r in rows], pa.list_(pa.string())),
        }
    )


def test_alt_text_kept_else_top_concepts_else_a_reject(vocab, tmp_path):
    feats = [(1, 0.4, "feature"), (0, 0.3, "both"), (2, 0.1, "feature"), (3, None, "substring")]
    table = _matches(
        vocab,
        [
            ("a", "a blue square on white", None, feats),  # usable alt-text: kept as it is
            ("b", None, None, feats),  # no alt-text: the feature matches, best first; substring-only left out
            ("c", "click here to download", "caption_boilerplate", feats),  # flagged by filter: replaced
            ("d", "   ", None, [(3, None, "substring")]),  # blank, and no feature match: rejected
        ],
    )
    op = PseudoCaption(PseudoCaptionParams(vocab=str(vocab), k=2), "pseudo_caption", tmp_path / "_work")
    out, rej = op.process("part-00000", table)
    conform(out, PseudoCaptioned, "pseudo_caption")
    got = {r["uid"]: (r["caption"], r["caption_source"]) for r in out.to_pylist()}
    assert got == {
        "a": ("a blue square on white", "alt_text"),
        "b": ("blue square, red circle", "concepts"),
        "c": ("blue square, red circle", "concepts"),
    }
    assert rej.column("uid").to_pylist() == ["d"] and rej.column("reason").to_pylist() == ["no_caption"]
    assert out.num_rows + rej.num_rows == table.num_rows

    strict = PseudoCaption(
        PseudoCaptionParams(vocab=str(vocab), min_score=0.35, template="a picture of {}"), "p", tmp_path / "_w2"
    )
    out, rej = strict.process("part-00000", table)
    assert dict(zip(out["uid"].to_pylist(), out["caption"].to_pylist()))["b"] == "a picture of blue square"
    assert "0.35" in rej.column("detail")[0].as_py()


def test_a_vocabulary_other_than_the_matches_is_an_error(vocab, tmp_path):
    other = tmp_path / "other.parquet"
    write_vocab(make_table(["something else"], "title"), other)
    op = PseudoCaption(PseudoCaptionParams(vocab=str(other)), "pseudo_caption", tmp_path / "_work")
    with pytest.raises(ValueError, match="vocabulary"):
        op.process("part-00000", _matches(vocab, [("a", None, None, [(0, 0.5, "feature")])]))
    with pytest.raises(ValidationError):
        PseudoCaptionParams(vocab=str(vocab), k=0)


def test_filter_flags_caption_failures_and_still_rejects_the_image_rules(tmp_path):
    rows = pa.table(
        {
            "uid": ["ok", "empty", "boiler", "small"],
            "url": ["u1", "u2", "u3", "u4"],
            "caption": [
                "a red circle and a blue square",
                None,
                "click here for a red circle",
                "a red circle and a star",
            ],
            "original_width": [128, 128, 128, 32],
            "original_height": [128, 128, 128, 32],
        }
    )
    flag = Filter(FilterParams(caption_failures="flag"), "filter", tmp_path / "_w")
    out, rej = flag.process("part-00000", rows)
    conform(out, Filtered, "filter")
    assert dict(zip(out["uid"].to_pylist(), out["caption_issue"].to_pylist())) == {
        "ok": None,
        "empty": "caption_missing",
        "boiler": "caption_boilerplate",
    }
    assert rej.column("reason").to_pylist() == ["too_small"]  # not a caption rule: the image goes
    joined = rows.join(out, "uid", join_type="inner").sort_by("uid")
    assert usable_captions(joined) == [None, None, "a red circle and a blue square"]  # boiler, empty, ok
    out, rej = Filter(FilterParams(), "filter", tmp_path / "_w").process("part-00000", rows)  # default: reject
    assert out["uid"].to_pylist() == ["ok"] and out["caption_issue"].null_count == 1
    assert sorted(rej["reason"].to_pylist()) == ["caption_boilerplate", "caption_missing", "too_small"]


def test_in_the_dag_flagged_images_are_embedded_without_text_and_recaptioned_from_concepts(
    ray_session, web, demo_assets, tmp_path
):
    """filter (flag) -> embed -> match_concepts (hybrid) -> pseudo_caption -> recaption (rules) -> instruct (caption
    kind from the alt-text): the images filter would have rejected for their caption reach the instruction data, with
    the pseudo-caption where the caption was; nothing else changes for the others."""
    web_dir, _ = web
    assets = dict(a.split("=", 1) for a in demo_assets)
    clip = {"model": "curation-tiny-clip", "pretrained": assets["embed.pretrained"], "precision": "fp32"}
    synth = {"backend": "rules", "annotations": str(web_dir / "truth.parquet")}
    dag = {
        "name": "pseudo",
        "stages": {
            "ingest": {"op": "ingest", "params": {"urls": str(web_dir / "urls.parquet"), "allow_loopback": True}},
            "filter": {"op": "filter", "after": ["ingest"], "params": {"caption_failures": "flag"}},
            "embed": {"op": "embed", "after": ["filter"], "params": clip},
            "match_concepts": {
                "op": "match_concepts",
                "after": ["embed"],
                "params": {
                    **clip,
                    "mode": "hybrid",
                    "k": 3,
                    "vocab": assets["match_concepts.vocab"],
                    "cache_dir": assets["match_concepts.cache_dir"],
                },
            },
            "pseudo_caption": {
                "op": "pseudo_caption",
                "after": ["match_concepts"],
                "params": {"vocab": assets["match_concepts.vocab"], "k": 3},
            },
            "recaption": {"op": "recaption", "after": ["pseudo_caption"], "params": synth},
            "captions": {
                "op": "instruct",
                "after": ["pseudo_caption"],
                "params": {**synth, "kind": "caption", "caption_source": "alt_text"},
            },
        },
    }
    run = tmp_path / "run"
    manifests = run_pipeline(parse_pipeline(dag, "pseudo"), run)
    for m in manifests.values():
        c = m["counts"]
        assert c["in"] == c["out"] + c["rejected"], m
    filt = stage_rows(run, "filter", also=("caption",))
    flagged = filt.filter(pl.col("caption_issue").is_not_null())
    assert flagged.height >= 5 and flagged.height < filt.height  # the fixture web's noisy alt-texts
    emb = stage_rows(run, "embed", also=()).join(filt.select("uid", "caption_issue"), on="uid")
    assert emb.filter(pl.col("caption_issue").is_not_null())["text_embedding"].null_count() == flagged.height
    pseudo = stage_rows(run, "pseudo_caption", also=())
    by_uid = dict(zip(pseudo["uid"], pseudo["caption_source"]))
    assert all(by_uid[u] == "concepts" for u in flagged["uid"])  # the tiny tower always has top-3 matches
    good = filt.filter(pl.col("caption_issue").is_null()).join(pseudo, on="uid", suffix="_pseudo")
    assert (good["caption"] == good["caption_pseudo"]).all() and (good["caption_source"] == "alt_text").all()
    samples = stage_rows(run, "captions", also=())
    answers = {r["uid"]: r["conversations"][-1]["value"] for r in samples.iter_rows(named=True)}
    made = pseudo.filter(pl.col("caption_source") == "concepts")
    assert all(answers[u] == c for u, c in zip(made["uid"], made["caption"]))  # the pseudo-caption, not the alt-text


def test_the_commented_example_in_metaclip_yaml_is_a_valid_stage():
    import yaml

    from tests.conftest import ROOT

    lines, out, inside = (ROOT / "curation/pipelines/metaclip.yaml").read_text().splitlines(), [], False
    for line in lines:
        inside = line == "  # pseudo_caption:" or (inside and line.startswith("  #   "))
        out.append(line.replace("  # ", "  ", 1) if inside else line)
    raw = yaml.safe_load("\n".join(out))
    raw["stages"]["filter"].setdefault("params", {})["caption_failures"] = "flag"
    raw["stages"]["balance"]["after"] = ["pseudo_caption"]
    p = parse_pipeline(raw, "metaclip.yaml")
    assert p.stages["pseudo_caption"].lineage["concept_ids"] == "match_concepts"
    assert p.stages["pseudo_caption"].lineage["caption_issue"] == "filter"
    assert p.stages["recaption"].lineage["caption"] == "pseudo_caption"  # what recaption reads is the new caption
    assert p.stages["embed"].lineage["caption_issue"] == "filter"  # flagged captions are not embedded
