"""The openai backend and the request cache against the loopback fake OpenAI server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from curation.fixtures.llm_server import LLMServer, body_hash
from curation.synth.cache import HOST, RequestCache, key_for, run_cached
from curation.synth.openai_backend import ERROR_REASONS, OpenAIBackend
from curation.synth.types import Request, Result, run_sync

SECRET = "sk-test-SECRET-7f3a9c"
FAULTS = {
    "429": 0.12,
    "500": 0.08,
    "503": 0.04,
    "timeout": 0.04,
    "malformed": 0.06,
    "missing_choices": 0.04,
    "truncated": 0.05,
    "empty": 0.02,
    "refusal": 0.02,
}
MODEL = "fake-llm"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    """A recognisable API key in the environment, for the backend to send and never to show."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def make_requests(n: int, tag: str = "") -> list[Request]:
    """n distinct small chat requests."""
    return [
        Request(
            key=f"row-{i}",
            prompt_version="v1",
            messages=[
                {"role": "system", "content": "You describe images."},
                {"role": "user", "content": f"{tag}item {i}: a red bicycle leaning on a blue door"},
            ],
        )
        for i in range(n)
    ]


def sent_hash(req: Request) -> str:
    """The server-side hash of the body the SDK sends for `req`."""
    return body_hash({"model": MODEL, "messages": req.messages, **req.sampling.model_dump()})


def sent_counts(server: LLMServer, reqs: list[Request], before: Counter | None = None) -> list[int]:
    """How many times the server received each request's body (since `before`)."""
    before = before or Counter()
    return [server.requests[sent_hash(r)] - before[sent_hash(r)] for r in reqs]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_faults_end_in_one_result_each_and_rerun_only_retries_failures(tmp_path, transport):
    """Latency, 429, 5xx, timeouts, malformed and truncated: one result per request, bounded sends, cache reuse."""
    retries = 2
    with LLMServer(latency=0.005, faults=FAULTS, max_failures=3, stall=1.0, api_key=SECRET) as server:
        backend = OpenAIBackend(
            server.url,
            MODEL,
            concurrency=16,
            timeout=0.4,
            max_retries=retries,
            price_per_1k_prompt=1.0,
            price_per_1k_completion=2.0,
            transport=transport,
        )
        cache = RequestCache(tmp_path / "cache.sqlite")
        reqs = make_requests(150)
        first = run_cached(backend, cache, reqs)
        assert [r.key for r in first] == [r.key for r in reqs]
        for r in first:
            assert (r.text is None) == (r.error_reason is not None), r
            assert r.error_reason in (None, *ERROR_REASONS) and 1 <= r.attempts <= 1 + retries
        assert all(1 <= c <= 1 + retries for c in sent_counts(server, reqs))
        reasons = Counter(r.error_reason for r in first if not r.ok)
        assert reasons and set(reasons) <= {"rate_limited", "server_error", "timeout", "malformed_response"}
        assert any(r.finish_reason == "length" for r in first)  # truncated answers are answers, flagged
        stats = backend.stats()
        assert stats["requests"] == 150 and stats["successes"] == sum(r.ok for r in first)
        assert stats["failures"] == dict(reasons) and stats["retries"] > 0
        assert stats["cost"] == pytest.approx((stats["prompt_tokens"] + 2 * stats["completion_tokens"]) / 1000)

        before = Counter(server.requests)
        second = run_cached(backend, cache, reqs)
        again = sent_counts(server, reqs, before)
        for r1, r2, n in zip(first, second, again):
            if r1.ok:
                assert n == 0 and r2.cached and r2.text == r1.text  # successes are never sent again
            else:
                assert 1 <= n <= 1 + retries and not r2.cached  # failures are retried, and bounded
        assert sum(r.ok for r in second) > sum(r.ok for r in first)


def test_identical_requests_are_sent_once(tmp_path):
    """Two rows with the same cache key share one request."""
    with LLMServer() as server:
        reqs = make_requests(5) + [r.model_copy(update={"key": r.key + "-dup"}) for r in make_requests(5)]
        results = run_cached(OpenAIBackend(server.url, MODEL), RequestCache(tmp_path / "c.sqlite"), reqs)
        assert server.calls == 5 and [r.key for r in results] == [r.key for r in reqs]
        assert [r.text for r in results[:5]] == [r.text for r in results[5:]]


def test_key_for_is_canonical():
    """The key depends on the four things, not on dict order."""
    msgs = [{"role": "user", "content": "hi"}]
    assert key_for("v1", "m", {"temperature": 0.2, "top_p": 1.0}, msgs) == key_for(
        "v1", "m", {"top_p": 1.0, "temperature": 0.2}, [{"content": "hi", "role": "user"}]
    )
    assert (
        len(
            {
                key_for(*args, msgs)
                for args in [("v1", "m", {}), ("v2", "m", {}), ("v1", "n", {}), ("v1", "m", {"temperature": 0.7})]
            }
        )
        == 4
    )


CHILD = textwrap.dedent("""
    import sys
    from curation.synth.cache import RequestCache, run_cached
    from curation.synth.openai_backend import OpenAIBackend
    from tests.test_openai_backend import MODEL, make_requests
    backend = OpenAIBackend(sys.argv[1], MODEL, concurrency=4)
    run_cached(backend, RequestCache(sys.argv[2]), make_requests(int(sys.argv[3])))
""")


def test_cache_survives_a_kill_mid_batch(tmp_path):
    """SIGKILL mid-batch; the rerun sends only what was not answered before the kill; results match a clean run."""
    n, conc = 120, 4
    reqs = make_requests(n)
    with LLMServer(latency=0.03) as server:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, server.url, str(tmp_path / "c.sqlite"), str(n)], cwd=root, env=env
        )
        deadline = time.monotonic() + 20
        while server.calls < 40 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert 40 <= server.calls < n, "the child was not killed mid-batch"

        cache = RequestCache(tmp_path / "c.sqlite")
        done = cache.get_many(key_for("v1", MODEL, r.sampling, r.messages) for r in reqs)
        answered = [r for r in reqs if key_for("v1", MODEL, r.sampling, r.messages) in done]
        assert len(answered) >= 40 - conc
        before = Counter(server.requests)
        results = run_cached(OpenAIBackend(server.url, MODEL, concurrency=4), cache, reqs)
        assert sent_counts(server, answered, before) == [0] * len(answered)
        assert server.calls - sum(before.values()) == n - len(answered)
        assert max(server.requests.values()) <= 2 and sum(c == 2 for c in server.requests.values()) <= conc
        clean = run_cached(OpenAIBackend(server.url, MODEL), RequestCache(tmp_path / "clean.sqlite"), reqs)
        assert [(r.key, r.text, r.finish_reason) for r in results] == [(r.key, r.text, r.finish_reason) for r in clean]


def test_concurrency_is_bounded():
    """The server never sees more than `concurrency` requests in flight."""
    with LLMServer(latency=0.02) as server:
        results = OpenAIBackend(server.url, MODEL, concurrency=6).run(make_requests(60))
        assert all(r.ok for r in results)
        assert 1 < server.max_in_flight <= 6


def test_api_key_never_shown():
    """The key is sent (the server checks it) but absent from repr, errors and stats."""
    with LLMServer(api_key=SECRET, faults={"500": 1.0}, max_failures=5) as server:
        backend = OpenAIBackend(server.url, MODEL, max_retries=1)
        results = backend.run(make_requests(3))
        assert [r.error_reason for r in results] == ["server_error"] * 3 and server.calls == 6
    with LLMServer(api_key="another-key") as server:  # 401: not retried, the key not echoed
        wrong = backend.__class__(server.url, MODEL, max_retries=3).run(make_requests(2))
        assert [(r.error_reason, r.attempts) for r in wrong] == [("bad_request", 1)] * 2 and server.calls == 2
    closed = [
        OpenAIBackend("http://127.0.0.1:9/v1", MODEL, max_retries=0, timeout=2, transport=t).run(make_requests(1))[0]
        for t in ("aiohttp", "httpx")
    ]  # nothing listens on port 9
    assert [r.error_reason for r in closed] == ["connection_error"] * 2
    shown = [repr(backend), str(backend.stats()), *(r.model_dump_json() for r in results + wrong + closed)]
    assert all(SECRET not in s for s in shown)
    assert "api_key" not in vars(backend) and SECRET not in repr(vars(backend))


def test_run_works_inside_a_running_loop():
    """`run` is usable from code that already runs an event loop."""
    with LLMServer() as server:
        backend = OpenAIBackend(server.url, MODEL)

        async def inner():
            return backend.run(make_requests(3))

        assert all(r.ok for r in run_sync(inner()))


TWIN = textwrap.dedent("""
    import json, sys
    from curation.synth.cache import RequestCache, run_cached
    from curation.synth.openai_backend import OpenAIBackend
    from tests.test_openai_backend import MODEL, make_requests
    reqs = make_requests(int(sys.argv[3]))
    reqs = reqs[::-1] if sys.argv[4] == "reversed" else reqs  # the two workers meet from both ends
    results = run_cached(OpenAIBackend(sys.argv[1], MODEL, concurrency=4), RequestCache(sys.argv[2]), reqs)
    print(json.dumps(sorted((r.key, r.text) for r in results)))
""")


def test_two_workers_with_the_same_requests_ask_each_once(tmp_path):
    """Two processes sharing a cache, the same 40 requests in opposite orders: every body answered exactly once (the
    claims make the second worker wait for the first's answer), both get every result, the same texts."""
    n = 40
    with LLMServer(latency=0.05) as server:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        args = [sys.executable, "-c", TWIN, server.url, str(tmp_path / "c.sqlite"), str(n)]
        procs = [
            subprocess.Popen([*args, order], cwd=root, env=env, stdout=subprocess.PIPE, text=True)
            for order in ("forward", "reversed")
        ]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        assert sent_counts(server, make_requests(n)) == [1] * n
        assert outs[0] == outs[1] and len(outs[0]) == n and all(text for _, text in outs[0])
    assert RequestCache(tmp_path / "c.sqlite").claimed_by_others(list(range(n)), "nobody") == set()


def test_claims_of_others_are_waited_for_and_lapse(tmp_path):
    """A key another live worker claimed is not sent: its answer is taken from the cache when it lands, and a key whose
    claim is released unanswered (the other's request failed) is sent; claims of a dead process or with an expired
    lease are taken over at once."""
    reqs = make_requests(8)
    keys = [key_for(r.prompt_version, MODEL, r.sampling, r.messages) for r in reqs]
    cache = RequestCache(tmp_path / "c.sqlite")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache.claim(keys[:2], f"{HOST}:{int(dead.stdout)}:x", lease=300)  # its process is gone
    cache.claim(keys[2:4], "elsewhere:1:x", lease=-1)  # another host's lease ran out
    cache.claim(keys[4:], "elsewhere:2:y", lease=300)  # another host, working on it
    with LLMServer(latency=0.02) as server:
        box: dict = {}
        worker = threading.Thread(
            target=lambda: box.update(out=run_cached(OpenAIBackend(server.url, MODEL), cache, reqs))
        )
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive() and sent_counts(server, reqs) == [1, 1, 1, 1, 0, 0, 0, 0]
        other = RequestCache(tmp_path / "c.sqlite")
        for k in keys[4:6]:  # the other worker's answers land ...
            other.put(k, Result(key=k, text=f"from the other worker {k[:6]}", finish_reason="stop"))
        other.release("elsewhere:2:y")  # ... and its two failures are released
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert sent_counts(server, reqs) == [1, 1, 1, 1, 0, 0, 1, 1]
    out = box["out"]
    assert [r.cached for r in out] == [False] * 4 + [True] * 2 + [False] * 2
    assert out[4].text.startswith("from the other worker") and all(r.ok for r in out)
