"""`curate report`: the demo run's report.html in headless Chromium, a run without balance or LLM stages, escaping."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from curation.cli import app
from curation.engine.status import run_status
from curation.inspect.report import build_report, write_report
from schemas.rundir import RunDir
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed at /usr/bin/chromium "
    "(apt-get install chromium; `make` does it): no browser to open the report in",
)
SECTIONS = ["funnel", "dedup", "coverage", "lengths", "llm", "gallery"]
HOSTILE = 'A red star <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & "quotes"'


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def open_report(browser, path: Path):
    """The report in a fresh page; returns (page, problems): console errors, page errors, dialogs, non-local
    requests."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: r.url.startswith(("file:", "data:")) or problems.append(f"request: {r.url}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, problems


def _rows(run: Path, stage: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((run / stage).glob("part-*.parquet")))


def _norm(text: str) -> str:
    return " ".join(text.split())  # how the browser shows runs of white space


def _loaded(page, selector: str) -> list[int]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.complete ? e.naturalWidth : 0)")


@pytest.mark.slow
@needs_chromium
def test_demo_report_opens_in_chromium_with_every_section(demo_run, browser):
    run, _ = demo_run
    path = write_report(run)  # what `curate demo` (so `make demo`) ends with
    assert path == run / "report.html"
    html = path.read_text()
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#)', html), "the report must not load anything from outside"
    page, problems = open_report(browser, path)
    for sid in SECTIONS:
        assert page.locator(f"section#{sid}").is_visible()
        assert page.locator(f"section#{sid} .missing").count() == 0, f"{sid} says it has nothing to show"
    for sid in ["funnel", "dedup", "coverage", "lengths", "llm"]:
        widths = _loaded(page, f"section#{sid} img.plot")
        assert widths and all(w > 0 for w in widths), f"{sid}: plot images did not load: {widths}"

    # the funnel table is the manifests' counts
    st = {s["stage"]: s for s in run_status(run)["stages"]}
    table = page.eval_on_selector(
        "section#funnel table", "t => [...t.rows].slice(1).map(r => [...r.cells].map(c => c.innerText))"
    )
    assert [r[0] for r in table] == list(st)
    for stage, _, _, n_in, n_out, n_rej in table:
        assert (int(n_in), int(n_out), int(n_rej)) == (st[stage]["in"], st[stage]["out"], st[stage]["rejected"])
    reasons = page.inner_text("section#funnel")
    assert all(r in reasons for s in st.values() for r in s["rejected_by_reason"])
    cov = st["balance"]["report"]
    assert f"{cov['selected']} of {cov['pool']} images kept" in page.inner_text("section#coverage")

    # gallery rows: balance's images, with the image, url and alt-text ingest stored for each (balance's rows are
    # thin), the recaption and the conversations of that uid, as the Parquet has them
    assert not {"image", "caption", "url"} & set(_rows(run, "balance").columns)
    rows = page.locator("section#gallery .row")
    assert 0 < rows.count() <= 8
    assert "rows of stage balance" in page.inner_text("section#gallery")
    widths = _loaded(page, "section#gallery .row img")
    assert len(widths) == rows.count() and all(w > 0 for w in widths)
    balance = pl.from_arrow(RunDir(run).read("balance", ["url", "caption"]))
    recaps = dict(_rows(run, "recaption").select("uid", "recaption").iter_rows())
    instruct = [s for s in st if st[s]["op"] == "instruct"]
    for i in range(rows.count()):
        row = rows.nth(i)
        uid = row.get_attribute("data-uid")
        want = balance.filter(pl.col("uid") == uid)
        assert want.height == 1 and want["caption"][0]
        assert _norm(row.locator(".caption").inner_text()) == _norm(want["caption"][0])
        assert want["url"][0] in row.inner_text()
        assert _norm(row.locator(".recaption").inner_text()) == _norm(recaps[uid])
        want = sum(_rows(run, s).filter(pl.col("uid") == uid).height for s in instruct)
        assert row.locator(".conv").count() == want > 0
    # the alt-text lengths are those of balance's rows, their captions read from ingest
    stats = page.eval_on_selector_all(
        "section#lengths table tr", "rs => rs.map(r => [...r.cells].map(c => c.innerText))"
    )
    assert ["alt-text (balance)", str(balance.height)] in [r[:2] for r in stats]
    assert not problems, problems
    page.close()


@pytest.mark.slow
@needs_chromium
def test_cli_report_and_a_run_without_balance_or_llm_stages(demo_run, browser, tmp_path):
    from curation.engine.config import parse_pipeline
    from curation.engine.driver import run_pipeline
    from curation.fixtures.serve import WebServer

    run, web = demo_run
    raw = yaml.safe_load((ROOT / "curation/pipelines/demo.yaml").read_text())
    raw["stages"] = {k: raw["stages"][k] for k in ("ingest", "dedup", "filter")}
    small = tmp_path / "small"
    shutil.copytree(
        run,
        small,
        ignore=lambda d, names: [n for n in names if Path(d) == run and n not in ("ingest", "dedup", "filter")],
    )
    with WebServer(web):  # finished stages are reused; the server is there in case ingest reruns
        run_pipeline(
            parse_pipeline(raw, "small.yaml", [f"ingest.urls={web / 'urls.parquet'}", "ingest.shard_size=60"]), small
        )
    assert json.loads((small / "_pipeline.json").read_text())["order"] == ["ingest", "dedup", "filter"]

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(small), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    page, problems = open_report(browser, out)
    assert "No balance stage" in page.inner_text("section#coverage")
    assert "No recaption or instruct stage" in page.inner_text("section#llm")
    assert "No instruct stage" in page.inner_text("section#lengths")
    assert all(w > 0 for w in _loaded(page, "section#lengths img.plot"))
    uids = set(_rows(small, "filter")["uid"])
    shown = [
        page.locator("section#gallery .row").nth(i).get_attribute("data-uid")
        for i in range(page.locator("section#gallery .row").count())
    ]
    assert shown and set(shown) <= uids
    assert "filter" in page.inner_text("section#gallery")
    assert not problems, problems
    page.close()


def _rewrite(stage_dir: Path, fn) -> None:
    for f in sorted(stage_dir.glob("part-*.parquet")):
        t = pq.read_table(f)
        pq.write_table(fn(t), f)


@pytest.mark.slow
@needs_chromium
def test_hostile_captions_are_shown_as_text(demo_run, browser, tmp_path):
    run, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("_ray", "report.html"))
    hostile = lambda t, col: t.set_column(t.schema.get_field_index(col), col, pa.array([HOSTILE] * t.num_rows))  # noqa: E731
    _rewrite(copy / "ingest", lambda t: hostile(t, "caption"))  # where balance's rows' alt-text is stored
    _rewrite(copy / "recaption", lambda t: hostile(t, "recaption"))
    html = write_report(copy).read_text()
    assert HOSTILE not in html and "<script>" not in html.lower()
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    page, problems = open_report(browser, copy / "report.html")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("section#gallery .caption").first.inner_text() == HOSTILE
    assert page.locator("section#gallery .recaption").first.inner_text() == HOSTILE
    assert page.locator("script").count() == 0 and page.locator('img[src="x"]').count() == 0
    assert not problems, problems
    page.close()


def test_a_run_with_no_finished_stage_still_reports(tmp_path):
    (tmp_path / "_pipeline.json").write_text(json.dumps({"name": "x", "order": ["ingest", "dedup"]}))
    html = build_report(tmp_path)
    for sid in SECTIONS:
        section = html.split(f'<section id="{sid}">', 1)[1].split("</section>", 1)[0]
        assert 'class="missing"' in section, sid
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_llm_section_shows_usage_and_failure_rates():
    from curation.inspect import render

    usage = {
        "model": "gpt-x",
        "requests": 50,
        "successes": 45,
        "failures": {"rate_limited": 3, "timeout": 2},
        "prompt_tokens": 12345,
        "completion_tokens": 678,
        "cost": 0.0421,
        "retries": 7,
        "wall_s": 3.5,
        "cached": 10,
    }
    stage = {
        "stage": "conversation",
        "op": "instruct",
        "kind": "conversation",
        "backend": "openai",
        "model": "gpt-x",
        "in": 40,
        "out": 30,
        "rejected": 10,
        "failure_rate": 0.25,
        "llm_failures": 4,
        "reasons": {"llm_rate_limited": 4, "unparseable": 6},
        "usage": usage,
    }
    html = render.llm([stage])
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    for value in ["12345", "678", "0.0421", "7", "10", "0.25", "0.1", "rate_limited: 3, timeout: 2"]:
        assert value in cells, value  # 0.1: 5 failed requests of 50
    assert html.count('<img class="plot" src="data:image/png;base64,') == 1


@pytest.mark.slow
def test_curate_demo_ends_by_writing_the_report(demo_run, tmp_path, monkeypatch):
    """`make demo` runs `curate demo`: its last step writes RUN/report.html and prints the path (the DAG run is
    reused)."""
    import curation.cli as cli
    import curation.fixtures.demo as demo_fixtures

    run, _ = demo_run

    def reuse(pipeline, run_dir, address, overrides, retry_failed=False):
        shutil.copytree(run, run_dir, ignore=shutil.ignore_patterns("_ray", "report.html"))
        return run_dir

    monkeypatch.setattr(cli, "execute", reuse)
    monkeypatch.setattr(demo_fixtures, "demo_assets", lambda out, urls: (out / "model.pt", out / "vocab.parquet"))
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--n", "30"])
    assert res.exit_code == 0, res.output
    report = tmp_path / "demo" / "run" / "report.html"
    assert f"report:  {report.resolve()}" in res.output
    html = report.read_text()
    assert all(f'<section id="{sid}">' in html for sid in SECTIONS) and 'class="missing"' not in html
