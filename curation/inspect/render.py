"""The report's HTML: one self-contained page (inline CSS, data-URI images, no script, no external URL)."""

from __future__ import annotations

from html import escape

from curation.inspect import plots

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right}img.plot{max-width:100%;display:block;margin:.6em 0}
.missing{color:#a00;font-style:italic}.row{display:flex;gap:1em;border-top:1px solid #eee;padding:.8em 0}
.row img{flex:none;width:224px;height:auto;align-self:flex-start}.txt{flex:1;min-width:0;overflow-wrap:anywhere}
.turn{margin:.2em 0}.who{font-weight:bold}.grp img{width:96px;margin-right:4px}
.label{color:#666;font-size:.85em}nav a{margin-right:1em}
"""
SECTIONS = [
    ("funnel", "Funnel"),
    ("dedup", "Duplicate groups"),
    ("coverage", "Concept coverage"),
    ("lengths", "Caption and conversation lengths"),
    ("llm", "LLM usage and failures"),
    ("gallery", "Sample rows"),
]


def _e(v) -> str:
    return escape("" if v is None else str(v))


def _img(uri: str | None, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}">' if uri else ""


def _num(v) -> str:
    return (f"{v:.4f}".rstrip("0").rstrip(".") or "0") if isinstance(v, float) else _e(v)


def table(cols: list[str], rows: list[list], numeric: set[str] = frozenset()) -> str:
    head = "".join(f'<th class="{"n" if c in numeric else ""}">{_e(c)}</th>' for c in cols)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"n" if c in numeric else ""}">{_num(v)}</td>' for c, v in zip(cols, r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}</p>'


def funnel(stages: list[dict]) -> str:
    if not stages:
        return missing("No finished stage in this run.")
    counts = table(
        ["stage", "op", "status", "in", "out", "rejected"],
        [[s["stage"], s["op"], s["status"], s["in"], s["out"], s["rejected"]] for s in stages],
        {"in", "out", "rejected"},
    )
    reasons = [[s["stage"], r, n] for s in stages for r, n in sorted(s["rejected_by_reason"].items())]
    return (
        counts
        + _img(plots.funnel(stages), "rows in and out per stage")
        + "<h3>Rejects by reason</h3>"
        + (
            table(["stage", "reason", "rows"], reasons, {"rows"}) + _img(plots.rejects(stages), "rejects by reason")
            if reasons
            else missing("No rows were rejected.")
        )
    )


def dedup(d: dict | None) -> str:
    if d is None:
        return missing("No dedup stage (or no groups.parquet) in this run.")
    summary = table(
        ["images", "groups", "groups with duplicates", *d["by_reason"]],
        [[d["images"], d["groups"], d["multi_groups"], *d["by_reason"].values()]],
    )
    groups = "".join(
        '<div class="grp"><p><span class="label">group of</span> '
        + _e(g["size"])
        + ' <span class="label">rep</span> '
        + _e(g["rep_uid"])
        + "</p>"
        + "".join(_img(m["thumb"], f"{m['uid']} {m['reason'] or 'kept'}", "thumb") for m in g["members"])
        + '<p class="label">'
        + ", ".join(f"{_e(m['uid'])}: {_e(m['reason'] or 'kept')} (d={_e(m['distance'])})" for m in g["members"])
        + "</p></div>"
        for g in d["top"]
    )
    return (
        f"<p>stage <b>{_e(d['stage'])}</b></p>"
        + summary
        + _img(plots.group_sizes(d["size_counts"]), "group sizes")
        + "<h3>Largest groups</h3>"
        + (groups or missing("No duplicates found."))
    )


def coverage(c: dict | None) -> str:
    if c is None:
        return missing("No balance stage (or no coverage.parquet) in this run: concept coverage is not known.")
    r = c["report"]
    head = (
        f"<p>stage <b>{_e(c['stage'])}</b>: method {_e(r.get('method'))}, t = {_num(r.get('t'))}, "
        f"{_e(r.get('selected'))} of {_e(r.get('pool'))} images kept</p>"
    )
    metrics = table(
        ["metric", "before", "after"],
        [[m["metric"], m["before"], m["after"]] for m in c["metrics"]],
        {"before", "after"},
    )
    top = table(
        ["concept", "id", "before", "after"],
        [[t.get("text"), t["concept_id"], t["count_before"], t["count_after"]] for t in c["top"]],
        {"before", "after"},
    )
    return (
        head
        + _img(plots.rank_frequency(c["before"], c["after"]), "concept rank-frequency, log-log")
        + metrics
        + "<h3>Most frequent concepts</h3>"
        + top
    )


def lengths(ls: dict) -> str:
    caps = plots.histograms(ls["captions"], "words per caption")
    convs = plots.histograms(ls["conversations"], "words per conversation")
    turns = plots.histograms(ls["turns"], "turns per conversation")
    stats = [
        [k, len(v), min(v), round(sum(v) / len(v), 1), max(v)]
        for group in ("captions", "conversations")
        for k, v in ls[group].items()
        if v
    ]
    return (
        "<h3>Captions</h3>"
        + (_img(caps, "caption lengths") or missing("No captions in this run."))
        + "<h3>Conversations</h3>"
        + (
            _img(convs, "conversation lengths") + _img(turns, "turns per conversation")
            if convs
            else missing("No instruct stage in this run.")
        )
        + (
            table(
                ["text", "rows", "min words", "mean words", "max words"],
                stats,
                {"rows", "min words", "mean words", "max words"},
            )
            if stats
            else ""
        )
    )


USAGE_KEYS = ("requests", "successes", "retries", "cached", "prompt_tokens", "completion_tokens", "cost", "wall_s")


def _request_failure_rate(usage: dict) -> float | None:
    n = usage.get("requests")
    return sum((usage.get("failures") or {}).values()) / n if n else None


def llm(stages: list[dict]) -> str:
    if not stages:
        return missing("No recaption or instruct stage in this run.")
    rows = [
        [
            s["stage"],
            s["kind"],
            s["backend"],
            s["model"],
            s["in"],
            s["out"],
            s["rejected"],
            s["failure_rate"],
            s["llm_failures"],
            ", ".join(f"{r}: {n}" for r, n in sorted(s["reasons"].items())),
        ]
        for s in stages
    ]
    out = table(
        ["stage", "kind", "backend", "model", "in", "out", "rejected", "failure rate", "LLM call failures", "reasons"],
        rows,
        {"in", "out", "rejected", "failure rate", "LLM call failures"},
    )
    out += _img(plots.failure_rates(stages), "failure rate per synthesis stage")
    used = [s for s in stages if s["usage"]]
    if used:
        keys = [k for k in USAGE_KEYS if any(k in s["usage"] for s in used)]
        extra = sorted({k for s in used for k in s["usage"] if k not in USAGE_KEYS and k != "failures"})
        out += "<h3>Usage</h3>" + table(
            ["stage", *keys, *extra, "request failure rate", "failures"],
            [
                [
                    s["stage"],
                    *(s["usage"].get(k) for k in keys + extra),
                    _request_failure_rate(s["usage"]),
                    ", ".join(f"{r}: {n}" for r, n in sorted((s["usage"].get("failures") or {}).items())),
                ]
                for s in used
            ],
            set(keys + extra) | {"request failure rate"},
        )
    else:
        out += "<p>No token usage recorded (offline backends make no API calls).</p>"
    return out


def _conversation(c: dict) -> str:
    turns = "".join(
        f'<div class="turn"><span class="who">{_e(t["from"])}:</span> {_e(t["value"])}</div>' for t in c["turns"]
    )
    return f'<div class="conv"><p class="label">{_e(c["kind"])} ({_e(c["stage"])})</p>{turns}</div>'


def gallery(g: dict | None) -> str:
    if g is None or not g["rows"]:
        return missing("No image rows in this run.")
    rows = "".join(
        f'<div class="row" data-uid="{_e(r["uid"])}">{_img(r["thumb"], r["uid"], "sample")}<div class="txt">'
        f'<p class="label">uid {_e(r["uid"])} &middot; {_e(r["url"])}</p>'
        f'<p><span class="label">caption</span> <span class="caption">{_e(r["caption"])}</span></p>'
        + (
            f'<p><span class="label">recaption</span> <span class="recaption">{_e(r["recaption"])}</span></p>'
            if r["recaption"] is not None
            else ""
        )
        + "".join(_conversation(c) for c in r["conversations"])
        + "</div></div>"
        for r in g["rows"]
    )
    return f"<p>{len(g['rows'])} rows of stage <b>{_e(g['stage'])}</b></p>" + rows


def page(title: str, sections: dict[str, str]) -> str:
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{sections[sid]}</section>' for sid, name in SECTIONS)
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1><nav>{nav}</nav>{body}</body></html>"
    )
