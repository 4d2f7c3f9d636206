"""Local Ray starts whatever the depth of the run dir: its unix sockets must fit in 107 bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from curation.engine.workers import _init_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _deep_run_dir(length: int) -> Path:
    """A run dir whose `_ray` child is `length` characters long (CI's clone path gave 47 and Ray failed)."""
    base = Path(tempfile.mkdtemp(prefix="deep-", dir="/tmp"))
    pad = length - len(str(base / "x" / "_ray")) + 1
    run = base / ("d" * pad)
    run.mkdir()
    assert len(str(run / "_ray")) == length
    return run


def test_temp_dir_leaves_room_for_rays_longest_socket(monkeypatch):
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for length in (30, 47, 55, 200):
        run = _deep_run_dir(length)
        tmp = _init_kwargs(None, run)["_temp_dir"]
        socket = f"{tmp}/session_2026-12-02_15-54-55_219459_24669/sockets/plasma_store"
        assert len(socket.encode()) <= 107, (length, socket)
        assert tmp == str(run / "_ray") or length > 40  # a shallow run dir keeps Ray's files inside it
        shutil.rmtree(run.parent)


def test_ray_starts_in_a_deep_run_dir():
    run = _deep_run_dir(47)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    code = (
        "import sys, ray; from curation.engine.workers import init_ray; "
        "init_ray(None, sys.argv[1]); print(ray.get(ray.put(41)) + 1); ray.shutdown()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "42"
    shutil.rmtree(run.parent, ignore_errors=True)
