"""recaption: a new caption per image from a VLM (alt-text and boxes as context, the image attached), or from
templates."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from curation.ops.synth_base import SynthOp
from curation.synth.params import LLMParams
from curation.synth.prompts import context, image_message
from curation.synth.rules import describe
from curation.synth.types import Outcome
from schemas import Caption


class RecaptionParams(LLMParams):
    lang: Literal["en", "zh"] = "en"

    @model_validator(mode="after")
    def _rules_write_english(self):
        if self.backend == "rules" and self.lang != "en":
            raise ValueError("the rules backend writes English recaptions only; use backend openai or vllm for lang zh")
        return self


class Recaption(SynthOp):
    """Caption rows (uid, recaption, lang, model, prompt_version), joined to the images downstream by uid."""

    name = "recaption"
    version = "2"  # 2: columns named recaption_* (unique in a run dir, read by uid downstream)
    Params = RecaptionParams
    output = Caption

    @classmethod
    def required_columns(cls, params: RecaptionParams) -> set[str]:
        return {"uid", "url", "caption"} | ({"image"} if params.backend != "rules" else set())  # a VLM sees it

    @property
    def task(self) -> str:
        return f"recaption_{self.params.lang}"

    def rules(self, rows: list[dict]) -> list[Outcome]:
        out = []
        for r in rows:
            objects = self.ann.objects.get(r["url"])
            text = describe(objects, self.alt_texts(r)) if objects else None
            out.append(
                Outcome([{"from": "human", "value": ""}, {"from": "gpt", "value": text}])
                if text
                else Outcome(None, "no_objects", "the rules backend needs the image's boxes in annotations")
            )
        return out

    def ask(self, rows: list[dict]) -> list[Outcome]:
        msgs = [
            image_message(self.prompt.messages(context(self.alt_texts(r), self.ann.boxes(r["url"]))), r["image"])
            for r in rows
        ]
        return self.client.outcomes(self.prompt, [r["uid"] for r in rows], msgs, self.task, lang=self.params.lang)

    def row(self, src: dict, turns: list[dict]) -> dict:
        return {
            "uid": src["uid"],
            "recaption": turns[-1]["value"],
            "recaption_lang": self.params.lang,
            "recaption_model": self.model_name,
            "recaption_prompt_version": self.prompt.version,
        }
