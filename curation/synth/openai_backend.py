"""The `openai` backend: any OpenAI-compatible chat server, async, bounded concurrency, retries, usage and cost."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx2  # the SDK's own HTTP library (openai >= 3 ships on httpx2)
import openai

from curation.synth.types import Request, Result, Usage, count_result, run_sync

ERROR_REASONS = ("rate_limited", "server_error", "timeout", "malformed_response", "connection_error", "bad_request")
PLACEHOLDER_KEY = "EMPTY"  # what a local `vllm serve` without --api-key accepts


class _Malformed(Exception):
    """A 200 response without a usable chat completion."""


def _parse(resp: httpx2.Response) -> tuple[str, str | None, Usage]:
    """Text, finish_reason and usage of a chat completion body; `_Malformed` when it has none."""
    try:
        data = resp.json()
        choice = data["choices"][0]
        text = choice["message"]["content"]
        usage = Usage.model_validate(data.get("usage") or {}, strict=False)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _Malformed(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):
        raise _Malformed("choice without message content")
    return text, choice.get("finish_reason"), usage


def _reason(exc: BaseException) -> str:
    """The reason code of an exception the SDK raised after its own retries."""
    if isinstance(exc, openai.APITimeoutError):
        return "connection_error" if _refused(exc) else "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.APIStatusError):
        return "server_error" if exc.status_code >= 500 or exc.status_code in (408, 409) else "bad_request"
    if isinstance(exc, (_Malformed, openai.APIResponseValidationError, ValueError)):
        return "malformed_response"
    return "connection_error"


def _refused(exc: BaseException | None) -> bool:
    """A connect failure under a timeout label (the SDK's aiohttp transport maps refused connects to ConnectTimeout)."""
    while exc is not None:
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _retryable(reason: str) -> bool:
    """Whether the SDK retried this kind of failure (so the whole retry budget was spent)."""
    return reason != "bad_request"


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible endpoint; the API key is read from the env when a run starts."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 5,
        price_per_1k_prompt: float = 0.0,
        price_per_1k_completion: float = 0.0,
        transport: str = "aiohttp",
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or transport not in ("httpx", "aiohttp"):
            raise ValueError("concurrency must be >= 1, max_retries >= 0, timeout > 0, transport httpx or aiohttp")
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.price_per_1k_prompt, self.price_per_1k_completion = price_per_1k_prompt, price_per_1k_completion
        self.transport = transport  # aiohttp: the SDK's DefaultAioHttpClient (needs `openai[aiohttp]`)
        self._stats: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._wall = 0.0

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"concurrency={self.concurrency}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"transport={self.transport!r})"
        )

    def _key(self) -> str:
        """The API key from the environment (never stored on the object, so it is never pickled or printed)."""
        return os.environ.get(self.api_key_env) or PLACEHOLDER_KEY

    def _scrub(self, text: str) -> str:
        """`text` with the API key blanked out, should a server echo it back."""
        key = self._key()
        return text.replace(key, "***") if key != PLACEHOLDER_KEY else text

    def _client(self) -> openai.AsyncOpenAI:
        """A client for this event loop; its keep-alive pool holds all `concurrency` connections."""
        http = None
        if self.transport == "aiohttp":
            http = openai.DefaultAioHttpClient()
        elif self.concurrency > 100:  # the SDK keeps 100 alive by default: more would reconnect per request
            http = openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            )
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._key(),
            timeout=self.timeout,
            max_retries=self.max_retries,
            http_client=http,
        )

    async def _one(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore, req: Request) -> Result:
        """Send one request (SDK retries for 429/5xx/timeouts/connection errors, ours for malformed bodies)."""
        body = {"model": self.model, "messages": req.messages, **req.sampling.model_dump()}
        attempts, budget = 0, self.max_retries
        while True:
            try:
                # the SDK's documented low-level `post`: its retries, timeouts and errors, without the typed
                # request transform and response model (~1.5 ms CPU per request, the client's main cost)
                async with sem:
                    resp = await client.post(
                        "/chat/completions", body=body, cast_to=httpx2.Response, options={"max_retries": budget}
                    )
                used = int(resp.request.headers.get("x-stainless-retry-count", 0)) + 1
                attempts, budget = attempts + used, budget - used
                text, finish, usage = _parse(resp)
                return Result(key=req.key, text=text, finish_reason=finish, usage=usage, attempts=attempts)
            except _Malformed as exc:
                if budget >= 0:
                    continue
                return self._error(req, "malformed_response", str(exc), attempts)
            except Exception as exc:  # the SDK gave up: classify, never raise
                reason = _reason(exc)
                attempts += budget + 1 if _retryable(reason) else 1
                return self._error(req, reason, f"{type(exc).__name__}: {exc}", attempts)

    def _error(self, req: Request, reason: str, detail: str, attempts: int) -> Result:
        """A failed Result with a scrubbed, bounded detail."""
        return Result(key=req.key, error_reason=reason, error_detail=self._scrub(detail)[:500], attempts=attempts)

    def _count(self, result: Result) -> None:
        """Add one result to the run's usage."""
        self._stats["retries"] += max(result.attempts - 1, 0)
        count_result(self._stats, self._failures, result)

    async def generate(
        self, requests: list[Request], on_result: Callable[[Result], None] | None = None
    ) -> list[Result]:
        """One Result per request, in request order; `on_result` sees each as soon as it finishes."""
        start = time.perf_counter()
        sem = asyncio.Semaphore(self.concurrency)
        client = self._client()

        async def task(req: Request) -> Result:
            result = await self._one(client, sem, req)
            self._count(result)
            if on_result is not None:
                on_result(result)
            return result

        try:
            return list(await asyncio.gather(*(task(r) for r in requests)))
        finally:
            await client.close()
            self._wall += time.perf_counter() - start

    def run(self, requests: list[Request], on_result: Callable[[Result], None] | None = None) -> list[Result]:
        """`generate` from synchronous code (a Ray actor, a script)."""
        return run_sync(self.generate(requests, on_result))

    def stats(self) -> dict[str, Any]:
        """Usage of this backend so far: requests, successes, failures by reason, tokens, cost, retries, wall."""
        s = self._stats
        cost = (
            s["prompt_tokens"] * self.price_per_1k_prompt + s["completion_tokens"] * self.price_per_1k_completion
        ) / 1000
        return {
            "model": self.model,
            "requests": s["requests"],
            "successes": s["successes"],
            "failures": dict(self._failures),
            "prompt_tokens": s["prompt_tokens"],
            "completion_tokens": s["completion_tokens"],
            "cost": round(cost, 6),
            "retries": s["retries"],
            "wall_s": round(self._wall, 3),
        }
