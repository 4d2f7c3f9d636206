"""Faults: kill -9 during generation and between stages, a full disk, an unwritable run dir; then the same rows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.engine.config import load_pipeline
from curation.engine.driver import run_pipeline
from curation.engine.store import StageDir
from tests.conftest import ROOT, kill_ray_started_with
from tests.faults_util import DEMO, curate_run, kill_when, markers, snapshot

UPSTREAM = ["ingest", "dedup", "filter", "embed", "match_concepts", "balance"]
SYNTH = ["recaption", "conversation", "detail", "reasoning", "short_answer"]


def _llm(url: str, cache: Path) -> list[str]:
    """The conversation stage on the openai backend, against the loopback server, with its own request cache."""
    return [
        "conversation.backend=openai",
        f"conversation.base_url={url}",
        "conversation.model=fake-llm",
        "conversation.api_key_env=UNSET_TEST_KEY",
        "conversation.concurrency=4",
        f"conversation.cache={cache}",
    ]


@pytest.mark.slow
def test_kill_during_generation_resumes_without_paying_twice(reference, tmp_path):
    from curation.fixtures.llm_server import LLMServer
    from curation.synth.cache import RequestCache

    with LLMServer(latency=0.3) as server:
        ref = reference.copy(tmp_path / "ref", UPSTREAM + SYNTH)  # a finished run whose conversation stage changes
        run_pipeline(load_pipeline(DEMO, [*reference.overrides, *_llm(server.url, tmp_path / "ref.sqlite")]), ref)
        paid = server.calls  # requests an uninterrupted run sends

        server.reset_counts()
        run = reference.copy(tmp_path / "run", UPSTREAM + SYNTH)
        cache = tmp_path / "run.sqlite"
        overrides = [*reference.overrides, *_llm(server.url, cache)]

        # killed with requests in flight, once a part of the stage with rows in it is committed (an empty part
        # commits without a request: killing after it alone would leave nothing answered)
        def answered_part() -> bool:
            return any(json.loads(m.read_text()).get("rows_in", 0) > 0 for m in markers(run, "conversation"))

        kill_when(run, overrides, lambda: answered_part() and server.in_flight > 0)
        assert not (run / "conversation" / "_manifest.json").exists(), "the stage finished before the kill"
        sent = server.calls
        answered = len(RequestCache(cache))  # answers committed before the kill
        assert 0 < answered < paid and sent >= answered

        server.reset_counts()
        manifests = run_pipeline(load_pipeline(DEMO, overrides), run)
        print(f"requests: {paid} uninterrupted; {sent} before the kill, {answered} committed; {server.calls} on resume")
        assert server.calls == paid - answered  # every committed answer is reused, only the rest is sent
        assert manifests["conversation"]["status"] == "complete"
    assert snapshot(run) == snapshot(ref)
    assert snapshot(run, UPSTREAM) == {s: reference.rows[s] for s in UPSTREAM}


@pytest.mark.slow
def test_kill_between_stages_resumes_at_the_next_stage(reference, tmp_path):
    run = reference.copy(tmp_path / "run", UPSTREAM)  # a run killed after balance, resumed: it goes on at recaption
    kill_when(run, reference.overrides, lambda: (run / "recaption" / "_manifest.json").exists())
    assert json.loads((run / "recaption" / "_manifest.json").read_text())["status"] == "complete"
    assert not markers(run, "conversation"), "the kill came after the next stage had begun"
    log: list[tuple] = []
    manifests = run_pipeline(load_pipeline(DEMO, reference.overrides), run, progress=lambda *a: log.append(a))
    phases = {s: p for s, _, _, p in log}
    assert phases["recaption"] == "skipped" and phases["conversation"] == "process"
    assert all(m["status"] == "complete" for m in manifests.values())
    assert snapshot(run) == reference.rows


def _parts_are_sound(run: Path) -> None:
    """No temp file left; every committed part's files match its marker; every part file reads."""
    assert not list(run.rglob(".*.tmp-*")), "a partial temp file was left behind"
    for marker in run.glob("*/_parts/process/*.json"):
        m, stage = json.loads(marker.read_text()), marker.parents[2]
        assert hashlib.sha256((stage / f"{marker.stem}.parquet").read_bytes()).hexdigest() == m["sha256"]
        assert (
            hashlib.sha256((stage / "rejects" / f"{marker.stem}.parquet").read_bytes()).hexdigest()
            == m["rejects_sha256"]
        )
    for part in run.glob("*/part-*.parquet"):
        pq.read_table(part)


def _curate(run: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """`curate run` as a user runs it (wide console: the message is asserted on one line)."""
    cmd = [sys.executable, "-m", "curation.cli", "run", str(DEMO), "--run-dir", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "COLUMNS": "1000", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-f-")}
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_ray_started_with(env["RAY_TMPDIR"])


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def disk(tmp_path):
    """A 64 MiB tmpfs (shrunk by the test), unmounted afterwards; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {getattr(e, 'stderr', e)}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_disk_then_read_only_disk_fail_clearly_and_the_fixed_rerun_matches(reference, disk, tmp_path):
    run = reference.copy(disk / "run", UPSTREAM[:3])  # ingest, dedup and filter done; embed onward still to write
    used = os.statvfs(disk)
    used = (used.f_blocks - used.f_bfree) * used.f_frsize
    _mount("-o", f"remount,size={used + 700 * 1024}", str(disk))  # room for embed and match_concepts, not balance

    res = _curate(run, reference.overrides)
    err = res.stdout + res.stderr
    assert res.returncode == 2, err[-3000:]
    assert "No space left on device" in err and "the disk is full" in err and str(run) in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    incomplete = [s for s in UPSTREAM + SYNTH if (StageDir(run, s).manifest() or {}).get("status") != "complete"]
    assert incomplete[0] in UPSTREAM[3:], incomplete  # it filled up after filter, before the synthesis stages
    _parts_are_sound(run)

    _mount("-o", "remount,ro", str(disk))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = _curate(run, reference.overrides)
    err = res.stdout + res.stderr
    assert res.returncode == 2 and "Read-only file system" in err and str(run) in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    _mount("-o", "remount,rw,size=64m", str(disk))  # the problem fixed: the rerun resumes and matches
    manifests = run_pipeline(load_pipeline(DEMO, reference.overrides), run)
    assert all(m["status"] == "complete" for m in manifests.values())
    assert snapshot(run) == reference.rows


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_run_dir_is_a_clear_error(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    run = blocker / "run" if where == "under_a_file" else blocker
    res = _curate(run, [])
    err = res.stdout + res.stderr
    assert res.returncode == 2, err[-3000:]
    assert "Traceback" not in err and str(run) in err and "not a directory" in err.lower(), err[-3000:]
    assert blocker.read_text() == "a file, not a directory"


def test_a_write_that_fills_the_disk_leaves_no_temp_file_and_says_so(disk):
    from curation.engine.store import atomic_write_bytes, storage_error

    _mount("-o", "remount,size=256k", str(disk))
    atomic_write_bytes(disk / "small.bin", b"x" * 1000)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(disk / "part" / "big.bin", b"x" * 2**20)
    assert "No space left on device" in storage_error(e.value) and str(disk / "part" / "big.bin") in storage_error(
        e.value
    )
    assert sorted(p.name for p in disk.rglob("*") if p.is_file()) == ["small.bin"]
    assert storage_error(ValueError("bad row")) is None and storage_error(FileNotFoundError(2, "gone", "x")) is None


def _ingest_pipeline(tmp_path: Path, web_dir: Path) -> Path:
    """An ingest-only DAG over the session's fixture web, one part (img2dataset flushes every 100 rows)."""
    path = tmp_path / "ingest.yaml"
    params = {"urls": str(web_dir / "urls.parquet"), "allow_loopback": True, "shard_size": 120, "timeout": 5}
    path.write_text(json.dumps({"name": "ingest-only", "stages": {"ingest": {"op": "ingest", "params": params}}}))
    return path


def _same_ingest(run: Path, ref: Path) -> None:
    """The ingest rows and rejects of `run` are the reference's, but for the web's /flaky/ URLs (503 to their first
    request, which the reference made)."""
    got, want = snapshot(run, ["ingest"])["ingest"], snapshot(ref, ["ingest"])["ingest"]
    flaky = {r["uid"] for r in got[0] + want[0] if "/flaky/" in r["url"]}
    flaky |= {r["uid"] for r in got[1] + want[1] if r["reason"] == "http_503"}
    assert [r for r in got[0] if r["uid"] not in flaky] == [r for r in want[0] if r["uid"] not in flaky]
    assert [r for r in got[1] if r["uid"] not in flaky] == [r for r in want[1] if r["uid"] not in flaky]
    assert len(got[0]) + len(got[1]) == len(want[0]) + len(want[1])


def _curate_run(pipeline: Path, run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-f-")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "curation.cli", "run", str(pipeline), "--run-dir", str(run)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_ray_started_with(env["RAY_TMPDIR"])


@pytest.mark.slow
def test_disk_that_fills_during_ingest_stops_clearly_and_the_rerun_resumes(disk, tmp_path):
    """img2dataset catches a sample's write error and goes on: the shard's writer notes it and the part fails with
    it, so a full disk is exit 2 and one line naming the path, never rows quietly missing. Its own web: the
    session's flaky URL must keep its first 503 for tests/test_pipeline.py."""
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    make_web(tmp_path / "web", n=120, port=free_port(), seed=2)
    pipeline = _ingest_pipeline(tmp_path, tmp_path / "web")
    with WebServer(tmp_path / "web"):
        ref = _curate_run(pipeline, tmp_path / "ref")
        assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]
        run = disk / "run"
        st = os.statvfs(disk)
        ballast = disk / "ballast"
        part = sum(f.stat().st_size for f in (tmp_path / "ref" / "ingest").glob("part-*.parquet"))
        ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - part // 2))  # room for half of img2dataset's shard
        res = _curate_run(pipeline, run)
        err = res.stdout + res.stderr
        assert res.returncode == 2, err[-3000:]
        assert "No space left on device" in err and "the disk is full" in err, err[-3000:]
        assert str(run / "ingest" / "_work" / "dl-part-00000") in err, err[-3000:]  # where it filled: the download
        assert "Traceback" not in err, err[-3000:]
        _parts_are_sound(run)
        assert not list(run.rglob("dl-part-*")), "img2dataset's partial shard was left on the full disk"
        assert (StageDir(run, "ingest").manifest() or {}).get("status") != "complete"
        ballast.unlink()  # space freed: the rerun resumes and gets the rows of the run on a roomy disk
        res = _curate_run(pipeline, run)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        _same_ingest(run, tmp_path / "ref")


def _interrupt(pipeline: Path, run: Path, sig: int, after_parts: int) -> tuple[int, str, float]:
    """`curate run` sent `sig` once `after_parts` parts of ingest are committed: (exit code, stderr, seconds it took
    to stop)."""
    env = {**os.environ, "COLUMNS": "1000", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-f-")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "curation.cli", "run", str(pipeline), "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(run.glob("ingest/_parts/process/*.json"))) < after_parts and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the signal"
        sent = time.monotonic()
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=120)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        proc.kill()
        kill_ray_started_with(env["RAY_TMPDIR"])


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_soon_keep_finished_parts_and_say_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C), then on the rerun SIGTERM (`ray job stop`), to `curate run` mid-ingest: each stops within
    seconds with exit 130 and the command that resumes; parts finished before are kept as they were, and the last
    rerun completes with an uninterrupted run's rows."""
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    make_web(tmp_path / "web", n=120, port=free_port(), seed=1)
    pipeline = _ingest_pipeline(tmp_path, tmp_path / "web")
    params = json.loads(pipeline.read_text())
    params["stages"]["ingest"]["params"].update(shard_size=12, thread_count=2)  # 10 parts of ~2 s each
    pipeline.write_text(json.dumps(params))
    run = tmp_path / "run"
    with WebServer(tmp_path / "web", delay=0.3):
        ref = _curate_run(pipeline, tmp_path / "ref")
        assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]
        kept: dict[str, bytes] = {}
        for sig, after in ((signal.SIGINT, 1), (signal.SIGTERM, 3)):
            code, err, stopped = _interrupt(pipeline, run, sig, after)
            assert code == 130, err[-3000:]
            assert f"resume with: curate run {pipeline} --run-dir {run}" in err, err[-3000:]
            assert "Traceback" not in err, err[-3000:]
            assert stopped < 30, stopped  # seconds, not the rest of the run
            _parts_are_sound(run)
            now = {m.name: m.read_bytes() for m in run.glob("ingest/_parts/process/*.json")}
            assert all(now[name] == data for name, data in kept.items())  # the parts before: kept as they were
            kept = now
        assert 0 < len(kept) < 10
        res = _curate_run(pipeline, run)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert all((run / "ingest/_parts/process" / name).read_bytes() == data for name, data in kept.items())
    _same_ingest(run, tmp_path / "ref")


def _ray_workers(tmp: str) -> list[int]:
    """PIDs of the worker processes (ray::...) of the Ray instance started with RAY_TMPDIR=tmp."""
    needle, pids = f"RAY_TMPDIR={tmp}".encode(), []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                title = (env.parent / "cmdline").read_bytes()
                if title.startswith(b"ray::") and (b"MapWorker" in title or b"MapBatches" in title):
                    pids.append(int(env.parent.name))
        except (OSError, ValueError):
            pass
    return pids


@pytest.mark.slow
def test_workers_killed_mid_stage_are_retried_with_nothing_lost_or_counted_twice(reference, tmp_path):
    """One run; in ingest, embed and the (openai-backed) conversation stage, SIGKILL of one Ray worker (not the
    driver) once the stage has committed a part and has more to do: Ray runs the lost part again, and the run
    completes with the uninterrupted run's rows and counts, no partial part, nothing twice."""
    from curation.fixtures.llm_server import LLMServer

    order = UPSTREAM + SYNTH
    with LLMServer(latency=0.2) as server:
        ref = reference.copy(tmp_path / "ref", order)  # the reference, its conversation stage on the openai backend
        run_pipeline(load_pipeline(DEMO, [*reference.overrides, *_llm(server.url, tmp_path / "r.sqlite")]), ref)
        run = tmp_path / "run"
        proc, env = curate_run(run, [*reference.overrides, *_llm(server.url, tmp_path / "c.sqlite")])
        killed: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 600
            for stage in ("ingest", "embed", "conversation"):
                while time.monotonic() < deadline and proc.poll() is None and stage not in killed:
                    if markers(run, stage) and not (run / stage / "_manifest.json").exists():
                        workers = _ray_workers(env["RAY_TMPDIR"])
                        if workers:
                            os.kill(workers[0], signal.SIGKILL)
                            killed[stage] = workers[0]
                    time.sleep(0.02)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            kill_ray_started_with(env["RAY_TMPDIR"])
    assert set(killed) == {"ingest", "embed", "conversation"}, killed
    assert rc == 0, f"the run did not complete after its workers were killed (exit {rc})"
    _parts_are_sound(run)
    assert snapshot(run) == snapshot(ref)  # the same rows and rejects, each once (snapshot checks unique uids)
    counts = {s: json.loads((run / s / "_manifest.json").read_text())["counts"] for s in order}
    assert counts == {s: json.loads((ref / s / "_manifest.json").read_text())["counts"] for s in order}
