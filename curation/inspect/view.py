"""`curate view`: browse a run's rows and rejects in a small local web page (stdlib http.server, 127.0.0.1 only)."""

from __future__ import annotations

import threading
from functools import lru_cache
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import polars as pl

from curation.inspect.facts import PART, RunFacts

PAGE_SIZE = 20
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;display:flex;color:#222}
nav{flex:none;width:250px;padding:1em;background:#f6f6f6;min-height:100vh}main{flex:1;padding:1em 2em;min-width:0}
nav a{display:block;padding:2px 0}nav a.sel{font-weight:bold}nav .reasons a{padding-left:1em}
.row{display:flex;gap:1em;border-top:1px solid #eee;padding:.7em 0}.row img{flex:none;width:224px;align-self:flex-start}
.noimg{flex:none;width:224px;color:#999}.txt{flex:1;min-width:0;overflow-wrap:anywhere}
.k{color:#666;font-size:.85em}.turn{margin:.15em 0}.err{color:#a00}form{margin:.5em 0}
"""
IMAGE_TYPES = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"GI": "image/gif", b"RI": "image/webp"}


def _e(v) -> str:
    return escape("" if v is None else str(v))


@lru_cache(maxsize=2)
def _read_vocab(path: str, mtime: float) -> dict[int, str]:
    """id -> text of a vocabulary file, read once per (path, modification time)."""
    return dict(pl.read_parquet(path, columns=["id", "text"]).iter_rows())


class RunView:
    """Queries behind the page: a stage's rows or rejects, filtered by reason and concept, a page at a time."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run dir")

    def facts(self) -> RunFacts:
        return RunFacts(self.root)  # re-read per request: the run may still be going

    def concept_stage(self, run: RunFacts) -> str | None:
        """The stage whose rows list each image's concept matches (match_concepts, else balance)."""
        having = [s for s in run.stages() if "concept_ids" in run.columns(s)]
        ops = [s for s in having if run.op(s) == "match_concepts"]
        return (ops or having or [None])[0]

    def vocab(self, run: RunFacts) -> dict[int, str]:
        """Concept id -> text, from the vocabulary the matching stage used (else balance's coverage.parquet)."""
        for stage in run.stages("match_concepts", "balance"):
            path = (run.manifests[stage].get("params") or {}).get("vocab")
            if path and Path(path).is_file():
                return _read_vocab(str(Path(path).resolve()), Path(path).stat().st_mtime)
        for stage in run.stages("balance"):
            cov = run.root / stage / "coverage.parquet"
            if cov.exists():
                return dict(pl.read_parquet(cov, columns=["concept_id", "text"]).iter_rows())
        return {}

    def concept_id(self, concept: str, vocab: dict[int, str]) -> int | None:
        if concept.strip().isdigit():
            return int(concept)
        return next((i for i, t in vocab.items() if t == concept), None)

    def rows(
        self, run: RunFacts, stage: str, rejects: bool, reason: str | None, concept: int | None, page: int, size: int
    ) -> tuple[int, pl.DataFrame]:
        """(total, a page of rows): without image bytes, with the url and caption of thin stages' rows joined from
        where they were written, and PART (which part file each row is in)."""
        lf = run.scan(stage, rejects, parts=True)
        if lf is None:
            return 0, pl.DataFrame()
        if reason:
            lf = lf.filter(pl.col("reason") == reason)
        if concept is not None:
            if "concept_ids" in lf.collect_schema():
                lf = lf.filter(pl.col("concept_ids").list.contains(concept))
            else:
                cstage = self.concept_stage(run)
                uids = (
                    run.scan(cstage).filter(pl.col("concept_ids").list.contains(concept)).select("uid")
                    if cstage
                    else pl.LazyFrame({"uid": []}, schema={"uid": pl.String})
                )
                lf = lf.filter(pl.col("uid").is_in(uids.collect()["uid"].implode()))
        total = lf.select(pl.len()).collect().item()
        own = [c for c in lf.collect_schema() if c != "image"]
        df = lf.select(own).slice(page * size, size).collect()
        if "uid" not in own:
            return total, df
        joined = [
            c for c in ("url", "caption") if c not in own and c in run.lineage(stage, ["url", "caption"], rejects)
        ]
        at = own.index("uid") + 1  # shown after the uid, where the source stage's rows have them
        return total, run.lookup(stage, df, joined, rejects).select(own[:at] + joined + own[at:])

    def with_images(self, run: RunFacts, stage: str, rows: pl.DataFrame, rejects: bool = False) -> set[str]:
        """Which of these rows' uids have an image where the stage's images were written (failed downloads have
        none)."""
        writer = run.lineage(stage, ["image"], rejects).get("image")
        lf = run.written(writer, rows) if writer and "uid" in rows.columns else None
        if lf is None:
            return set()
        # image kept out of the filter: only the uid column decides which rows of the part are read
        has = lf.select("uid", pl.col("image").is_not_null().alias("has")).collect()
        return set(has.filter("has")["uid"])

    def image(self, stage: str | None, uid: str, part: str | None = None) -> bytes | None:
        """The encoded image of a uid: from where the stage's images were written (that part of it, when given), else
        from the first stage that writes images and has it."""
        run = self.facts()
        writer = run.lineage(stage, ["image"]).get("image") if stage in run.stages() else None
        tries = [(writer, part)] if writer else []
        tries += [(s, None) for s in run.stages() if "image" in run.columns(s) and "uid" in run.columns(s)]
        for s, p in tries:
            lf = run.written(s, pl.DataFrame({"uid": [uid], PART: [p]}, schema={"uid": pl.String, PART: pl.String}))
            hit = lf.select("image").head(1).collect() if lf is not None else pl.DataFrame()
            if hit.height and hit["image"][0]:
                return hit["image"][0]
        return None


def _link(text: str, cls: str = "", **params) -> str:
    q = urlencode({k: str(v) for k, v in params.items() if v is not None and v != ""})
    return (
        f'<a class="{cls}" href="/?{_e(q)}"'
        + "".join(f' data-{k}="{_e(v)}"' for k, v in params.items() if k in ("stage", "reason") and v)
        + f">{text}</a>"
    )


def _value(col: str, v, vocab: dict[int, str], stage: str) -> str:
    if col == "conversations" and isinstance(v, list):
        return "".join(f'<div class="turn"><b>{_e(t["from"])}:</b> {_e(t["value"])}</div>' for t in v)
    if col == "concept_ids" and isinstance(v, list):
        return ", ".join(_link(_e(f"{vocab.get(c, c)}"), "concept", stage=stage, concept=c) for c in v)
    if isinstance(v, list) and v and isinstance(v[0], float):
        return f"[{len(v)} floats]"
    if isinstance(v, list):
        return _e(", ".join(map(str, v)))
    return _e(v)


def render(view: RunView, q: dict[str, str]) -> tuple[int, str]:
    """(status, HTML) of the browse page for a query: stage, rejects, reason, concept, page."""
    run = view.facts()
    stages = run.stages()
    stage = q.get("stage") or (stages[0] if stages else "")
    reason, concept_q = q.get("reason") or None, (q.get("concept") or "").strip()
    rejects = bool(reason) or q.get("rejects") == "1"
    page = max(int(q["page"]) if q.get("page", "").isdigit() else 0, 0)
    nav = []
    for s in stages:
        c = run.manifests[s]["counts"]
        nav.append(
            _link(
                f'{_e(s)} <span class="k">{c["out"]} rows, {c["rejected"]} rejected</span>',
                "stage sel" if s == stage else "stage",
                stage=s,
                concept=concept_q,
            )
        )
        if s == stage:
            nav.append(
                '<div class="reasons">'
                + _link(f"rows ({c['out']})", "rows", stage=s, concept=concept_q)
                + _link(f"all rejects ({c['rejected']})", "rejects", stage=s, rejects="1", concept=concept_q)
                + "".join(
                    _link(f"{_e(r)} ({n})", "reason", stage=s, reason=r, concept=concept_q)
                    for r, n in sorted(c["rejected_by_reason"].items())
                )
                + "</div>"
            )
    body, status = [], HTTPStatus.OK
    if stage not in stages:
        status = HTTPStatus.NOT_FOUND
        body.append(f'<p class="err">No finished stage named {_e(stage)} in this run.</p>')
    else:
        vocab = view.vocab(run) if concept_q or "concept_ids" in run.columns(stage) else {}
        concept = view.concept_id(concept_q, vocab) if concept_q else None
        if concept_q and concept is None:
            body.append(f'<p class="err">concept {_e(concept_q)} is not in the vocabulary</p>')
            total, df = 0, pl.DataFrame()
        else:
            total, df = view.rows(run, stage, rejects, reason, concept, page, PAGE_SIZE)
        what = f"rejects ({_e(reason)})" if reason else "rejects" if rejects else "rows"
        shown = f"{page * PAGE_SIZE + 1}-{page * PAGE_SIZE + df.height}" if df.height else "none"
        cfilter = f", concept {_e(vocab.get(concept, concept))} (id {concept})" if concept is not None else ""
        body.append(
            f'<p id="summary">stage <b>{_e(stage)}</b> {what}{cfilter}: <span id="shown">{shown}</span> of '
            f'<span id="total">{total}</span></p>'
        )
        keep = {"stage": stage, "rejects": "1" if rejects else "", "reason": reason, "concept": concept_q}
        pager = (_link("previous", "prev", **keep, page=str(page - 1) if page > 1 else "") if page else "") + (
            _link("next", "next", **keep, page=str(page + 1)) if (page + 1) * PAGE_SIZE < total else ""
        )
        pictured = view.with_images(run, stage, df, rejects)
        for r in df.iter_rows(named=True):
            uid, src = r.get("uid"), urlencode({"stage": stage, "uid": r.get("uid"), "part": r.pop(PART, None) or ""})
            img = (
                f'<img src="/image?{_e(src)}" alt="{_e(uid)}">'
                if uid in pictured
                else '<div class="noimg">no image</div>'
            )
            fields = "".join(
                f'<div><span class="k">{_e(k)}</span> <span class="v-{_e(k)}">{_value(k, v, vocab, stage)}</span></div>'
                for k, v in r.items()
            )
            body.append(
                f'<div class="row" data-uid="{_e(uid)}" data-id="{_e(r.get("id", uid))}">{img}'
                f'<div class="txt">{fields}</div></div>'
            )
        body.append(f'<p class="pager">{pager}</p>')
    form = (
        f'<form method="get" action="/"><input type="hidden" name="stage" value="{_e(stage)}">'
        + ('<input type="hidden" name="rejects" value="1">' if rejects else "")
        + (f'<input type="hidden" name="reason" value="{_e(reason)}">' if reason else "")
        + f'<label>concept (text or id) <input id="concept" name="concept" value="{_e(concept_q)}">'
        f'</label> <button id="apply" type="submit">filter</button></form>'
    )
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(run.root.name)}: {_e(stage)}</title>'
        f"<style>{CSS}</style></head><body><nav><h3>{_e(run.root.name)}</h3>{''.join(nav)}</nav>"
        f"<main>{form}{''.join(body)}</main></body></html>"
    )
    return status, html


def make_handler(view: RunView) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per request is noise in a terminal
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(
                "Content-Security-Policy",
                "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'",
            )
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    status, html = render(view, q)
                    return self._send(status, html.encode(), "text/html; charset=utf-8")
                if url.path == "/favicon.ico":
                    return self._send(204, b"", "image/x-icon")
                if url.path == "/image" and q.get("uid"):
                    data = view.image(q.get("stage"), q["uid"], q.get("part"))
                    if data:
                        return self._send(200, data, IMAGE_TYPES.get(data[:2], "application/octet-stream"))
                return self._send(404, b"not found", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                return None  # the browser moved on before the answer (e.g. images of a page left early)
            except (OSError, pl.exceptions.PolarsError) as e:
                return self._send(500, _e(f"{type(e).__name__}: {e}").encode(), "text/plain; charset=utf-8")

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # a browser opens several connections at once for a page's images
    daemon_threads = True


def make_server(run_dir: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """The viewer's HTTP server on 127.0.0.1 (never another interface); port 0 picks a free one."""
    return _Server(("127.0.0.1", port), make_handler(RunView(run_dir)))


class ViewServer:
    """The viewer in a background thread (tests): `with ViewServer(run) as url: ...`."""

    def __init__(self, run_dir: str | Path, port: int = 0):
        self.server = make_server(run_dir, port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(run_dir: str | Path, port: int = 8766) -> None:
    """Serve until Ctrl-C."""
    server = make_server(run_dir, port)
    print(
        f"browsing {Path(run_dir).resolve()} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
