"""Decontamination (issue 15): a held-out set of the fixture web's originals is the eval set; the originals and their
planted copies are rejected as `eval_contamination` naming the eval item, everything else passes (folder and Parquet
eval sets, on local Ray through the runner); the cosine path with the tiny CLIP; clear errors for a bad eval set."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from curation.ops.decontaminate import Decontaminate, DecontaminateParams, build_index
from tests.conftest import stage_rows

HELD_OUT = 8  # originals of the web in the eval set; those with planted copies come first


def _held_out(web: Path) -> tuple[dict[str, str], pl.DataFrame]:
    """{url of an eval original: its eval id} and the web's truth."""
    truth = pl.read_parquet(web / "truth.parquet")
    copied = truth.filter(pl.col("source_url").is_not_null())["source_url"].unique().sort().to_list()
    plain = truth.filter((pl.col("kind") == "ok") & ~pl.col("url").is_in(copied))["url"].sort().to_list()
    urls = (copied[: HELD_OUT - 2] + plain[:2])[:HELD_OUT]
    return {u: f"bench/{i:03d}_{u.rsplit('/', 1)[1]}" for i, u in enumerate(urls)}, truth


def _eval_folder(web: Path, out: Path) -> tuple[dict[str, str], pl.DataFrame]:
    ids, truth = _held_out(web)
    for url, item in ids.items():
        (out / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(web / "files" / url.rsplit("/", 1)[1], out / item)
    (out / "README.txt").write_text("not an image: ignored\n")
    return ids, truth


def _expected(ids: dict[str, str], truth: pl.DataFrame, variants=("exact", "reencode", "resize")) -> dict[str, str]:
    """{url: eval id} of every row that must be rejected: the eval originals and their copies of these variants."""
    out = dict(ids)
    for r in truth.filter(pl.col("source_url").is_in(list(ids)) & pl.col("variant").is_in(list(variants))).iter_rows(
        named=True
    ):
        out[r["url"]] = ids[r["source_url"]]
    return out


def _rows(web: Path, truth: pl.DataFrame) -> pa.Table:
    """The web's decodable images as an ingest-like table (the files as served, not resized)."""
    rows = []
    for url in truth.filter(pl.col("width").is_not_null())["url"]:
        f = web / "files" / url.rsplit("/", 1)[1]
        if f.is_file() and f.stat().st_size:
            data = f.read_bytes()
            try:
                PILImage.open(io.BytesIO(data)).load()
            except Exception:
                continue
            rows.append({"uid": hashlib.sha1(url.encode()).hexdigest()[:16], "url": url, "caption": None,
                         "sha256": hashlib.sha256(data).hexdigest(), "image": data})  # fmt: skip
    return pa.Table.from_pylist(rows)


def _decide(op: Decontaminate, table: pa.Table) -> tuple[pa.Table, dict[str, str]]:
    out, rej = op.process("part-00000", table)
    assert out.num_rows + rej.num_rows == table.num_rows
    assert set(rej.column("reason").to_pylist()) <= {"eval_contamination"}
    return out, dict(zip(rej.column("url").to_pylist(), rej.column("detail").to_pylist()))


def test_planted_copies_of_the_eval_set_are_rejected_naming_the_item(web, tmp_path):
    ids, truth = _eval_folder(web[0], tmp_path / "eval")
    op = Decontaminate(DecontaminateParams(eval_set=str(tmp_path / "eval")), "decontaminate", tmp_path / "_work")
    op.prepare()
    assert op.report() == {"eval_items": HELD_OUT, "cosine": False}
    table = _rows(web[0], truth)
    _, got = _decide(op, table)
    want = _expected(ids, truth)
    assert set(want) <= set(got), sorted(set(want) - set(got))
    crops = _expected(ids, truth, ("crop",)).keys() - ids.keys()
    assert set(got) <= set(want) | crops  # precision: nothing unrelated to the eval set is dropped
    for url, detail in got.items():
        item = {**want, **_expected(ids, truth, ("crop",))}[url]
        assert detail.startswith(f"matches eval item {item} (")
        kind = "exact copy, sha256" if url in ids or truth.filter(pl.col("url") == url)["variant"][0] == "exact" else ""
        assert kind in detail and ("phash distance" in detail or "sha256" in detail)
    # the hash signals alone, without the sha256 shortcut: the originals match at pHash distance 0
    no_sha = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(["x"] * table.num_rows))
    _, got2 = _decide(op, no_sha)
    assert all(got2[u] == f"matches eval item {i} (phash distance 0)" for u, i in ids.items())
    empty_out, empty_rej = op.process("part-00001", table.slice(0, 0))
    assert empty_out.num_rows == empty_rej.num_rows == 0


def test_plain_images_match_exact_copies_only(tmp_path):
    (tmp_path / "eval").mkdir()
    grey = PILImage.new("RGB", (64, 48), (90, 90, 90))
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    (tmp_path / "eval" / "grey.png").write_bytes(buf.getvalue())
    other = io.BytesIO()
    PILImage.new("RGB", (64, 48), (91, 91, 91)).save(other, "PNG")  # pHash and thumbnail all but equal
    rows = pa.Table.from_pylist(
        [
            {"uid": "a", "url": "u/a", "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "image": buf.getvalue()},
            {
                "uid": "b",
                "url": "u/b",
                "sha256": hashlib.sha256(other.getvalue()).hexdigest(),
                "image": other.getvalue(),
            },
        ]
    )
    op = Decontaminate(DecontaminateParams(eval_set=str(tmp_path / "eval")), "d", tmp_path / "_work")
    out, got = _decide(op, rows)
    assert got == {"u/a": "matches eval item grey.png (exact copy, sha256)"} and out.column("uid").to_pylist() == ["b"]


def test_a_bad_eval_set_is_a_clear_error(tmp_path):
    def err(path, **kw):
        with pytest.raises(ValueError) as e:
            build_index(DecontaminateParams(eval_set=str(path), **kw))
        return str(e.value)

    assert "does not exist" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "holds no image files" in err(tmp_path / "empty")
    pq.write_table(pa.table({"name": ["a"], "image": [b"x"]}), tmp_path / "t.parquet")
    assert "no column(s) ['id']" in err(tmp_path / "t.parquet")
    assert "item 'a' does not decode" in err(tmp_path / "t.parquet", id_col="name")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}), tmp_path / "e.pq")
    assert "has no rows" in err(tmp_path / "e.pq")
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "not a folder or a readable Parquet" in err(tmp_path / "junk.parquet")
    assert DecontaminateParams(eval_set=str(tmp_path / "nope")).hashed()["eval_set_files"] == "missing"


def test_cosine_matches_with_the_same_tower_and_refuses_another(web, tmp_path):
    """Rows whose pixels hash differently but whose embedding is an eval item's copy's (a re-shot picture)."""
    from curation.concepts.clip import load_clip, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", seed=0)
    ids, truth = _eval_folder(web[0], tmp_path / "eval")
    params = DecontaminateParams(
        eval_set=str(tmp_path / "eval"), min_cosine=0.999, model="curation-tiny-clip", pretrained=str(ckpt)
    )
    assert Decontaminate.required_columns(params) >= {"image_embedding", "model"}
    op = Decontaminate(params, "decontaminate", tmp_path / "_work")
    op.prepare()
    clip = load_clip("curation-tiny-clip", str(ckpt))
    table = _rows(web[0], truth)
    table = table.take(sorted({*range(32), *(table.column("url").to_pylist().index(u) for u in ids)}))
    copies = {r["url"]: r["source_url"] for r in truth.filter(pl.col("variant") == "reencode").iter_rows(named=True)}
    emb, ok, _ = clip.encode_images(table.column("image").to_pylist())
    assert len(ok) == table.num_rows
    noise = np.random.default_rng(0).integers(0, 256, (table.num_rows, 32, 32, 3), np.uint8)
    images = []  # every row's pixels are unrelated noise: only the embedding can match
    for a in noise:
        b = io.BytesIO()
        PILImage.fromarray(a).save(b, "PNG")
        images.append(b.getvalue())
    rows = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    rows = rows.set_column(rows.schema.get_field_index("sha256"), "sha256", pa.array(["x"] * rows.num_rows))
    rows = rows.append_column("image_embedding", pa.array(list(emb), pa.list_(pa.float32())))
    rows = rows.append_column("model", pa.array([clip.model_id] * rows.num_rows))
    _, got = _decide(op, rows)
    eval_emb = dict(zip(table.column("url").to_pylist(), emb))
    sims = np.stack([eval_emb[u] for u in ids]) @ emb.T  # [E, N]
    best = sims.max(axis=0)
    urls = table.column("url").to_pylist()
    sure = {u for u, c in zip(urls, best) if abs(c - 0.999) > 1e-4}  # away from the threshold's float noise
    assert set(got) & sure == {u for u, c in zip(urls, best) if c >= 0.999} & sure and set(ids) <= set(got)
    for u in ids:
        assert got[u].startswith(f"matches eval item {ids[u]} (cosine 1.000")
    n_copies = sum(s in ids and u in urls for u, s in copies.items())
    print(f"cosine: {len(got)} of {len(urls)} matched; re-encoded copies of eval items matched: "
          f"{sum(u in got for u, s in copies.items() if s in ids)}/{n_copies}")  # fmt: skip
    other = rows.set_column(
        rows.schema.get_field_index("model"), "model", pa.array(["ViT-B-32/x@fp32"] * rows.num_rows)
    )
    with pytest.raises(ValueError, match="embedded with ViT-B-32/x@fp32"):
        op.process("p", other)


@pytest.fixture(scope="module")
def run(ray_session, web, tmp_path_factory):
    """ingest -> decontaminate on the session web, the eval set as a folder and as a Parquet (two stages); and
    ingest -> embed -> decontaminate with min_cosine (the tiny CLIP: eval images embedded in prepare)."""
    from curation.concepts.clip import make_tiny_checkpoint
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline

    tmp = tmp_path_factory.mktemp("decon")
    tiny = {"model": "curation-tiny-clip", "pretrained": str(make_tiny_checkpoint(tmp / "tiny.pt", seed=0))}
    ids, truth = _eval_folder(web[0], tmp / "eval")
    pq.write_table(
        pa.table({"id": list(ids.values()), "image": [(tmp / "eval" / i).read_bytes() for i in ids.values()]}),
        tmp / "eval.parquet",
    )
    urls = tmp / "urls.parquet"  # the flaky URL (503 once) belongs to test_pipeline
    pl.read_parquet(web[0] / "urls.parquet").filter(~pl.col("url").str.contains("/flaky/")).write_parquet(urls)
    stages = {
        "ingest": {"op": "ingest", "params": {"urls": str(urls), "image_size": 128, "allow_loopback": True}},
        "decontaminate": {"op": "decontaminate", "after": ["ingest"], "params": {"eval_set": str(tmp / "eval")}},
        "decon_pq": {"op": "decontaminate", "after": ["ingest"], "params": {"eval_set": str(tmp / "eval.parquet")}},
        "embed": {"op": "embed", "after": ["ingest"], "params": {**tiny, "text": False}},
        "decon_cos": {
            "op": "decontaminate",
            "after": ["embed"],
            "params": {**tiny, "eval_set": str(tmp / "eval"), "min_cosine": 0.9999},
        },
    }
    raw = {"name": "decon-test", "stages": stages}
    out = tmp / "run"
    manifests = run_pipeline(parse_pipeline(raw, "decon.yaml", ["ingest.shard_size=60"]), out)
    return out, manifests, ids, truth, raw


def test_stage_rejects_the_eval_sets_copies_and_nothing_else(run):
    out, manifests, ids, truth, _ = run
    want = _expected(ids, truth)
    crops = _expected(ids, truth, ("crop",))
    for stage in ("decontaminate", "decon_pq"):
        c = manifests[stage]["counts"]
        assert c["in"] == manifests["ingest"]["counts"]["out"] == c["out"] + c["rejected"]
        assert len(manifests[stage]["parts"]) == 2 and manifests[stage]["report"]["eval_items"] == HELD_OUT
        rej = stage_rows(out, stage, rejects=True)
        assert set(rej["reason"]) == {"eval_contamination"}
        got = dict(zip(rej["url"], rej["detail"]))
        assert set(want) <= set(got) <= set(crops) | set(want), (sorted(set(want) - set(got)), sorted(got))
        assert all(d.startswith(f"matches eval item {crops.get(u) or want[u]} (") for u, d in got.items())
        kept = set(stage_rows(out, stage, also=("url",))["url"])
        assert not kept & set(want) and len(kept) == c["out"]
        assert c["rejected_by_reason"] == {"eval_contamination": len(got)}
    a, b = (stage_rows(out, s, rejects=True).select("uid", "detail").sort("uid") for s in ("decontaminate", "decon_pq"))
    assert a.equals(b)


def test_stage_with_cosine_embeds_the_eval_set_with_embeds_tower(run):
    """A random tiny tower puts unrelated images close, so only the wiring is checked here: the rows' embeddings come
    from embed, the eval set's from prepare with the same tower (no refusal), and every hash reject is still made."""
    out, manifests, ids, truth, _ = run
    c = manifests["decon_cos"]["counts"]
    assert c["in"] == manifests["embed"]["counts"]["out"] == c["out"] + c["rejected"]
    assert manifests["decon_cos"]["report"] == {"eval_items": HELD_OUT, "cosine": True}
    got = dict(zip(*(stage_rows(out, "decon_cos", rejects=True)[k] for k in ("url", "detail"))))
    assert set(_expected(ids, truth)) <= set(got)
    cos = [float(d.rsplit("cosine ", 1)[1].rstrip(")")) for d in got.values() if "(cosine " in d]
    assert all(x >= 0.9999 - 5e-4 for x in cos)  # printed to 3 places


def test_stage_with_a_missing_eval_set_fails_naming_it(run, tmp_path):
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import StageFailed, run_pipeline

    out, *_, raw = run
    bad = {**raw["stages"], "bad": {"op": "decontaminate", "after": ["ingest"], "params": {"eval_set": "/no/such"}}}
    with pytest.raises(StageFailed, match="eval_set /no/such does not exist") as e:
        run_pipeline(parse_pipeline({**raw, "stages": bad}, "decon.yaml", ["ingest.shard_size=60"]), out)
    assert "stage 'bad'" in str(e.value)


def test_the_commented_example_in_metaclip_yaml_is_a_valid_stage():
    import yaml

    from curation.engine.config import parse_pipeline
    from tests.conftest import ROOT

    lines, out, inside = (ROOT / "curation/pipelines/metaclip.yaml").read_text().splitlines(), [], False
    for line in lines:
        inside = line == "  # decontaminate:" or (inside and line.startswith("  #   "))
        out.append(line.replace("  # ", "  ", 1) if inside else line)
    raw = yaml.safe_load("\n".join(out))
    raw["stages"]["match_concepts"]["after"] = ["decontaminate", "embed"]
    p = parse_pipeline(raw, "metaclip.yaml")
    st = p.stages["decontaminate"]
    assert st.params.min_cosine == 0.95 and st.params.model == p.stages["embed"].params.model
    assert st.lineage["image_embedding"] == "embed" and st.lineage["image"] == "ingest"
    assert p.order.index("semdedup") < p.order.index("decontaminate") < p.order.index("match_concepts")
