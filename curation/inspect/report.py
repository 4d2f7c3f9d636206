"""`curate report`: one self-contained HTML page about a run (funnel, dedup, coverage, lengths, LLM use, samples)."""

from __future__ import annotations

from pathlib import Path

from curation.engine.store import atomic_write_bytes, read_json


def build_report(run_dir: str | Path, samples: int = 8) -> str:
    """The report's HTML for a run dir; sections whose stages the run lacks say so."""
    from curation.inspect import facts, render

    run = facts.RunFacts(run_dir)
    meta = read_json(run.root / "_pipeline.json") or {}
    title = f"curation report: {meta.get('name', run.root.name)} ({run.root.resolve()})"
    return render.page(
        title,
        {
            "funnel": render.funnel(facts.funnel(run)),
            "dedup": render.dedup(facts.dedup(run)),
            "coverage": render.coverage(facts.coverage(run)),
            "lengths": render.lengths(facts.lengths(run)),
            "llm": render.llm(facts.llm(run)),
            "gallery": render.gallery(facts.gallery(run, samples)),
        },
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: int = 8) -> Path:
    """Write the report (default RUN/report.html) atomically; return its path."""
    out = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_bytes(out, build_report(run_dir, samples).encode())
    return out
