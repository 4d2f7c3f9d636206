"""Write a tiny random Llama with a word-level tokenizer and a chat template (for `vllm serve` in tests)."""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
words = (
    ["<unk>", "<s>", "</s>", "<pad>"]
    + [
        "question",
        "answer",
        "the",
        "a",
        "image",
        "shows",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "star",
        "what",
        "is",
        "in",
        "of",
        "and",
        "===",
    ]
    + [f"w{i}" for i in range(200)]
)
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
)
fast.chat_template = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}\n{% endfor %}assistant:"
)
fast.save_pretrained(out)
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=len(words),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)
LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(out)
print("ok", out)
