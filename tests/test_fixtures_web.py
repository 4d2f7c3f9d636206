"""Synthetic web fixture: generator, loopback server and bundled real photos."""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import imagehash
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from curation.fixtures.photos import real_photos
from curation.fixtures.scenes import _overlap
from curation.fixtures.serve import WebServer, free_port
from curation.fixtures.web import BROKEN_VARIANTS, NEAR_VARIANTS, TRUTH_SCHEMA, URLS_SCHEMA, make_web

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore proxy settings
CAPTION_KINDS = {"clean", "short", "boilerplate", "missing", "long", "non_english"}


def fetch(url: str) -> tuple[int, str | None, bytes]:
    """(status, Content-Type, body) of a GET; only ever to 127.0.0.1."""
    assert urlsplit(url).hostname == "127.0.0.1", url
    try:
        with OPENER.open(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A 60-row web, served for the whole module."""
    root, port = tmp_path_factory.mktemp("web"), free_port()
    summary = make_web(root, 60, port, seed=0)
    truth = pq.read_table(root / "truth.parquet").to_pylist()
    with WebServer(root) as server:
        yield SimpleNamespace(
            root=root, port=port, summary=summary, truth=truth, server=server, by_url={r["url"]: r for r in truth}
        )


def rows(web, kind: str | None = None, variant: str | None = None) -> list[dict]:
    """Truth rows of a kind and/or variant."""
    return [r for r in web.truth if kind in (None, r["kind"]) and variant in (None, r["variant"])]


def local(web, url: str) -> Path:
    """File on disk behind a URL."""
    return web.root / "files" / url.rsplit("/", 1)[1]


def test_layout_and_truth(web):
    urls = pq.read_table(web.root / "urls.parquet")
    truth = pq.read_table(web.root / "truth.parquet")
    assert urls.schema.equals(URLS_SCHEMA) and truth.schema.equals(TRUTH_SCHEMA)
    assert urls.column("url").to_pylist() == truth.column("url").to_pylist()
    assert len(set(urls.column("url").to_pylist())) == urls.num_rows == 60
    assert json.loads((web.root / "web.json").read_text()) == {"port": web.port, "n": 60, "seed": 0}
    assert all(urlsplit(u).hostname == "127.0.0.1" for u in urls.column("url").to_pylist())
    assert {r["kind"] for r in web.truth} == {"ok", "real_photo", "exact_dup", "near_dup", "broken"}
    assert {r["variant"] for r in rows(web, "broken")} == set(BROKEN_VARIANTS)
    assert {r["variant"] for r in rows(web, "near_dup")} == set(NEAR_VARIANTS)
    assert {r["caption_kind"] for r in web.truth} == CAPTION_KINDS
    assert web.summary["kinds"] == dict(Counter(r["kind"] for r in web.truth))
    captions = dict(zip(urls.column("url").to_pylist(), urls.column("caption").to_pylist()))
    for r in web.truth:
        caption = captions[r["url"]]
        assert (caption is None) == (r["caption_kind"] == "missing")
        if r["caption_kind"] == "long":
            assert len(caption) > 2000
        if r["kind"] in ("exact_dup", "near_dup"):
            assert web.by_url[r["source_url"]]["kind"] == "ok"
        for o in r["objects"] or []:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]


def test_images_decode_and_match_truth(web):
    for r in web.truth:
        if r["kind"] == "broken":
            continue
        status, ctype, body = fetch(r["url"])
        assert status == 200 and ctype == {".jpg": "image/jpeg", ".png": "image/png"}[Path(r["url"]).suffix]
        im = Image.open(io.BytesIO(body))
        im.load()
        assert im.size == (r["width"], r["height"]), r["url"]


def test_broken_items(web, monkeypatch):
    one = {r["variant"]: r["url"] for r in rows(web, "broken")}
    assert fetch(one["404"])[0] == 404
    status, ctype, body = fetch(one["html"])
    assert status == 200 and ctype == "image/jpeg" and body.lower().startswith(b"<!doctype html")
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(body))
    status, _, body = fetch(one["empty"])
    assert status == 200 and body == b""
    status, _, body = fetch(one["truncated"])
    assert status == 200 and len(body) > 100
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()
    status, ctype, body = fetch(one["huge"])
    assert status == 200 and ctype == "image/jpeg" and len(body) < 50_000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's default pixel cap refuses it
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    w, h = Image.open(io.BytesIO(body)).size  # header only, nothing decoded
    assert w * h > 1e9
    with pytest.raises(urllib.error.URLError) as refused:
        fetch(one["unreachable"])
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    flaky = web.by_url[one["flaky"]]
    assert fetch(one["flaky"])[0] == 503
    status, _, body = fetch(one["flaky"])
    assert status == 200 and Image.open(io.BytesIO(body)).size == (flaky["width"], flaky["height"])


def test_duplicates(web):
    for r in rows(web, "exact_dup"):
        assert local(web, r["url"]).read_bytes() == local(web, r["source_url"]).read_bytes()
        assert r["url"] != r["source_url"]

    def phash(url: str) -> imagehash.ImageHash:
        return imagehash.phash(Image.open(local(web, url)))

    for r in rows(web, "near_dup"):
        assert local(web, r["url"]).read_bytes() != local(web, r["source_url"]).read_bytes()
        assert phash(r["url"]) - phash(r["source_url"]) <= 8, r
    hashes = [phash(r["url"]) for r in rows(web, "ok")]
    far = [a - b > 10 for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert sum(far) / len(far) > 0.95


def test_same_seed_same_web(web, tmp_path):
    again = tmp_path / "again"
    make_web(again, 60, web.port, seed=0)
    for name in ("urls.parquet", "truth.parquet", "web.json"):
        assert (again / name).read_bytes() == (web.root / name).read_bytes(), name
    names = sorted(p.name for p in (web.root / "files").iterdir())
    assert names == sorted(p.name for p in (again / "files").iterdir())
    assert all((again / "files" / n).read_bytes() == (web.root / "files" / n).read_bytes() for n in names)
    make_web(again, 60, web.port, seed=1)  # regenerating in place replaces the old web
    assert (again / "urls.parquet").read_bytes() != (web.root / "urls.parquet").read_bytes()


def test_small_web_still_has_every_variant(tmp_path):
    summary = make_web(tmp_path / "small", 30, 8000)
    assert set(summary["variants"]) == {*BROKEN_VARIANTS, *NEAR_VARIANTS, "exact"}
    assert "real_photo" not in summary["kinds"] and sum(summary["kinds"].values()) == 30
    with pytest.raises(ValueError, match="n >= 30"):
        make_web(tmp_path / "tiny", 10, 8000)
    (tmp_path / "foreign" / "files").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        make_web(tmp_path / "foreign", 30, 8000)


def test_simple_scenes(tmp_path):
    """scenes='simple': square images, 1-3 non-overlapping shapes of 30-50% of the side on plain white; the same
    mix of duplicates, broken items and caption noise as the default web."""
    summary = make_web(tmp_path / "simple", 120, 8000, seed=4, scenes="simple")
    default = make_web(tmp_path / "default", 120, 8000, seed=4)
    assert summary["scenes"] == "simple" and "scenes" not in default
    assert summary["kinds"] == default["kinds"] and summary["variants"] == default["variants"]
    truth = pq.read_table(tmp_path / "simple" / "truth.parquet").to_pylist()
    ok = [r for r in truth if r["kind"] == "ok" and min(r["width"], r["height"]) >= 160]
    assert len(ok) > 60
    for r in ok:
        side = r["width"]
        assert r["height"] == side and 1 <= len(r["objects"]) <= 3
        boxes = [o["box"] for o in r["objects"]]
        assert all(0.3 * side - 1 <= b[2] - b[0] <= 0.5 * side for b in boxes)
        assert all(_overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :])
        im = Image.open(local(SimpleNamespace(root=tmp_path / "simple"), r["url"])).convert("RGB")
        step = side // 16
        outside = [
            (x, y)
            for x in range(step // 2, side, step)
            for y in range(step // 2, side, step)
            if not any(b[0] - 3 <= x < b[2] + 3 and b[1] - 3 <= y < b[3] + 3 for b in boxes)
        ]
        assert outside and all(min(im.getpixel(p)) > 225 for p in outside)  # plain white background
    with pytest.raises(ValueError, match="scenes"):
        make_web(tmp_path / "bad", 30, 8000, scenes="fancy")


def test_request_counter_and_concurrency(web):
    url = rows(web, "ok")[0]["url"]
    path = urlsplit(url).path
    before = web.server.requests[path]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: fetch(url)[0], range(200)))
    assert statuses == [200] * 200
    assert web.server.requests[path] == before + 200
    assert fetch(web.server.base_url + "/nowhere")[0] == 404
    assert web.server.requests["/nowhere"] == 1


def test_server_serves_only_files(web):
    for path in ("/files/../web.json", "/files/.%2e/web.json", "/web.json", "/files/", "/flaky/"):
        conn = http.client.HTTPConnection("127.0.0.1", web.server.port, timeout=10)
        conn.request("GET", path)  # sent as written, no client-side normalisation
        assert conn.getresponse().status == 404, path
        conn.close()


def test_cli_serves_until_interrupted(web):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.fixtures.serve", str(web.root), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert "serving" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/files/" + rows(web, "ok")[0]["url"].rsplit("/", 1)[1]
        assert fetch(url)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_real_photos_are_bundled(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("real_photos() must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    photos = real_photos()
    names = [name for name, _, _ in photos]
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names) and len(photos) >= 6
    assert all(im.mode == "RGB" and min(im.size) >= 256 and len(cap) > 20 for _, im, cap in photos)


# Digests of make_web(n=60, seed=0) made before the long-tailed option existed (issue 16): the default and simple
# webs must stay byte-identical (file names and bytes, urls.parquet and truth.parquet included; pyarrow is pinned).
WEB_DIGESTS = {
    "web": "05b84549a14b95935f7fd33e1e5153f8a7c039a31d1c93408ed9afdbb6c83405",
    "simple": "33baee7eed5b8c3fc73b8de75b939a306202e8e6a65dc0435f2113b919dd7bcd",
}


@pytest.mark.parametrize("scenes", sorted(WEB_DIGESTS))
def test_default_webs_are_byte_identical(tmp_path, scenes):
    import hashlib

    make_web(tmp_path, 60, 8000, seed=0, scenes=scenes)
    h = hashlib.sha256()
    for f in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(tmp_path)).encode())
        h.update(f.read_bytes())
    assert h.hexdigest() == WEB_DIGESTS[scenes]


def test_longtail_web(tmp_path):
    """scenes='longtail': simple scenes whose colour x shape compounds follow a Zipf law (head >= 100x tail), clean
    captions naming what is drawn, 5% of them mismatched (another image's alt-text, no concept shared), truth kept."""
    from curation.fixtures.scenes import COMPOUNDS, true_concepts
    from curation.fixtures.web import MISMATCHED_SHARE

    summary = make_web(tmp_path, 3000, 8000, seed=5, scenes="longtail")
    assert summary["scenes"] == "longtail" and summary["caption_kinds"]["mismatched"] > 0
    caption = dict(zip(*pq.read_table(tmp_path / "urls.parquet").to_pydict().values()))
    truth = [{**r, "caption": caption[r["url"]]} for r in pq.read_table(tmp_path / "truth.parquet").to_pylist()]
    counts = Counter(c for r in truth if r["kind"] == "ok" for c in true_concepts(r["objects"]))
    names = {f"{c} {s}" for c, s in COMPOUNDS}
    assert len(names) == 72 and set(counts) <= names and len(counts) >= 60
    ranked = [counts[f"{c} {s}"] for c, s in COMPOUNDS]  # in rank order
    assert ranked[0] >= 100 * max(1, min(ranked[-5:])), ranked
    assert sum(ranked[:7]) > 0.4 * sum(ranked)  # the head holds most objects
    originals = [r for r in truth if r["kind"] == "ok"]
    clean = [r for r in originals if r["caption_kind"] == "clean"]
    for r in clean[:300]:
        for concept in true_concepts(r["objects"]):  # 'a red circle', 'two red circles'
            assert concept in r["caption"], (concept, r["caption"])
    by_caption = {}
    for r in clean:
        by_caption.setdefault(r["caption"], []).append(r)
    mismatched = [r for r in originals if r["caption_kind"] == "mismatched"]
    copied = {r["source_url"] for r in truth} - {None}  # duplicates' sources keep their own alt-text
    fit = [r for r in mismatched + clean if r["url"] not in copied]
    assert not copied & {r["url"] for r in mismatched}
    assert abs(len(mismatched) / len(fit) - MISMATCHED_SHARE) < 0.005, len(mismatched) / len(fit)
    for r in mismatched:
        donors = by_caption[r["caption"]]  # the alt-text is a clean image's own
        assert all(set(true_concepts(d["objects"])).isdisjoint(true_concepts(r["objects"])) for d in donors)
    assert {Image.open(local(SimpleNamespace(root=tmp_path), r["url"])).size[0] for r in clean[:50]} == {
        r["width"] for r in clean[:50]
    }
