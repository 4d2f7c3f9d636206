"""A non-editable install works: build the wheel, install it into a fresh venv, run commands from an unrelated folder.

What a user does, offline: `pip wheel` this repo, `pip install` the wheel, run `curate` somewhere else. The temporary
venv sees the dev venv's third-party packages (torch and the rest are not installed again) through a plain path line
in a .pth file, which adds that site-packages to sys.path without processing its .pth files, so the dev venv's
editable `curation` finder is never loaded: `curation`, `schemas` and `trainer` come from the wheel alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.engine.config import load_pipeline
from curation.synth.prompts import folder_version
from schemas import TABLES
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # about 30 s: a build, an install and five interpreters that import torch or pyarrow

# Data the commands read next to their modules: every file here must be in the wheel.
DATA_DIRS = ("curation/prompts", "curation/pipelines", "curation/concepts/model_configs")
TASK = "conversation"


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def _copy_sources(dst: Path) -> None:
    """Copy what a fresh checkout holds (tracked files, and untracked ones git does not ignore), nothing else: no
    venvs, caches, runs, or bench outputs (a live Ray session there holds sockets that cannot be copied)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        s = ROOT / rel
        if s.is_file():  # a tracked file deleted in the working tree is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / rel)


def _data_files() -> set[str]:
    """The repo's package data (non-hidden files, as `folder_version` counts them), as wheel paths."""
    found = set()
    for d in DATA_DIRS:
        for p in (ROOT / d).rglob("*"):
            rel = p.relative_to(ROOT)
            if p.is_file() and "__pycache__" not in rel.parts and not any(s.startswith(".") for s in rel.parts):
                found.add(rel.as_posix())
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv python, venv site-packages, an unrelated work folder, env) after building and installing."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy, as from a fresh checkout: an in-tree build writes build/ into the shared working tree, and
    # setuptools' build/lib keeps stale files (a module since moved) that would end up in the wheel.
    src = tmp / "src"
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {
        "PYTHONNOUSERSITE": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "CURATION_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], tmp, env)
    (wheel,) = dist.glob("curation-*.whl")

    target = tmp / "venv"
    venv.create(target, with_pip=False)  # from the dev venv: the same base interpreter
    py = target / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).strip())
    # Install before the .pth exists, so that pip does not see the dev venv's editable curation at all.
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], tmp, env)
    (site / "zz_dev_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")  # third-party packages only
    work = tmp / "work"  # not the repo: nothing here but what the test writes
    work.mkdir()
    return wheel, py, site, work, env


def test_wheel_carries_the_package_data(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_data_files() - names)
    assert not missing, f"{wheel.name} lacks package data: {missing}"
    assert any(n.startswith(f"curation/prompts/{TASK}/") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "jobs/")) for n in names)


def test_installed_package_is_not_the_repo(installed):
    _, py, site, work, env = installed
    out = _run(
        [py, "-c", "import curation, schemas, trainer; print(curation.__file__, schemas.__file__, trainer.__file__)"],
        work,
        env,
    )
    for f in out.split():
        assert Path(f).is_relative_to(site), f"{f} is not from the installed wheel in {site}"


def _image_rows(tmp: Path) -> tuple[Path, Path]:
    """12 image rows (uid, url, caption, JPEG image) and their boxes; every 6th image has none."""
    urls = [f"http://127.0.0.1:1/img{i}.jpg" for i in range(12)]
    images = []
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (20 * i, 90, 200)).save(buf, "JPEG")
        images.append(buf.getvalue())
    shard = tmp / "images.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": [f"u{i:02d}" for i in range(12)],
                "url": urls,
                "caption": [f"a red circle and a blue star on white, photo {i}" for i in range(12)],
                "image": pa.array(images, pa.binary()),
            }
        ),
        shard,
    )
    boxes = [
        {"category": "circle", "color": "red", "box": [10, 10, 30, 30]},
        {"category": "star", "color": "blue", "box": [40, 20, 60, 40]},
    ]
    objects = [boxes if i % 6 else [] for i in range(12)]
    ann = tmp / "ann.parquet"
    pq.write_table(pa.table({"url": urls, "width": [64] * 12, "height": [48] * 12, "objects": objects}), ann)
    return shard, ann


def test_regenerate_with_the_packaged_prompts(installed):
    _, py, site, work, env = installed
    prompts = Path(_run([py, "-c", "import curation; print(curation.PROMPTS)"], work, env).strip()) / TASK
    assert prompts.is_relative_to(site) and (prompts / "system_message.txt").is_file()
    shard, ann = _image_rows(work)
    out = work / "regen"
    cmd = [py.parent / "curate", "regenerate", "--prompts", prompts, "--input", shard, "--out", out]
    report = json.loads(
        _run(
            [*cmd, "--backend", "rules", "--set", f"annotations={ann}", "--set", f"cache={work / 'llm.sqlite'}"],
            work,
            env,
        )
    )
    assert report["prompt_version"] == folder_version(ROOT / "curation" / "prompts" / TASK)
    assert report["counts"]["in"] == 12 and report["counts"]["out"] == 10  # two images without boxes: rejected
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert len(rows) == 10 and {r["prompt_version"] for r in rows} == {report["prompt_version"]}
    cmd[cmd.index(prompts)] = TASK  # a bare name: the packaged prompt folder
    again = json.loads(_run([*cmd, "--backend", "rules", "--set", f"annotations={ann}"], work, env))
    assert again["prompt_version"] == report["prompt_version"]


def test_tiny_model_from_the_packaged_config(installed):
    _, py, _, work, env = installed
    ckpt = work / "models" / "tiny.pt"
    printed = json.loads(_run([py.parent / "curate", "models", "tiny", ckpt], work, env))
    assert printed == {"model": "curation-tiny-clip", "pretrained": str(ckpt)} and ckpt.stat().st_size > 0


def test_packaged_pipelines_and_schema_export(installed):
    _, py, site, work, env = installed
    code = (
        "import json; from curation.engine.config import load_pipeline; "
        "ps = [load_pipeline(n) for n in ('demo', 'pipelines/demo.yaml', 'metaclip')]; "
        "print(json.dumps([[p.path, p.order] for p in ps]))"
    )
    loaded = json.loads(_run([py, "-c", code], work, env))
    for (path, order), name in zip(loaded, ("demo", "demo", "metaclip")):
        assert (
            Path(path).is_relative_to(site) and order == load_pipeline(ROOT / f"curation/pipelines/{name}.yaml").order
        )
    out = work / "schemas"
    _run([py.parent / "curate", "schema", "export", "--out", out], work, env)
    assert sorted(p.name for p in out.glob("*.schema.json")) == sorted(f"{n}.schema.json" for n in TABLES)
