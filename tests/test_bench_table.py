"""`make bench` runs every benchmark and prints one table with each issue's figures (here at smoke sizes)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FIGURES = {  # issue -> figures the issue asked for (a substring of each row's figure)
    2: ["ingest", "near-dup grouping", "peak RSS of the grouping"],
    3: ["balance", "match_concepts stage", "embed stage"],
    4: ["openai backend"],
    5: [
        "packing fill",
        "samples (llava15), s",
        "useful tokens/s, packed varlen vs padded",
        "held-out colour accuracy",
        "held-out count_total accuracy",
    ],
    14: ["run dir bytes over ingest's", "URLs/s end to end"],
    15: [
        "precision of",
        "recall of planted exact",
        "distinct images lost",
        "semantic dedup of",
        "precision of planted semantic duplicates",
        "recall of planted semantic duplicates",
        "rows with brute force's decision",
        "global step spread over",
        "rows the spread step decides",
        "eval_contamination rejects",
        "recall without crops",
    ],
    16: [
        "zero-shot accuracy",
        "feature top-5 recall",
        "planted mismatched captions",
        "ROC AUC of the clip score",
        "balance inverse frequency feature trained",
        "balance metaclip feature trained",
        "balance inverse frequency truth",
        "held-out tail-compound colour accuracy",
        "head-compound colour accuracy",
    ],
    17: ["URL list (streamed)", "driver peak RSS over its imports", "read_webdataset", "verify: header"],
    18: [
        "AnyRes held-out colour accuracy",
        "image tokens per sample",
        "training ms per sample",
        "DDP, 2 CPU ranks",
        "relative loss difference",
    ],
}


@pytest.mark.slow
def test_make_bench_prints_one_table_with_every_figure():
    p = subprocess.run(
        [sys.executable, "bench/run_all.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [
        [c.strip() for c in ln.strip().strip("|").split("|")]
        for ln in p.stdout.splitlines()
        if re.match(r"\| \d+ \|", ln)
    ]
    assert rows and all(len(r) == 7 for r in rows)
    for issue, wanted in FIGURES.items():
        figures = [r[1] for r in rows if r[0] == str(issue)]
        for w in wanted:
            assert any(w in f for f in figures), f"issue {issue}: no row for {w!r} in {figures}"
    goals = [r for r in rows if r[5].strip()]
    assert goals and all(r[6] in ("met", "**not met**") for r in goals)  # every goal is judged
    assert "FAILED" not in p.stdout
