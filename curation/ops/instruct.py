"""instruct: LLaVA instruction samples of one kind per image, from captions (alt-text, recaption) and boxes."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from curation.ops.synth_base import SynthOp
from curation.synth.params import LLMParams
from curation.synth.parse import BRIEF_INSTRUCTIONS, IMAGE, image_slots, pick
from curation.synth.prompts import context
from curation.synth.rules import QUESTIONS, generate
from curation.synth.types import Outcome
from schemas import Instruction

LLM_KINDS = ("conversation", "detail_description", "complex_reasoning")


class InstructParams(LLMParams):
    kind: Literal[
        "conversation", "detail_description", "complex_reasoning", "short_answer", "multiple_choice", "caption"
    ] = Field(
        description="LLaVA's three GPT kinds, the short-answer / multiple-choice formats (rules backend), or caption: "
        "stage-1 pretraining samples (a brief-description instruction and the image's caption, no model asked)"
    )
    caption_source: Literal["recaption", "alt_text"] = Field(
        "recaption", description="kind caption: the recaption (a recaption stage before this one) or the alt-text"
    )
    ADDED_LATER: ClassVar[dict] = {**LLMParams.ADDED_LATER, "max_turns": 4, "ask": None}
    max_turns: int = Field(
        4, ge=1, description="rules backend: questions per image (conversation, short_answer, multiple_choice)"
    )
    ask: list[Literal[QUESTIONS]] | None = Field(
        None,
        min_length=1,
        description=f"rules backend: only these question types ({', '.join(QUESTIONS)}); default all",
    )

    @model_validator(mode="after")
    def _format_kinds_are_rules(self):
        if self.kind == "caption":
            return self
        if "caption_source" in self.model_fields_set:
            raise ValueError("caption_source is for kind caption")
        if self.backend != "rules" and self.kind not in LLM_KINDS:
            raise ValueError(f"kind {self.kind} comes from the rules backend; an LLM writes {', '.join(LLM_KINDS)}")
        if self.backend != "rules" and {"max_turns", "ask"} & self.model_fields_set:
            raise ValueError("max_turns and ask choose the rules backend's questions; an LLM's come from its prompt")
        return self


class Instruct(SynthOp):
    """Instruction rows (id = uid-kind); the image stays in the source stage's rows, read by uid."""

    name = "instruct"
    version = "3"  # 2: rows without the image bytes (stored once, by the source stage); 3: image slots vetted
    Params = InstructParams
    output = Instruction

    @property
    def task(self) -> str:
        return self.params.kind

    @classmethod
    def required_columns(cls, params: InstructParams) -> set[str]:
        recaption = {"recaption", "recaption_model", "recaption_prompt_version"}
        return super().required_columns(params) | (recaption if cls._recaptioned(params) else set())

    @classmethod
    def optional_columns(cls, params: InstructParams) -> set[str]:
        return super().optional_columns(params) | {"recaption"}  # a recaption stage before it adds its caption

    @staticmethod
    def _recaptioned(params: InstructParams) -> bool:
        return params.kind == "caption" and params.caption_source == "recaption"

    @property
    def asks_model(self) -> bool:
        return self.params.kind != "caption"

    @classmethod
    def captions(cls, row: dict) -> list[str]:
        return [*cls.alt_texts(row), *([row["recaption"]] if row.get("recaption") else [])]

    def rules(self, rows: list[dict]) -> list[Outcome]:
        if self.params.kind == "caption":
            return [self._caption(r) for r in rows]
        suffix = self.prompt.meta.query_suffix
        kw = (
            {"short_suffix": suffix}
            if self.params.kind == "short_answer"
            else {"choice_suffix": suffix}
            if suffix
            else {}
        )
        out = []
        for r in rows:
            objects = self.ann.objects.get(r["url"], [])
            turns = generate(
                r["uid"],
                self.params.kind,
                objects,
                self.captions(r),
                self.ann.vocab,
                max_turns=self.params.max_turns,
                ask=self.params.ask,
                **kw,
            )
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

    def _caption(self, row: dict) -> Outcome:
        """A stage-1 sample in LLaVA's pretraining format: <image> and a brief-description instruction drawn per
        uid, answered by the recaption (or the alt-text) as it is."""
        field = "recaption" if self._recaptioned(self.params) else "caption"
        text = (row.get(field) or "").strip()
        if not text:
            reason = "no_recaption" if field == "recaption" else "caption_missing"
            return Outcome(None, reason, f"kind caption with caption_source {self.params.caption_source}")
        human = f"{IMAGE}\n" + pick(BRIEF_INSTRUCTIONS, f"caption:{row['uid']}")
        return Outcome([{"from": "human", "value": human}, {"from": "gpt", "value": text}])

    def vet(self, outcome: Outcome) -> Outcome:
        """Every sample, whatever wrote it, holds `<image>` once, leading the first human turn."""
        if outcome.reason is None and (why := image_slots(outcome.turns)):
            return Outcome(None, "image_token_in_text", why)
        return outcome

    def row(self, src: dict, turns: list[dict]) -> dict:
        if self.params.kind != "caption":
            model, version, source = self.model_name, self.prompt.version, "generated"
        elif self._recaptioned(self.params):
            model, version, source = src["recaption_model"], src["recaption_prompt_version"], "recaption"
        else:
            model, version, source = "alt-text", "", "alt_text"
        return {
            "id": f"{src['uid']}-{self.params.kind}",
            "uid": src["uid"],
            "kind": self.params.kind,
            "conversations": turns,
            "model": model,
            "prompt_version": version,
            "source": source,
        }
