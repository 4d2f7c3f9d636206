"""CLI errors: one unwrapped line on stderr, whatever the terminal width, so a path in it survives copy and paste."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


def curate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "40", "TERM": "xterm-256color"}  # a narrow terminal: rich would wrap at 40
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=120,
    )


@pytest.fixture
def deep(tmp_path) -> Path:
    """A folder whose path is far longer than the terminal is wide."""
    path = tmp_path / ("long-folder-name-" * 4) / ("another-long-folder-name-" * 3)
    path.mkdir(parents=True)
    return path


def one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "\x1b[" not in lines[0]  # no colour codes either
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_export_error_keeps_a_long_path_on_one_line(deep):
    shard = deep / "images.parquet"
    pq.write_table(pa.table({"uid": ["a"], "url": ["http://127.0.0.1/a.jpg"]}), shard)
    res = curate("export", "llava-json", str(shard), "--out", str(deep / "x.json"))
    one_error_line(res, f"{shard}: not an instruction shard")
    assert res.stdout == ""


def test_missing_run_dir_and_pipeline_errors_are_one_line(deep):
    one_error_line(curate("status", str(deep / "no-such-run")), str(deep / "no-such-run"))
    one_error_line(curate("run", str(deep / "nope.yaml")), f"{deep / 'nope.yaml'}: no such pipeline file")
    one_error_line(curate("report", str(deep / "no-such-run")), str(deep / "no-such-run"))


def test_set_without_equals_sign_is_an_error_everywhere(deep):
    one_error_line(curate("run", "pipelines/demo.yaml", "--set", "ingest.urls"), "expected KEY=VALUE")
    (deep / "t.yaml").write_text("stage: 1\nshards: [x]\nout: y\n")
    one_error_line(curate("train", str(deep / "t.yaml"), "--set", "max_steps"), "--set 'max_steps': expected KEY=VALUE")
    prompts = ROOT / "curation" / "prompts" / "conversation"
    res = curate(
        "regenerate",
        "--prompts",
        str(prompts),
        "--input",
        str(deep / "x.parquet"),
        "--out",
        str(deep / "o"),
        "--backend",
        "rules",
        "--set",
        "annotations",
    )
    one_error_line(res, "--set 'annotations': expected KEY=VALUE")


def test_status_prints_the_run_dir_whole(tmp_path):
    run = tmp_path / ("a-run-dir-with-a-long-name-" * 4)
    run.mkdir()
    res = curate("status", str(run))
    assert res.returncode == 0, res.stderr
    assert f"run {run.resolve()}" in res.stdout.splitlines()
