"""Base of the synthesis ops: prompt, annotations and LLM client set up once per worker; usage reported per stage."""
from __future__ import annotations

from abc import abstractmethod

import pyarrow as pa

from curation.ops.base import Op
from curation.store import make_rejects
from curation.synth.generate import Annotations, LLMClient, LLMParams, Outcome, sum_usage, write_usage
from curation.synth.prompts import load_prompt


class SynthOp(Op):
    """One output row per input image, or a reject with a reason (llm_*, a validity reason, no_objects)."""

    max_inputs = 3
    task: str  # the prompt folder under prompts/ by default

    @classmethod
    def required_columns(cls, params: LLMParams) -> set[str]:
        return {"uid", "url", "caption", "image"}

    def setup(self) -> None:
        """Prompt, boxes and client; with backend vllm the engine is built here, once per actor."""
        self.prompt = load_prompt(self.params.prompt_dir(self.task))
        self.ann = Annotations.load(self.params.annotations)
        self.client = LLMClient(self.params) if self.params.backend != "rules" else None

    @property
    def has_prepare(self) -> bool:
        return self.params.backend == "vllm"

    def prepare(self) -> None:
        """backend vllm: fail the stage early, with what to do, where the workers cannot import vllm."""
        from curation.synth.vllm_backend import require_vllm

        require_vllm()

    @property
    def model_name(self) -> str:
        return self.params.model if self.params.backend != "rules" else "rules"

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if not hasattr(self, "prompt"):
            self.setup()
        rows = table.to_pylist()
        outcomes = self.rules(rows) if self.client is None else self.ask(rows)
        if self.client is not None:
            write_usage(self.work, part, self.client.part_usage())
        good = [self.row(r, o.turns) for r, o in zip(rows, outcomes) if o.reason is None]
        bad = [(r, o) for r, o in zip(rows, outcomes) if o.reason is not None]
        rejects = make_rejects([r for r, _ in bad], self.stage, [o.reason for _, o in bad], [o.detail for _, o in bad])
        return pa.Table.from_pylist(good, schema=_schema(self.output)), rejects

    def report(self) -> dict | None:
        usage = sum_usage(self.work)
        return {"backend": self.params.backend, "model": self.model_name, "prompt_version": self._version(),
                **({"usage": usage} if usage else {})}

    def _version(self) -> str:
        from curation.synth.prompts import folder_version

        return folder_version(self.params.prompt_dir(self.task))

    @abstractmethod
    def rules(self, rows: list[dict]) -> list[Outcome]:
        """Outcomes from the offline templates."""

    @abstractmethod
    def ask(self, rows: list[dict]) -> list[Outcome]:
        """Outcomes from the model behind the openai or vllm backend."""

    @abstractmethod
    def row(self, src: dict, turns: list[dict]) -> dict:
        """The output row for an input row and its validated turns."""

def _schema(model) -> pa.Schema:
    from schemas import arrow_schema

    return arrow_schema(model)
