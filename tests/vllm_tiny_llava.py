"""Write a tiny random LLaVA (the trainer's tokenizer, CLIP tower and Llama, exported as
LlavaForConditionalGeneration)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.export_hf import export_hf
from trainer.model import LlavaLite
from trainer.tiny import make_tiny_lm, make_tiny_tokenizer, make_tiny_vision

out = Path(sys.argv[1])
parts = out.parent / (out.name + "-parts")
tokenizer = make_tiny_tokenizer(parts / "lm")
make_tiny_lm(parts / "lm", tokenizer, hidden=128)  # 4 heads of 32: a head size vLLM's CPU attention supports
_, processor = make_tiny_vision(parts / "vision")
model = LlavaLite.from_parts(parts / "vision", parts / "lm")
export_hf(model, tokenizer, processor, out)
print("ok", out)
