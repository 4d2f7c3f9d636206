"""`curate view`: headless Chromium clicks through stages, a reject reason, pages and a concept; rows match the
Parquet."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.engine.status import run_status
from curation.inspect.view import PAGE_SIZE, ViewServer
from schemas.rundir import RunDir

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
        "`make` does it): no browser to drive the viewer with",
    ),
]
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> a red star'


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors, page errors and dialogs (asserted empty at the end)."""
    pg = browser.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield pg
    pg.close()
    assert not problems, problems


def _frame(run: Path, stage: str, rejects: bool = False) -> pl.DataFrame:
    return pl.read_parquet(sorted((run / stage / ("rejects" if rejects else "")).glob("part-*.parquet")))


def _shown(pg) -> list[str]:
    return pg.eval_on_selector_all(".row", "rows => rows.map(r => r.dataset.id)")


def _norm(text: str) -> str:
    return " ".join(text.split())  # how the browser shows runs of white space


def _key(df: pl.DataFrame) -> list[str]:
    return df["id" if "id" in df.columns else "uid"].to_list()


def _settle(pg) -> None:
    """Let the page finish its requests before the server stops."""
    pg.wait_for_load_state("networkidle")
    pg.goto("about:blank")


def _images_loaded(pg) -> list[int]:
    pg.wait_for_load_state("load")
    return pg.eval_on_selector_all(".row img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")


def test_click_through_stages_and_a_reject_reason(demo_run, page):
    run, _ = demo_run
    stages = [s["stage"] for s in run_status(run)["stages"]]
    with ViewServer(run) as url:
        assert url.startswith("http://127.0.0.1:")
        page.goto(url + "/")
        for stage in stages:
            page.click(f"nav a.stage[data-stage='{stage}']")
            want = _frame(run, stage)
            assert page.inner_text("#total") == str(want.height), stage
            assert _shown(page) == _key(want.head(PAGE_SIZE)), stage
            # every row is of a downloaded image, stored by ingest alone: thin stages' rows show it too
            widths = _images_loaded(page)
            assert len(widths) == min(want.height, PAGE_SIZE) and all(w > 0 for w in widths), stage

        # balance's rows are thin (uid, concepts, weight): the page joins the url and alt-text ingest stored
        assert not {"image", "caption", "url"} & set(_frame(run, "balance").columns)
        page.click("nav a.stage[data-stage='balance']")
        want = pl.from_arrow(RunDir(run).read("balance", ["url", "caption"])).head(PAGE_SIZE)
        assert [_norm(t) for t in page.locator(".row .v-caption").all_inner_texts()] == [
            _norm(c) for c in want["caption"]
        ]
        assert page.locator(".row .v-url").all_inner_texts() == want["url"].to_list()
        assert len(_images_loaded(page)) == want.height

        # the dedup stage's most common reject reason: its rows, with the images they had upstream
        dedup = _frame(run, "dedup", rejects=True)
        reason = dedup["reason"].value_counts(sort=True)["reason"][0]
        page.click("nav a.stage[data-stage='dedup']")
        page.click(f"nav a.reason[data-reason='{reason}']")
        want = dedup.filter(pl.col("reason") == reason)
        assert page.inner_text("#total") == str(want.height)
        assert _shown(page) == want["uid"].head(PAGE_SIZE).to_list()
        assert page.locator(".row .v-reason").all_inner_texts() == [reason] * min(want.height, PAGE_SIZE)
        assert all(w > 0 for w in _images_loaded(page))

        # failed downloads: their rows, shown without an image (there is none to fetch)
        ingest = _frame(run, "ingest")
        failed = _frame(run, "ingest", rejects=True)
        reason = failed["reason"].value_counts(sort=True)["reason"][0]
        page.click("nav a.stage[data-stage='ingest']")
        page.click(f"nav a.reason[data-reason='{reason}']")
        want = failed.filter(pl.col("reason") == reason)["uid"].head(PAGE_SIZE).to_list()
        assert _shown(page) == want
        assert page.locator(".row .noimg").count() == sum(u not in set(ingest["uid"]) for u in want) > 0
        assert all(w > 0 for w in _images_loaded(page))

        # paging through the ingest stage's rows
        assert ingest.height > PAGE_SIZE
        page.click("nav a.stage[data-stage='ingest']")
        page.click("a.next")
        assert _shown(page) == ingest["uid"][PAGE_SIZE : 2 * PAGE_SIZE].to_list()
        page.click("a.prev")
        assert _shown(page) == ingest["uid"][:PAGE_SIZE].to_list()
        _settle(page)


def test_concept_filter_follows_the_images_across_stages(demo_run, page):
    run, _ = demo_run
    cov = pl.read_parquet(run / "balance" / "coverage.parquet").sort("count_after", descending=True)
    cid, text = cov["concept_id"][0], cov["text"][0]
    matched = set(_frame(run, "match_concepts").filter(pl.col("concept_ids").list.contains(cid))["uid"])
    with ViewServer(run) as url:
        page.goto(url + "/?stage=balance")
        page.fill("#concept", text)
        page.click("#apply")
        want = _frame(run, "balance").filter(pl.col("concept_ids").list.contains(cid))
        assert want.height == cov["count_after"][0] > 0
        assert page.inner_text("#total") == str(want.height)
        assert _shown(page) == want["uid"].head(PAGE_SIZE).to_list()
        # the filter stays on when moving to a stage without concept columns: its rows of those images
        page.click("nav a.stage[data-stage='conversation']")
        conv = _frame(run, "conversation").filter(pl.col("uid").is_in(list(matched)))
        assert page.inner_text("#total") == str(conv.height)
        assert _shown(page) == conv["id"].head(PAGE_SIZE).to_list()
        # a concept link on a row filters by that concept
        page.goto(url + "/?stage=balance")
        first = _frame(run, "balance").row(0, named=True)
        page.locator(".row").first.locator("a.concept").first.click()
        other = first["concept_ids"][0]
        assert page.inner_text("#total") == str(
            _frame(run, "balance").filter(pl.col("concept_ids").list.contains(other)).height
        )
        page.fill("#concept", "no such concept at all")
        page.click("#apply")
        assert "not in the vocabulary" in page.inner_text("main") and page.inner_text("#total") == "0"
        _settle(page)


def test_text_is_escaped_and_only_loopback_is_served(demo_run, page, tmp_path):
    run, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("_ray"))
    for f in sorted((copy / "ingest").glob("part-*.parquet")):  # the alt-text filter's rows show is stored there
        t = pq.read_table(f)
        pq.write_table(
            t.set_column(t.schema.get_field_index("caption"), "caption", pa.array([HOSTILE] * t.num_rows)), f
        )
    with ViewServer(copy) as url:
        page.goto(url + "/?stage=filter")
        assert page.evaluate("window.__pwned") is None
        assert page.locator(".row .v-caption").first.inner_text() == HOSTILE
        assert page.locator("script").count() == 0 and page.locator('img[src="x"]').count() == 0
        _settle(page)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never via a proxy
        for path, text in [
            ("/image?uid=no-such-uid", "not found"),
            ("/?stage=%3Cb%3Enope", "No finished stage named &lt;b&gt;nope"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as e:
                opener.open(url + path)
            assert e.value.code == 404 and text in e.value.read().decode()
    server = ViewServer(copy)
    assert server.server.server_address[0] == "127.0.0.1"
    server.server.server_close()
