"""Token, cost and failure figures per part (an actor's client serves many parts), summed for the stage report."""

from __future__ import annotations

import json
from pathlib import Path

from curation.engine.store import atomic_write_json


def write_usage(work: Path, part: str, usage: dict) -> None:
    atomic_write_json(work / "usage" / f"{part}.json", usage)


def sum_usage(work: Path) -> dict | None:
    """Token, cost and failure totals over the parts' usage files."""
    files = sorted((work / "usage").glob("*.json"))
    if not files:
        return None
    total: dict = {"failures": {}}
    for f in files:
        for k, v in json.loads(f.read_text()).items():
            if k == "failures":
                for r, n in v.items():
                    total["failures"][r] = total["failures"].get(r, 0) + n
            elif isinstance(v, (int, float)):
                total[k] = round(total.get(k, 0) + v, 6)
            else:
                total[k] = v
    return total
