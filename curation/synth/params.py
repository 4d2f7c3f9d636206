"""How a synthesis stage reaches its model: the params recaption and instruct share."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from curation import PROMPTS
from curation.ops.base import Params
from curation.synth.vllm_backend import VLLMEngine


class LLMParams(Params):
    """How a synthesis stage reaches its model; the real default is a GPT-class API."""

    backend: Literal["openai", "vllm", "rules"] = Field(
        "openai",
        description="openai: any OpenAI-compatible server (GPT-class APIs, `vllm serve`); vllm: an "
        "in-process vLLM engine per Ray actor (GPU workers); rules: offline templates over the boxes",
    )
    prompts: str | None = Field(None, description="prompt folder; default the packaged prompts/<task>")
    model: str = Field(
        "gpt-4o-mini",
        description="the API's model name; for backend vllm the checkpoint folder or a name in the local HF cache",
    )
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = Field("OPENAI_API_KEY", description="the environment variable holding the key (never the key)")
    concurrency: int = Field(16, ge=1, description="requests in flight per worker")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(5, ge=0, description="retries with backoff on 429, 5xx, timeouts")
    price_per_1k_prompt: float = Field(0.0, ge=0)
    price_per_1k_completion: float = Field(0.0, ge=0)
    cache: str | None = Field(None, description="request cache (SQLite); default $CURATION_CACHE/llm.sqlite")
    reask: int = Field(1, ge=0, description="re-asks after an invalid output")
    annotations: str | None = Field(
        None,
        description="Parquet of url, objects [{category, color, box}] (+ width, "
        "height when boxes are in pixels), or a COCO instances_*.json (read_coco's images): LLaVA's boxes",
    )
    vllm: VLLMEngine | None = Field(
        None,
        description="engine arguments for backend vllm (dtype, max_model_len, "
        "gpu_memory_utilization, tensor_parallel_size, limit_mm_per_prompt, ...)",
    )

    @model_validator(mode="after")
    def _vllm_settings(self):
        if self.backend == "vllm" and "model" not in self.model_fields_set:
            raise ValueError("backend vllm needs `model`: a checkpoint folder (or a name in the local HF cache)")
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"`vllm` engine settings are for backend vllm, not {self.backend}")
        return self

    ADDED_LATER: ClassVar[dict] = {"vllm": None}

    @property
    def in_process_model(self) -> bool:
        """Whether a worker holds the model itself (an actor pool then builds the engine once per actor)."""
        return self.backend == "vllm"

    def prompt_dir(self, task: str) -> Path:
        return Path(self.prompts) if self.prompts else PROMPTS / task

    def cache_path(self) -> Path:
        """The request cache's SQLite file."""
        if self.cache:
            return Path(self.cache)
        from curation.concepts.embeddings import default_cache_dir  # imports faiss: set `cache` to avoid it

        return default_cache_dir() / "llm.sqlite"
