"""Backend-neutral synthesis types: a Request, its Result, the Backend protocol every backend meets, an Outcome."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field

from curation.synth.prompts import Sampling

T = TypeVar("T")


class Request(BaseModel):
    """One chat completion to make; `key` names it in the results (e.g. uid + task)."""

    key: str
    messages: list[dict[str, Any]]
    sampling: Sampling = Field(default_factory=Sampling)
    prompt_version: str = ""


class Usage(BaseModel):
    """Token counts the server reported."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Result(BaseModel):
    """What became of one request: text and finish_reason, or an error reason code; never both."""

    key: str
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    error_reason: str | None = None
    error_detail: str | None = None
    attempts: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        """True when the server answered with a completion."""
        return self.error_reason is None


class Backend(Protocol):
    """What the request cache and the client need of a backend (openai, vllm)."""

    model: str

    async def generate(
        self, requests: list[Request], on_result: Callable[[Result], None] | None = None
    ) -> list[Result]:
        """One Result per request, in request order; `on_result` sees each as soon as it finishes."""
        ...

    def stats(self) -> dict[str, Any]:
        """Usage so far: requests, successes, failures by reason, tokens, cost, retries."""
        ...


@dataclass
class Outcome:
    """One image's result: turns, or a reject reason with detail."""

    turns: list[dict] | None
    reason: str | None = None
    detail: str | None = None


def count_result(stats: Counter, failures: Counter, result: Result) -> None:
    """Add one result to a backend's usage counters (shared by the openai and vllm backends)."""
    stats["requests"] += 1
    if result.ok:
        stats["successes"] += 1
        stats["prompt_tokens"] += result.usage.prompt_tokens
        stats["completion_tokens"] += result.usage.completion_tokens
    else:
        failures[result.error_reason] += 1


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, in a fresh thread if this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
