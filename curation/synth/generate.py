"""Shared by recaption and instruct: backend params, annotations, and one LLM round trip per image with a bounded re-ask."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow.parquet as pq
from pydantic import Field, model_serializer, model_validator

from curation.ops.base import Params
from curation.synth.parse import parse_and_check
from curation.synth.prompts import PromptSet, render_context
from curation.synth.vllm_backend import VLLMEngine

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"  # the repository's versioned prompt folders
REASK = ("Your previous answer could not be used ({reason}). Answer again, following exactly the output format "
         "asked for above.")


class LLMParams(Params):
    """How a synthesis stage reaches its model; the real default is a GPT-class API."""

    backend: Literal["openai", "vllm", "rules"] = Field(
        "openai", description="openai: any OpenAI-compatible server (GPT-class APIs, `vllm serve`); vllm: an "
        "in-process vLLM engine per Ray actor (GPU workers); rules: offline templates over the boxes")
    prompts: str | None = Field(None, description="prompt folder; default the repository's prompts/<task>")
    model: str = Field("gpt-4o-mini", description="the API's model name; for backend vllm the checkpoint folder or "
                       "a name in the local HF cache")
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = Field("OPENAI_API_KEY", description="the environment variable holding the key (never the key)")
    concurrency: int = Field(16, ge=1, description="requests in flight per worker")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(5, ge=0, description="retries with backoff on 429, 5xx, timeouts")
    price_per_1k_prompt: float = Field(0.0, ge=0)
    price_per_1k_completion: float = Field(0.0, ge=0)
    cache: str | None = Field(None, description="request cache (SQLite); default $CURATION_CACHE/llm.sqlite")
    reask: int = Field(1, ge=0, description="re-asks after an invalid output")
    annotations: str | None = Field(None, description="Parquet of url, objects [{category, color, box}] (+ width, "
                                    "height when boxes are in pixels): LLaVA's boxes")
    vllm: VLLMEngine | None = Field(None, description="engine arguments for backend vllm (dtype, max_model_len, "
                                    "gpu_memory_utilization, tensor_parallel_size, limit_mm_per_prompt, ...)")

    @model_validator(mode="after")
    def _vllm_settings(self):
        if self.backend == "vllm" and "model" not in self.model_fields_set:
            raise ValueError("backend vllm needs `model`: a checkpoint folder (or a name in the local HF cache)")
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"`vllm` engine settings are for backend vllm, not {self.backend}")
        return self

    # Fields added after the first release, left out of the dump while at these defaults: so a stage's config hash
    # (and so its cached parts) stays what it was before them.
    LATER_DEFAULTS: ClassVar[dict] = {"vllm": None}

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler):
        data = handler(self)
        for key, default in self.LATER_DEFAULTS.items():
            if key in data and data[key] == default:
                del data[key]
        return data

    @property
    def in_process_model(self) -> bool:
        """Whether a worker holds the model itself (then the stage runs as an actor pool, the engine built once each)."""
        return self.backend == "vllm"

    def prompt_dir(self, task: str) -> Path:
        return Path(self.prompts) if self.prompts else PROMPTS / task


def cache_path(params: LLMParams) -> Path:
    if params.cache:
        return Path(params.cache)
    from curation.concepts import default_cache_dir  # imports faiss: a vLLM worker with `cache` set needs none

    return default_cache_dir() / "llm.sqlite"


@dataclass
class Annotations:
    """Normalised boxes per url, and the categories and colours seen (what rules may ask about)."""

    objects: dict[str, list[dict]]
    vocab: dict[str, list[str]]

    @classmethod
    def load(cls, path: str | None) -> Annotations:
        if path is None:
            return cls({}, {})
        t = pq.read_table(path)
        if not {"url", "objects"} <= set(t.column_names):
            raise ValueError(f"{path}: annotations need columns url and objects [{{category, color, box}}]")
        sized = {"width", "height"} <= set(t.column_names)
        objects, cats, colors = {}, set(), set()
        for row in t.to_pylist():
            w, h = (row["width"], row["height"]) if sized else (1, 1)
            objs = [{"category": o["category"], "color": o.get("color"),
                     "box": [o["box"][0] / w, o["box"][1] / h, o["box"][2] / w, o["box"][3] / h]} for o in row["objects"] or []]
            objects[row["url"]] = objs
            cats |= {o["category"] for o in objs}
            colors |= {o["color"] for o in objs if o["color"]}
        return cls(objects, {"category": sorted(cats), "color": sorted(colors)})

    def boxes(self, url: str) -> list[tuple[str, list[float]]]:
        return [(o["category"], o["box"]) for o in self.objects.get(url, [])]


def image_message(messages: list[dict], image: bytes) -> list[dict]:
    """The query turn with the image attached (OpenAI vision format), for a VLM."""
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    last = messages[-1]
    return messages[:-1] + [{"role": "user", "content": [{"type": "text", "text": last["content"]},
                                                           {"type": "image_url", "image_url": {"url": url}}]}]


@dataclass
class Outcome:
    """One image's result: turns, or a reject reason with detail."""

    turns: list[dict] | None
    reason: str | None = None
    detail: str | None = None


class LLMClient:
    """The openai or vllm backend behind the request cache; usage is kept per part for the stage report."""

    def __init__(self, params: LLMParams):
        from curation.synth.cache import RequestCache

        self.params = params
        if params.backend == "vllm":
            from curation.synth.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(params.model, params.vllm)
        else:
            from curation.synth.openai_backend import OpenAIBackend

            self.backend = OpenAIBackend(params.base_url, params.model, params.api_key_env, params.concurrency,
                                         params.timeout, params.max_retries, params.price_per_1k_prompt,
                                         params.price_per_1k_completion)
        self.cache = RequestCache(cache_path(params))
        self.cached = 0
        self._reported: dict = {}

    def outcomes(self, prompt: PromptSet, keys: list[str], messages: list[list[dict]], kind: str,
                 lang: str | None = None) -> list[Outcome]:
        """Ask once per image, then re-ask (bounded) those whose output is invalid; every image gets one Outcome."""
        from curation.synth.cache import run_cached
        from curation.synth.openai_backend import Request

        lim = prompt.meta.limits
        out: dict[int, Outcome] = {}
        todo = list(range(len(keys)))
        convo = {i: list(messages[i]) for i in todo}
        for attempt in range(self.params.reask + 1):
            reqs = [Request(key=keys[i], messages=convo[i], sampling=prompt.meta.sampling, prompt_version=prompt.version)
                    for i in todo]
            results = run_cached(self.backend, self.cache, reqs)
            self.cached += sum(r.cached for r in results)
            again = []
            for i, r in zip(todo, results):
                if not r.ok:
                    out[i] = Outcome(None, f"llm_{r.error_reason}", r.error_detail)
                    continue
                turns, reason, detail = parse_and_check(r.text, prompt.parser, r.finish_reason, kind, keys[i], lang=lang,
                                                        min_chars=lim.min_chars, max_chars=lim.max_chars,
                                                        repeat_limit=lim.repeat_limit)
                out[i] = Outcome(turns, reason, detail or (f"after {attempt} re-ask(s)" if reason and attempt else None))
                if reason and attempt < self.params.reask:
                    convo[i] = convo[i] + [{"role": "assistant", "content": r.text},
                                           {"role": "user", "content": REASK.format(reason=reason)}]
                    again.append(i)
            todo = again
            if not todo:
                break
        return [out[i] for i in range(len(keys))]

    def usage(self) -> dict:
        return {**self.backend.stats(), "cached": self.cached}

    def part_usage(self) -> dict:
        """Usage since the last call: an actor's client serves many parts, and the stage report sums the parts."""
        now, before = self.usage(), self._reported
        self._reported = now
        delta = {k: (round(v - before.get(k, 0), 6) if isinstance(v, (int, float)) else v) for k, v in now.items()}
        old = before.get("failures", {})
        delta["failures"] = {r: n - old.get(r, 0) for r, n in now["failures"].items() if n > old.get(r, 0)}
        return delta

    def close(self) -> None:
        self.cache.close()


def write_usage(work: Path, part: str, usage: dict) -> None:
    from curation.store import atomic_write_json

    atomic_write_json(work / "usage" / f"{part}.json", usage)


def sum_usage(work: Path) -> dict | None:
    """Token, cost and failure totals over the parts' usage files."""
    files = sorted((work / "usage").glob("*.json"))
    if not files:
        return None
    total: dict = {"failures": {}}
    for f in files:
        for k, v in json.loads(f.read_text()).items():
            if k == "failures":
                for r, n in v.items():
                    total["failures"][r] = total["failures"].get(r, 0) + n
            elif isinstance(v, (int, float)):
                total[k] = round(total.get(k, 0) + v, 6)
            else:
                total[k] = v
    return total


def context(captions: list[str | None], boxes) -> str:
    return render_context([c for c in captions if c], boxes or None)

