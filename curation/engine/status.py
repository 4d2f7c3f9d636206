"""Read a run dir's manifests into a per-stage summary."""

from __future__ import annotations

from pathlib import Path

from curation.engine.store import StageDir, read_json


def stage_names(run_dir: Path) -> list[str]:
    """Stages in pipeline order when known, else every dir with a manifest or state."""
    meta = read_json(run_dir / "_pipeline.json")
    if meta:
        return meta["order"]
    return sorted(p.parent.name for p in run_dir.glob("*/_state.json"))


def run_status(run_dir: str | Path) -> dict:
    """Per-stage status, counts and reject reasons of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run dir")
    stages = []
    for name in stage_names(run_dir):
        m = StageDir(run_dir, name).manifest()
        if m is None:
            stages.append({"stage": name, "status": "pending" if not (run_dir / name).exists() else "incomplete"})
            continue
        stages.append(
            {
                "stage": name,
                "op": m["op"],
                "status": m["status"],
                "parts": f"{len(m['parts'])}/{m['parts_total']}",
                **{k: m["counts"][k] for k in ("in", "out", "rejected")},
                "rejected_by_reason": m["counts"]["rejected_by_reason"],
                "seconds": m["timings"].get("total_s"),
                **({"report": m["report"]} if m.get("report") else {}),
            }
        )
    return {"run_dir": str(run_dir.resolve()), "stages": stages}


def coverage_rows(report: dict) -> list[dict]:
    """(metric, before, after) rows of a balance report's concept coverage."""
    before, after = report["coverage_before"], report["coverage_after"]
    return [{"metric": k, "before": before[k], "after": after[k]} for k in before]
