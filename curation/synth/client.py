"""One LLM round trip per image through the request cache, with a bounded re-ask of invalid outputs."""

from __future__ import annotations

from curation.synth.cache import RequestCache, run_cached
from curation.synth.params import LLMParams
from curation.synth.parse import parse_and_check
from curation.synth.prompts import PromptSet
from curation.synth.types import Backend, Outcome, Request

REASK = (
    "Your previous answer could not be used ({reason}). Answer again, following exactly the output format "
    "asked for above."
)


class LLMClient:
    """The openai or vllm backend behind the request cache; usage is kept per part for the stage report."""

    def __init__(self, params: LLMParams):
        self.params = params
        self.backend: Backend
        if params.backend == "vllm":
            from curation.synth.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(params.model, params.vllm)
        else:
            from curation.synth.openai_backend import OpenAIBackend  # the SDK: only where it is used

            self.backend = OpenAIBackend(
                params.base_url,
                params.model,
                params.api_key_env,
                params.concurrency,
                params.timeout,
                params.max_retries,
                params.price_per_1k_prompt,
                params.price_per_1k_completion,
            )
        self.cache = RequestCache(params.cache_path())
        self.cached = 0
        self._reported: dict = {}

    def outcomes(
        self, prompt: PromptSet, keys: list[str], messages: list[list[dict]], kind: str, lang: str | None = None
    ) -> list[Outcome]:
        """Ask once per image, then re-ask (bounded) those whose output is invalid; every image gets one Outcome."""
        lim = prompt.meta.limits
        out: dict[int, Outcome] = {}
        todo = list(range(len(keys)))
        convo = {i: list(messages[i]) for i in todo}
        for attempt in range(self.params.reask + 1):
            reqs = [
                Request(key=keys[i], messages=convo[i], sampling=prompt.meta.sampling, prompt_version=prompt.version)
                for i in todo
            ]
            results = run_cached(self.backend, self.cache, reqs)
            self.cached += sum(r.cached for r in results)
            again = []
            for i, r in zip(todo, results):
                if not r.ok:
                    out[i] = Outcome(None, f"llm_{r.error_reason}", r.error_detail)
                    continue
                turns, reason, detail = parse_and_check(
                    r.text,
                    prompt.parser,
                    r.finish_reason,
                    kind,
                    keys[i],
                    lang=lang,
                    min_chars=lim.min_chars,
                    max_chars=lim.max_chars,
                    repeat_limit=lim.repeat_limit,
                )
                out[i] = Outcome(
                    turns, reason, detail or (f"after {attempt} re-ask(s)" if reason and attempt else None)
                )
                if reason and attempt < self.params.reask:
                    convo[i] = convo[i] + [
                        {"role": "assistant", "content": r.text},
                        {"role": "user", "content": REASK.format(reason=reason)},
                    ]
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
