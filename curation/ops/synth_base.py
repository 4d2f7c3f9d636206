"""Base of the synthesis ops: prompt, annotations and LLM client set up once per worker; usage reported per stage."""

from __future__ import annotations

from abc import abstractmethod

import pyarrow as pa

from curation.engine.store import make_rejects
from curation.ops.base import Op, Placement
from curation.synth.annotations import Annotations
from curation.synth.client import LLMClient
from curation.synth.params import LLMParams
from curation.synth.prompts import load_prompt
from curation.synth.types import Outcome
from curation.synth.usage import sum_usage, write_usage


class SynthOp(Op):
    """One output row per input image, or a reject with a reason (llm_*, a validity reason, no_objects)."""

    max_inputs = 3
    task: str  # the prompt folder under prompts/ by default

    @classmethod
    def required_columns(cls, params: LLMParams) -> set[str]:
        return {"uid", "url", "caption"}

    @classmethod
    def optional_columns(cls, params: LLMParams) -> set[str]:
        return {"captions"}  # every caption of the image, where the source has several (read_coco)

    @staticmethod
    def alt_texts(row: dict) -> list[str]:
        """The image's own captions: all of them where the source kept several (COCO's five), else its alt-text."""
        return [c for c in row.get("captions") or [row["caption"]] if c]

    def setup(self) -> None:
        """Prompt and client (each part loads its own boxes); backend vllm builds its engine here, once per actor."""
        self.prompt = load_prompt(self.params.prompt_dir(self.task)) if self.asks_model else None
        self.client = LLMClient(self.params) if self.params.backend != "rules" and self.asks_model else None

    @property
    def asks_model(self) -> bool:
        """Whether the output comes from a prompt (an LLM or the rules); a caption reused as it is needs none."""
        return True

    def placement(self) -> Placement:
        """backend vllm: an actor pool, one engine per actor, each taking one part at a time (engines load slowly)."""
        in_process = self.params.in_process_model
        return Placement(actor=in_process, one_part_at_a_time=in_process)

    def teardown(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()

    def prepare(self) -> None:
        """backend vllm: fail the stage early, with what to do, where the workers cannot import vllm."""
        if self.params.backend == "vllm":
            from curation.synth.vllm_backend import require_vllm

            require_vllm()

    @property
    def model_name(self) -> str:
        if not self.asks_model:
            return "none: captions as they are"
        return self.params.model if self.params.backend != "rules" else "rules"

    def process(self, part: str, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if not hasattr(self, "prompt"):
            self.setup()
        self.ann = Annotations.load(self.params.annotations, table.column("url"))
        rows = table.to_pylist()
        outcomes = [self.vet(o) for o in (self.rules(rows) if self.client is None else self.ask(rows))]
        if self.client is not None:
            write_usage(self.work, part, self.client.part_usage())
        good = [self.row(r, o.turns) for r, o in zip(rows, outcomes) if o.reason is None]
        bad = [(r, o) for r, o in zip(rows, outcomes) if o.reason is not None]
        rejects = make_rejects([r for r, _ in bad], self.stage, [o.reason for _, o in bad], [o.detail for _, o in bad])
        return pa.Table.from_pylist(good, schema=_schema(self.output)), rejects

    def report(self) -> dict | None:
        usage = sum_usage(self.work)
        return {
            "backend": self.params.backend,
            "model": self.model_name,
            "prompt_version": self._version(),
            **({"usage": usage} if usage else {}),
        }

    def _version(self) -> str | None:
        from curation.synth.prompts import folder_version

        return folder_version(self.params.prompt_dir(self.task)) if self.asks_model else None

    @abstractmethod
    def rules(self, rows: list[dict]) -> list[Outcome]:
        """Outcomes from the offline templates."""

    @abstractmethod
    def ask(self, rows: list[dict]) -> list[Outcome]:
        """Outcomes from the model behind the openai or vllm backend."""

    def vet(self, outcome: Outcome) -> Outcome:
        """A last check of each output before it is written (none here; instruct checks the image slots)."""
        return outcome

    @abstractmethod
    def row(self, src: dict, turns: list[dict]) -> dict:
        """The output row for an input row and its validated turns."""


def _schema(model) -> pa.Schema:
    from schemas import arrow_schema

    return arrow_schema(model)
