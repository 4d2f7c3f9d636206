"""instruct: LLaVA instruction samples of one kind per image, from captions (alt-text, recaption) and boxes."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from curation.ops.synth import SynthOp
from curation.synth.generate import LLMParams, Outcome, context
from curation.synth.rules import QUESTIONS, generate
from schemas import Instruction

LLM_KINDS = ("conversation", "detail_description", "complex_reasoning")


class InstructParams(LLMParams):
    kind: Literal["conversation", "detail_description", "complex_reasoning", "short_answer", "multiple_choice"] = Field(
        description="LLaVA's three GPT kinds, or the short-answer / multiple-choice formats (rules backend)")
    LATER_DEFAULTS: ClassVar[dict] = {**LLMParams.LATER_DEFAULTS, "max_turns": 4, "ask": None}
    max_turns: int = Field(4, ge=1, description="rules backend: questions per image (conversation, short_answer, "
                           "multiple_choice)")
    ask: list[Literal[QUESTIONS]] | None = Field(None, min_length=1, description="rules backend: only these question "
                                                 f"types ({', '.join(QUESTIONS)}); default all")

    @model_validator(mode="after")
    def _format_kinds_are_rules(self):
        if self.backend != "rules" and self.kind not in LLM_KINDS:
            raise ValueError(f"kind {self.kind} comes from the rules backend; an LLM writes {', '.join(LLM_KINDS)}")
        if self.backend != "rules" and {"max_turns", "ask"} & self.model_fields_set:
            raise ValueError("max_turns and ask choose the rules backend's questions; an LLM's come from its prompt")
        return self


class Instruct(SynthOp):
    """Instruction rows (id = uid-kind) carrying their image, so a shard trains on its own."""

    name = "instruct"
    version = "1"
    Params = InstructParams
    output = Instruction

    @property
    def task(self) -> str:
        return self.params.kind

    @staticmethod
    def captions(row: dict) -> list[str]:
        return [c for c in (row["caption"], row.get("recaption")) if c]

    def rules(self, rows: list[dict]) -> list[Outcome]:
        suffix = self.prompt.meta.query_suffix
        kw = {"short_suffix": suffix} if self.params.kind == "short_answer" else {"choice_suffix": suffix} if suffix else {}
        out = []
        for r in rows:
            objects = self.ann.objects.get(r["url"], [])
            turns = generate(r["uid"], self.params.kind, objects, self.captions(r), self.ann.vocab,
                             max_turns=self.params.max_turns, ask=self.params.ask, **kw)
            if turns:
                out.append(Outcome(turns))
            elif objects:
                out.append(Outcome(None, "no_question", f"no question of the types {self.params.ask} fits the boxes"))
            else:
                out.append(Outcome(None, "no_objects", "the rules backend needs the image's boxes in annotations"))
        return out

    def ask(self, rows: list[dict]) -> list[Outcome]:
        msgs = [self.prompt.messages(context(self.captions(r), self.ann.boxes(r["url"]))) for r in rows]
        return self.client.outcomes(self.prompt, [r["uid"] for r in rows], msgs, self.params.kind)

    def row(self, src: dict, turns: list[dict]) -> dict:
        return {"id": f"{src['uid']}-{self.params.kind}", "uid": src["uid"], "kind": self.params.kind,
                "conversations": turns, "model": self.model_name, "prompt_version": self.prompt.version, "image": src["image"]}
