"""The CLIP score filter (issue 16, DataComp): absolute threshold, an exact top fraction over the whole input on any
partitioning, ties by uid, rows without a caption, one model per input; and the stage through the real engine."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curation.engine.config import ConfigError, parse_pipeline
from curation.engine.store import StageDir, atomic_write_json, empty_rejects
from curation.ops.clip_score import ClipScore, ClipScoreParams, cosines
from schemas import ClipScored, Embedding, arrow_schema, conform
from tests.conftest import ROOT, stage_rows

D = 16
MODEL = "ViT-B-32/abc123@fp32"


def _pairs(scores, seed=0, shared=True, dim=D) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text vectors whose cosine is each of `scores` (None: a row without a caption, its vectors
    unused). `shared`: every row in the same plane, so that equal scores are equal vectors (exact ties); else random
    directions per row."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    u = rng.standard_normal((1 if shared else n, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.standard_normal(u.shape)
    v -= (v * u).sum(1, keepdims=True) * u  # orthogonal to u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    s = np.array([0.0 if x is None else x for x in scores])[:, None]
    t = s * u + np.sqrt(1 - s**2) * v
    return np.broadcast_to(u, t.shape).astype(np.float32), t.astype(np.float32)


def _table(scores, uids=None, seed=0, model=MODEL, captions=None) -> pa.Table:
    """Rows as the stage reads them: uid, url, caption (ingest's) and embed's model and embeddings."""
    n = len(scores)
    uids = uids or [f"u{i:04d}" for i in range(n)]
    img, txt = _pairs(scores, seed)
    has = [s is not None for s in scores]
    captions = captions or [f"caption {u}" if h else None for u, h in zip(uids, has)]
    return pa.table(
        {
            "uid": uids,
            "url": [f"http://127.0.0.1/{u}.jpg" for u in uids],
            "caption": pa.array(captions, pa.string()),
            "model": [model] * n,
            "image_embedding": pa.array(list(img), pa.list_(pa.float32())),
            "text_embedding": pa.array([list(t) if h else None for t, h in zip(txt, has)], pa.list_(pa.float32())),
        }
    )


def _split(table: pa.Table, cuts: list[int]) -> list[tuple[str, pa.Table]]:
    bounds = [0, *cuts, table.num_rows]
    return [(f"part-{i:05d}", table.slice(a, b - a)) for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def _decide(tmp_path, parts, **params) -> tuple[ClipScore, pa.Table, pa.Table]:
    """The op as the engine runs it: analyze per part (summary files), the global step on the files, process per
    part; every part keeps rows in = rows out + rows rejected, and its output conforms to ClipScored."""
    op = ClipScore(ClipScoreParams(**params), "clip_score", tmp_path / "_work")
    folder = tmp_path / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    for p, t in parts:
        pq.write_table(op.analyze(t), folder / f"{p}.parquet")
    op.aggregate_files({p: folder / f"{p}.parquet" for p, _ in parts})
    outs, rejs = [], []
    for p, t in parts:
        out, rej = op.process(p, t)
        assert out.num_rows + rej.num_rows == t.num_rows, p
        assert sorted(out.column("uid").to_pylist() + rej.column("uid").to_pylist()) == sorted(
            t.column("uid").to_pylist()
        )
        outs.append(conform(out, ClipScored, p))
        rejs.append(rej)
    return op, pa.concat_tables(outs), pa.concat_tables(rejs)


def _details(rej: pa.Table) -> dict[str, tuple[str, str]]:
    return {u: (r, d) for u, r, d in zip(*(rej.column(c).to_pylist() for c in ("uid", "reason", "detail")))}


def test_params_need_exactly_one_threshold():
    for bad in ({}, {"min_score": 0.2, "top_fraction": 0.3}):
        with pytest.raises(ValidationError, match="exactly one of min_score, top_fraction"):
            ClipScoreParams(**bad)
    for bad in ({"top_fraction": 0}, {"top_fraction": 1.5}, {"min_score": 1.5}, {"other": 1, "min_score": 0.1}):
        with pytest.raises(ValidationError):
            ClipScoreParams(**bad)
    assert ClipScoreParams(top_fraction=1).top_fraction == 1 and ClipScoreParams(min_score=-0.1).min_score == -0.1


def test_cosine_of_the_planted_pairs():
    want = [0.9, 0.31, 0.0, -0.2, 0.25]
    img, txt = _pairs(want, seed=3, shared=False)
    got = cosines(pa.array(list(img), pa.list_(pa.float32())), pa.array(list(txt * 3), pa.list_(pa.float32())))
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)  # a cosine: the text's length is ignored
    with pytest.raises(ValueError, match="16 dimensions and text embeddings 8"):
        cosines(pa.array(list(img), pa.list_(pa.float32())), pa.array(list(txt[:, :8]), pa.list_(pa.float32())))


def test_min_score_keeps_rows_at_or_over_it(tmp_path):
    scores = [0.05, 0.31, 0.19, 0.2004, 0.45, 0.1, 0.28, 0.19996]
    table = _table(scores)
    op, out, rej = _decide(tmp_path, _split(table, [3, 5]), min_score=0.2)
    kept = dict(zip(out.column("uid").to_pylist(), out.column("clip_score").to_pylist()))
    assert sorted(kept) == ["u0001", "u0003", "u0004", "u0006"]
    assert out.schema == arrow_schema(ClipScored) and out.column_names == ["uid", "clip_score"]
    for u, s in kept.items():
        assert s == pytest.approx(scores[int(u[1:])], abs=1e-6)
    d = _details(rej)
    assert d["u0000"] == ("low_clip_score", "clip score 0.0500 < 0.2000 (min_score)")
    assert d["u0007"] == ("low_clip_score", "clip score 0.19996 < 0.20000 (min_score)")  # not "0.2000 < 0.2000"
    assert rej.column("url").to_pylist()[0].startswith("http://127.0.0.1/") and rej.column("stage")[0].as_py() == (
        "clip_score"
    )
    rep = op.report()
    assert rep["mode"] == "min_score" and rep["kept"] == 4 and rep["scored"] == 8 and rep["model"] == MODEL


def _ranked(table: pa.Table, fraction: float) -> list[str]:
    """Brute force on the whole table: the scored rows by (score descending, uid ascending), the first
    round(fraction * scored)."""
    scored = table.filter(pc.is_valid(table.column("text_embedding")))
    s = cosines(scored.column("image_embedding").combine_chunks(), scored.column("text_embedding").combine_chunks())
    uids = scored.column("uid").to_pylist()
    order = sorted(range(len(uids)), key=lambda j: (-s[j], uids[j]))
    return sorted(uids[j] for j in order[: round(fraction * len(uids))])


def test_top_fraction_keeps_an_exact_count_on_any_partitioning(tmp_path):
    rng = np.random.default_rng(1)
    n = 997
    scores = [round(float(x), 2) for x in rng.uniform(-0.1, 0.5, n)]  # 2 decimals: many planted ties
    for i in rng.choice(n, 60, replace=False):
        scores[i] = None  # no caption
    perm = rng.permutation(n)
    table = _table(scores, uids=[f"u{p:05d}" for p in perm])  # uids out of order within and across parts
    scored = sum(s is not None for s in scores)
    want = _ranked(table, 0.3)
    assert len(want) == round(0.3 * scored) == 281
    runs = {}
    for name, cuts in {"one": [], "many": [1, 2, 100, 101, 500, 996], "even": list(range(100, n, 100))}.items():
        op, out, rej = _decide(tmp_path / name, _split(table, cuts), top_fraction=0.3)
        assert sorted(out.column("uid").to_pylist()) == want, name
        reasons = rej.column("reason").to_pylist()
        assert reasons.count("no_text_embedding") == 60 and reasons.count("low_clip_score") == n - 60 - 281
        rep = op.report()
        assert (rep["scored"], rep["kept"], rep["rows"], rep["top_fraction"]) == (scored, 281, n, 0.3)
        runs[name] = (out.sort_by("uid"), rej.sort_by("uid"), rep)
    assert runs["one"][0].equals(runs["many"][0]) and runs["one"][1].equals(runs["even"][1])
    assert runs["one"][2] == runs["many"][2] == runs["even"][2]
    # the threshold is the score of the last row kept; ties at it are kept up to its uid, and rejected after it
    out, rej, rep = runs["one"]
    kept = dict(zip(out.column("uid").to_pylist(), out.column("clip_score").to_pylist()))
    assert min(kept.values()) == rep["threshold"] and kept[rep["threshold_uid"]] == rep["threshold"]
    tied = [u for u, s in kept.items() if s == rep["threshold"]]
    assert max(tied) == rep["threshold_uid"] and len(tied) > 1  # the planted ties reach the threshold
    details = [
        d for r, d in zip(rej.column("reason").to_pylist(), rej.column("detail").to_pylist()) if r == "low_clip_score"
    ]
    at = [d for d in details if " = " in d]
    assert at and all(d.endswith(f"tie decided by uid, kept up to {rep['threshold_uid']})") for d in at)
    assert all(float(d.split()[2]) < rep["threshold"] for d in details if " < " in d)


def test_ties_at_the_threshold_keep_the_smaller_uids(tmp_path):
    uids = [f"u{i:02d}" for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)]  # ten rows, one score
    table = _table([0.25] * 10, uids=uids)
    for cuts in ([], [1, 4, 6], [5]):
        op, out, rej = _decide(tmp_path / str(cuts), _split(table, cuts), top_fraction=0.25)  # round(2.5) = 2
        assert sorted(out.column("uid").to_pylist()) == ["u00", "u01"]
        rep = op.report()
        assert rep["threshold_uid"] == "u01" and rep["kept"] == 2
        d = _details(rej)
        assert len(d) == 8 and {r for r, _ in d.values()} == {"low_clip_score"}
        assert d["u05"][1] == "clip score 0.2500 = 0.2500 (top 25% threshold; tie decided by uid, kept up to u01)"
    # a tie below the threshold is an ordinary low score
    table = _table([0.4, 0.3, 0.3, 0.1])
    _, out, rej = _decide(tmp_path / "b", _split(table, [2]), top_fraction=0.5)
    assert out.column("uid").to_pylist() == ["u0000", "u0001"]
    assert _details(rej)["u0003"][1] == "clip score 0.1000 < 0.3000 (top 50% threshold)"
    assert _details(rej)["u0002"][1].startswith("clip score 0.3000 = 0.3000 (top 50% threshold; tie")


def test_rows_without_a_caption_are_rejected_and_not_scored(tmp_path):
    table = _table([0.3, None, 0.2, None, 0.25, None])
    op, out, rej = _decide(tmp_path / "a", _split(table, [1, 4]), top_fraction=1.0)
    assert sorted(out.column("uid").to_pylist()) == ["u0000", "u0002", "u0004"]  # every scored row
    no_caption = ("no_text_embedding", "no caption to score")
    assert _details(rej) == dict.fromkeys(("u0001", "u0003", "u0005"), no_caption)
    assert op.report()["scored"] == 3 and op.report()["rows"] == 6
    _, out, rej = _decide(tmp_path / "b", _split(table, [3]), top_fraction=0.5)  # round(1.5) = 2 of 3 scored
    assert sorted(out.column("uid").to_pylist()) == ["u0000", "u0004"]
    # only rows without a caption: nothing scored, nothing kept, each rejected
    op, out, rej = _decide(tmp_path / "c", _split(_table([None, None]), []), top_fraction=0.3)
    assert out.num_rows == 0 and rej.column("reason").to_pylist() == ["no_text_embedding"] * 2
    assert op.report()["threshold"] is None


def test_a_caption_without_a_text_embedding_fails_naming_embeds_setting(tmp_path):
    table = _table([0.3, None, 0.2], captions=["a", "b", "c"])  # embed ran with text: false on u0001
    op = ClipScore(ClipScoreParams(top_fraction=0.3), "clip_score", tmp_path)
    with pytest.raises(
        ValueError, match=r"1 row\(s\) have a caption but no text embedding \(first: u0001\).*text: false"
    ):
        op.analyze(table)


def test_an_input_embedded_by_two_models_is_refused(tmp_path):
    parts = [("part-00000", _table([0.1, 0.2])), ("part-00001", _table([0.3], uids=["u9"], model="other/x@bf16"))]
    with pytest.raises(ValueError, match=r"embedded by 2 models \(ViT-B-32/abc123@fp32, other/x@bf16\)"):
        _decide(tmp_path, parts, top_fraction=0.3)
    assert not (tmp_path / "_work" / "threshold.json").exists()


def test_an_empty_part_passes(tmp_path):
    table = _table([0.3, 0.1, 0.2])
    op, out, _ = _decide(tmp_path, [*_split(table, [2]), ("part-00002", table.slice(0, 0))], top_fraction=0.5)
    assert sorted(out.column("uid").to_pylist()) == ["u0000", "u0002"]
    o, r = op.process("part-00002", table.slice(0, 0))
    assert o.num_rows == r.num_rows == 0 and o.schema == arrow_schema(ClipScored)


def _pipeline(clip_after=("embed",), **params) -> dict:
    return {
        "name": "clip-score-test",
        "stages": {
            "ingest": {"op": "ingest", "params": {"urls": "seeded.parquet"}},  # seeded by the test, never run
            "embed": {"op": "embed", "after": ["ingest"]},
            "clip_score": {"op": "clip_score", "after": list(clip_after), "params": params or {"top_fraction": 0.3}},
        },
    }


def test_config_needs_embed_before_it():
    p = parse_pipeline(_pipeline(), "c.yaml")
    assert p.stages["clip_score"].lineage["text_embedding"] == "embed"
    assert p.stages["clip_score"].lineage["caption"] == "ingest"
    with pytest.raises(ConfigError, match=r"stage 'clip_score'.*needs column\(s\) image_embedding, model, text_emb"):
        parse_pipeline(_pipeline(clip_after=("ingest",)), "c.yaml")
    with pytest.raises(ConfigError, match=r"clip_score.*exactly one of min_score, top_fraction"):
        parse_pipeline(_pipeline(min_score=0.2, top_fraction=0.3), "c.yaml")


def test_the_commented_example_in_metaclip_yaml_is_a_valid_stage():
    import yaml

    lines, out, inside = (ROOT / "curation/pipelines/metaclip.yaml").read_text().splitlines(), [], False
    for line in lines:
        inside = line == "  # clip_score:" or (inside and line.startswith("  #   "))
        out.append(line.replace("  # ", "  ", 1) if inside else line)
    raw = yaml.safe_load("\n".join(out))
    raw["stages"]["match_concepts"]["after"] = ["clip_score", "embed"]
    p = parse_pipeline(raw, "metaclip.yaml")
    st = p.stages["clip_score"]
    assert st.params.top_fraction == 0.3 and st.params.min_score is None
    assert st.lineage["image_embedding"] == "embed" and st.lineage["caption"] == "ingest"
    assert p.order.index("semdedup") < p.order.index("clip_score") < p.order.index("match_concepts")


def _seed(run, parts: dict[str, pa.Table]) -> None:
    """Complete upstream stages by hand: ingest's rows (uid, url, caption) and embed's Embedding rows, per part."""
    for stage, after, cols in (("ingest", [], ["uid", "url", "caption"]), ("embed", ["ingest"], None)):
        sd, done = StageDir(run, stage), {}
        for name, t in parts.items():
            rows = t.select(cols) if cols else conform(t.select(arrow_schema(Embedding).names), Embedding)
            done[name] = sd.commit(name, rows, empty_rejects(), rows.num_rows)
        manifest = {"stage": stage, "after": after, "status": "complete", "parts": done, "output_fingerprint": stage}
        atomic_write_json(sd.manifest_path, manifest)


def test_stage_through_the_engine_writes_thin_rows_rejects_and_counts(ray_session, tmp_path):
    from curation.engine.driver import run_pipeline

    rng = np.random.default_rng(4)
    scores = [round(float(x), 3) for x in rng.uniform(0.0, 0.4, 90)]
    for i in (5, 17, 60, 61):
        scores[i] = None
    table = _table(scores, uids=[f"{i:016x}" for i in rng.permutation(90)])
    parts = dict(_split(table, [30, 55]))
    run = tmp_path / "run"
    _seed(run, parts)
    want = _ranked(table, 0.3)
    m = run_pipeline(parse_pipeline(_pipeline(), "c.yaml"), run, only=["clip_score"])["clip_score"]
    assert m["status"] == "complete" and m["parts"] == sorted(parts)
    c = m["counts"]
    assert (c["in"], c["out"], c["rejected"]) == (90, 26, 64) and len(want) == 26
    assert c["rejected_by_reason"] == {"low_clip_score": 60, "no_text_embedding": 4}
    assert m["report"]["kept"] == 26 and m["report"]["scored"] == 86 and m["report"]["model"] == MODEL
    for name, t in parts.items():  # per part: rows in = rows out + rows rejected
        marker = StageDir(run, "clip_score").done(name)
        assert marker["rows_in"] == t.num_rows == marker["rows_out"] + sum(marker["rejected"].values())
    # thin rows: uid and clip_score only; url and caption are read from ingest's rows by uid
    assert pq.read_schema(run / "clip_score" / "part-00000.parquet").names == ["uid", "clip_score"]
    out = stage_rows(run, "clip_score", also=("url", "caption"))
    assert sorted(out["uid"]) == want and all(c == f"caption {u}" for u, c in zip(out["uid"], out["caption"]))
    assert (out["clip_score"] >= m["report"]["threshold"]).all()
    rej = stage_rows(run, "clip_score", rejects=True)
    for r, d, cap in zip(rej["reason"], rej["detail"], rej["caption"]):
        if r == "low_clip_score":
            assert d.startswith("clip score ") and "(top 30% threshold" in d and cap is not None
        else:
            assert (r, d, cap) == ("no_text_embedding", "no caption to score", None)
    assert not list((run / "clip_score" / "_work" / "analyze").glob("*.parquet"))  # scratch summaries removed
    assert json.loads((run / "clip_score" / "_work" / "threshold.json").read_text()) == m["report"]
