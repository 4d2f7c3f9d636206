"""Export a LlavaLite as a checkpoint transformers loads: LlavaForConditionalGeneration (one view per image), or
LlavaNextForConditionalGeneration (AnyRes). Not exported (a clear error): the 2x2 patch-merge projector and AnyRes
with a token budget (`max_tiles`: LlavaOnevision's pooling, whose image processor differs from LLaVA-NeXT's)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from trainer.anyres import next_processor
from trainer.model import LlavaLite, PatchMerger
from trainer.template import Template, chat_template

# LlavaLite module prefix -> LlavaForConditionalGeneration prefix (transformers 5.x layout)
KEY_MAP = {
    "vision.": "model.vision_tower.",
    "projector.": "model.multi_modal_projector.",
    "lm.model.": "model.language_model.",
    "lm.lm_head.": "lm_head.",
    "image_newline": "model.image_newline",
}


def llava_config(model: LlavaLite) -> LlavaConfig | LlavaNextConfig:
    """The config from the parts: penultimate layer, CLS dropped, GELU projector, `<image>` id; AnyRes: the grid
    pinpoints."""
    if model.image_token_id is None:
        raise ValueError("LlavaLite.image_token_id is unset: build the model with from_parts or pass image_token_id")
    if isinstance(model.projector, PatchMerger):
        raise ValueError("the patch_merge projector has no transformers LLaVA class to export to: train with mlp")
    common = {
        "vision_config": model.vision.config.to_dict(),
        "text_config": model.lm.config.to_dict(),
        "image_token_index": model.image_token_id,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(model.lm.config, "tie_word_embeddings", False)),
    }
    if model.anyres is None:
        return LlavaConfig(**common, image_seq_length=model.image_tokens)
    if model.anyres.max_tiles is not None:
        raise ValueError("AnyRes with max_tiles (OneVision's pooling) is not exported: LlavaNext has no token budget")
    return LlavaNextConfig(**common, image_grid_pinpoints=model.pinpoints)


def llava_state_dict(model: LlavaLite) -> dict[str, torch.Tensor]:
    """Our state dict renamed to LlavaForConditionalGeneration keys."""
    out = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in KEY_MAP if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no LLaVA name for parameter {key!r}: extend KEY_MAP in trainer/export_hf.py")
        out[KEY_MAP[prefix] + key[len(prefix) :]] = value
    return out


HF_CLASSES = {  # config -> (model, processor)
    LlavaConfig: (LlavaForConditionalGeneration, LlavaProcessor),
    LlavaNextConfig: (LlavaNextForConditionalGeneration, LlavaNextProcessor),
}


def export_hf(
    model: LlavaLite,
    tokenizer,
    image_processor,
    out_dir: str | Path,
    template: Template = "chat",
    system: str | None = None,
) -> Path:
    """Write config, safetensors weights, tokenizer and the processor (LlavaProcessor, or LlavaNextProcessor for
    AnyRes) to `out_dir`; return it.

    `template` and `system` are the run's (TrainConfig): the export's chat template (chat_template.jinja, read by
    transformers and vLLM) renders the prompts the model was trained on (trainer.template.chat_template)."""
    out_dir = Path(out_dir)
    config = llava_config(model)
    hf = HF_CLASSES[type(config)][0](config)
    state = llava_state_dict(model)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"export to LLaVA: missing keys {missing}, unexpected keys {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.save_pretrained(str(out_dir))
    if model.anyres:
        image_processor = next_processor(image_processor, model.pinpoints)
    jinja = chat_template(tokenizer, template, system)
    own = tokenizer.chat_template
    tokenizer.chat_template = jinja  # the tokenizer and the processor save the same chat_template.jinja
    try:
        processor = HF_CLASSES[type(config)][1](
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=model.vision.config.patch_size,
            vision_feature_select_strategy="default",
            chat_template=jinja,
            image_token="<image>",
            num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
        )
        processor.save_pretrained(str(out_dir))
    finally:
        tokenizer.chat_template = own
    return out_dir
