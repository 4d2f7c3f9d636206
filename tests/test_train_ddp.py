"""Data-parallel training (trainer/distributed.py) on tiny models: 2 CPU ranks (torchrun, gloo on 127.0.0.1) train
what 1 rank trains on the same global batches, uneven steps do not deadlock, checkpoints resume on any number of
ranks, FSDP and Ray Train give the same losses.

Tolerance: 2 ranks sum the same per-token losses in another order (two forwards of half the rows, a gradient
all-reduce), so float32 rounding differs: losses agree to rel 1e-5 per step and the final trainable weights to
abs 1e-5 after 6 AdamW steps at lr 1e-3 (measured: ~2e-7 and ~2e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curation.fixtures.serve import free_port
from tests.test_train import write_shard
from trainer.tiny import make_tiny_all
from trainer.train import train

ROOT = Path(__file__).resolve().parent.parent
LOSS_REL, WEIGHT_ABS = 1e-5, 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    dirs = make_tiny_all(root / "models")
    return {
        "root": root,
        "vision": str(dirs["vision"]),
        "lm": str(dirs["lm"]),
        "chat": str(write_shard(root / "data" / "chat" / "part-00000.parquet", 48, "chat")),
        "small": str(write_shard(root / "data" / "small" / "part-00000.parquet", 11, "chat")),
    }


def conf(env, out, **kw) -> dict:
    base = {
        "stage": 2,
        "shards": [env["chat"]],
        "vision": env["vision"],
        "lm": env["lm"],
        "out": str(out),
        "max_len": 128,
        "rows_per_step": 4,
        "max_steps": 6,
        "log_every": 1,
        "checkpoint_every": 2,
        "seed": 3,
        "lr": 1e-3,
    }
    return {**base, **kw}


def one_rank(c: dict, stop_after: int | None = None) -> dict:
    from trainer.config import load_config

    return train(load_config(None, c), stop_after=stop_after)


def torchrun_cmd(c: dict, nproc: int, *args: str) -> tuple[list[str], dict]:
    path = Path(c["out"] + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(c))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(ROOT / "jobs" / "train.py"), str(path), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return cmd, env


def torchrun(c: dict, nproc: int = 2, *args: str, timeout: float = 180) -> None:
    """jobs/train.py under torchrun on 127.0.0.1; fails the test on a non-zero exit or past `timeout` (a hang)."""
    cmd, env = torchrun_cmd(c, nproc, *args)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def losses(out) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


def steps(out) -> list[int]:
    return [json.loads(ln)["step"] for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "final" / "trainable.safetensors"))


def assert_same_run(a, b) -> None:
    assert steps(a) == steps(b)
    assert losses(b) == pytest.approx(losses(a), rel=LOSS_REL)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < WEIGHT_ABS, worst


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted 1-rank run of conf(): 6 steps of 4 rows."""
    out = tmp_path_factory.mktemp("ref") / "one"
    one_rank(conf(env, out))
    return out


def test_two_ranks_train_what_one_rank_trains(env, reference, tmp_path):
    c = conf(env, tmp_path / "two")
    torchrun(c)
    assert_same_run(reference, tmp_path / "two")
    rec = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    ref = json.loads((reference / "log.jsonl").read_text().splitlines()[0])
    assert rec["label_tokens"] == ref["label_tokens"]  # global counts, logged once (rank 0)
    ck = json.loads((tmp_path / "two" / "checkpoints" / "step-6" / "state.json").read_text())
    assert ck["reader"] == json.loads((reference / "checkpoints" / "step-6" / "state.json").read_text())["reader"]


def test_two_ranks_stage_one_point_five_with_anyres(env, tmp_path):
    """Every part trains (the tower at its own lr) on AnyRes views: still the 1-rank run."""
    c = conf(env, tmp_path / "one", stage=1.5, max_steps=3, anyres={"grid_pinpoints": [[64, 128], [128, 64]]})
    one_rank(c)
    torchrun({**c, "out": str(tmp_path / "two")})
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert any(k.startswith("vision.") for k in weights(tmp_path / "two")) and "image_newline" in weights(
        tmp_path / "two"
    )


@pytest.mark.parametrize("fsdp", [False, True])
def test_uneven_steps_do_not_deadlock(env, tmp_path, fsdp):
    """11 rows, 5 a step, one row a forward, 2 epochs: shares of 3 and 2 rows (different numbers of forwards), and
    each epoch's last step holds 1 row, so rank 1 has none. Finishes (no hang) with 1 rank's losses; with FSDP the
    short rank runs zero-weighted forwards."""
    c = conf(env, tmp_path / "one", shards=[env["small"]], packing=False, rows_per_step=5, micro_rows=1)
    c.update(max_steps=None, epochs=2, checkpoint_every=100)
    one_rank(c)
    assert len(losses(tmp_path / "one")) == 6
    torchrun({**c, "out": str(tmp_path / "two"), "fsdp": fsdp}, timeout=120)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    epochs = [json.loads(ln)["epoch"] for ln in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 0, 0, 1, 1, 1]


def test_fsdp_two_ranks_match_and_resume_either_way(env, reference, tmp_path):
    """FSDP over the LM on 2 CPU ranks (gloo) trains what 1 rank trains; its checkpoint (full tensors, the
    single-process format) resumes on 1 rank without FSDP and on 2 ranks with it, and a 1-rank checkpoint resumes
    under FSDP."""
    c = conf(env, tmp_path / "fsdp_then_one", fsdp=True)
    torchrun(c, 2, "--stop-after", "3")
    assert (tmp_path / "fsdp_then_one" / "checkpoints" / "latest").read_text() == "step-2"
    shutil.copytree(tmp_path / "fsdp_then_one", tmp_path / "fsdp_then_fsdp")
    one_rank({**c, "fsdp": False})
    torchrun(conf(env, tmp_path / "fsdp_then_fsdp", fsdp=True), 2)
    one_rank(conf(env, tmp_path / "one_then_fsdp"), stop_after=3)
    torchrun(conf(env, tmp_path / "one_then_fsdp", fsdp=True), 2)
    for name in ("fsdp_then_one", "fsdp_then_fsdp", "one_then_fsdp"):
        assert_same_run(reference, tmp_path / name)


def test_resume_on_another_number_of_ranks(env, reference, tmp_path):
    """Stopped after step 3 (checkpoint at 2) on 2 ranks, resumed on 1 rank and on 2 ranks; stopped on 1 rank,
    resumed on 2: each ends where the uninterrupted run ends."""
    two = conf(env, tmp_path / "two_then_one")
    torchrun(two, 2, "--stop-after", "3")
    assert steps(tmp_path / "two_then_one") == [1, 2, 3] and not (tmp_path / "two_then_one" / "final").exists()
    shutil.copytree(tmp_path / "two_then_one", tmp_path / "two_then_two")
    one_rank(two)
    torchrun(conf(env, tmp_path / "two_then_two"), 2)
    one = conf(env, tmp_path / "one_then_two")
    one_rank(one, stop_after=3)
    torchrun(one, 2)
    for name in ("two_then_one", "two_then_two", "one_then_two"):
        assert_same_run(reference, tmp_path / name)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_sigkill_of_a_rank_then_resume(env, tmp_path):
    """SIGKILL one of torchrun's two workers once a checkpoint exists: torchrun fails, the run resumes (on 1 rank)
    from the last complete checkpoint and ends on the uninterrupted run's weights."""
    c = conf(env, tmp_path / "killed", max_steps=30, checkpoint_every=3)
    cmd, run_env = torchrun_cmd(c, 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) == 2, "the run ended before a checkpoint appeared"
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0  # torchrun stops the other rank
    assert not (tmp_path / "killed" / "final").exists()
    stopped = int(latest.read_text().strip()[5:])
    resumed = one_rank(c)
    assert resumed["resumed_from"] == stopped < 30 and resumed["finished"]
    one_rank(conf(env, tmp_path / "whole", max_steps=30, checkpoint_every=3))
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_fsdp_needs_a_process_group(env, tmp_path):
    with pytest.raises(RuntimeError, match="fsdp: needs a process group"):
        one_rank(conf(env, tmp_path / "o", fsdp=True))


def test_ray_train_two_workers(ray_session, env, reference, tmp_path, capsys):
    """jobs/train.py --ray-workers 2 on the local Ray (127.0.0.1): Ray Train's TorchTrainer sets up the gloo group
    (the workers find it up and start none) and the run is the 1-rank run."""
    from jobs.train import main

    path = tmp_path / "ray.yaml"
    path.write_text(json.dumps(conf(env, tmp_path / "ray")))
    assert main([str(path), "--ray-workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["steps"] == 6
    assert_same_run(reference, tmp_path / "ray")
