"""The report's plots: matplotlib figures (Agg, no pyplot state) as PNG data URIs."""

from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure

BEFORE, AFTER = "#888888", "#1f77b4"


def _uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel(stages: list[dict]) -> str:
    """Rows in and out per stage, pipeline order top to bottom."""
    fig = Figure(figsize=(7, 0.4 * len(stages) + 1.2))
    ax = fig.subplots()
    names = [s["stage"] for s in stages][::-1]
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [s["in"] for s in stages][::-1], height=0.4, color=BEFORE, label="in")
    ax.barh([i - 0.2 for i in y], [s["out"] for s in stages][::-1], height=0.4, color=AFTER, label="out")
    ax.set_yticks(list(y), names)
    ax.set_xlabel("rows")
    ax.legend(loc="lower right")
    return _uri(fig)


def rejects(stages: list[dict]) -> str | None:
    """Rejected rows per (stage, reason)."""
    bars = [(f"{s['stage']}: {r}", n) for s in stages for r, n in sorted(s["rejected_by_reason"].items())]
    if not bars:
        return None
    fig = Figure(figsize=(7, 0.3 * len(bars) + 1.0))
    ax = fig.subplots()
    ax.barh(range(len(bars)), [n for _, n in bars][::-1], color="#d62728")
    ax.set_yticks(range(len(bars)), [b for b, _ in bars][::-1], fontsize=8)
    ax.set_xlabel("rejected rows")
    return _uri(fig)


def group_sizes(size_counts: dict[int, int]) -> str:
    """How many duplicate groups have each size."""
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.bar([str(k) for k in size_counts], list(size_counts.values()), color=AFTER)
    ax.set_yscale("log")
    ax.set_xlabel("images in group")
    ax.set_ylabel("groups")
    return _uri(fig)


def rank_frequency(before: list[int], after: list[int]) -> str:
    """Concept rank-frequency before and after balancing, log-log (a flatter curve is a more balanced set)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.loglog(range(1, len(before) + 1), before, color=BEFORE, label=f"before ({len(before)} concepts)")
    if after:
        ax.loglog(range(1, len(after) + 1), after, color=AFTER, label=f"after ({len(after)} concepts)")
    ax.set_xlabel("concept rank")
    ax.set_ylabel("images matched")
    ax.legend()
    return _uri(fig)


def histograms(series: dict[str, list[int]], xlabel: str) -> str | None:
    """Overlaid histograms of integer lengths, one per labelled series."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    hi = max(max(v) for v in series.values())
    bins = min(40, hi + 1)
    for label, values in series.items():
        ax.hist(values, bins=bins, range=(0, hi + 1), alpha=0.55, label=f"{label} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return _uri(fig)


def failure_rates(stages: list[dict]) -> str:
    """Share of rows each synthesis stage rejected, split into LLM call failures and invalid outputs."""
    fig = Figure(figsize=(6, 0.4 * len(stages) + 1.2))
    ax = fig.subplots()
    names = [s["stage"] for s in stages][::-1]
    llm = [s["llm_failures"] / s["in"] if s["in"] else 0 for s in stages][::-1]
    rest = [s["failure_rate"] - f for s, f in zip(stages[::-1], llm)]
    ax.barh(names, llm, color="#d62728", label="LLM call failed")
    ax.barh(names, rest, left=llm, color="#ff7f0e", label="output rejected")
    ax.set_xlim(0, max(0.05, max(a + b for a, b in zip(llm, rest)) * 1.15))
    ax.set_xlabel("share of rows rejected")
    ax.legend(loc="lower right", fontsize=8)
    return _uri(fig)
