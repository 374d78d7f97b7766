"""Tiny Qwen2-style models with a locally trained BPE tokenizer, for tests and benchmarks.

No hub is reachable here, so every test builds its models from scratch: a byte-level BPE
tokenizer trained with `tokenizers` and a randomly initialised (seeded) Qwen2 model, saved with
`save_pretrained` exactly like a real checkpoint, so both engines load them as they would Qwen3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "on policy distillation trains a student on its own samples",
    "the teacher scores every token and the student learns from the reverse kl",
    "12 + 34 = 46 ; 7 * 8 = 56 ; carry the one and write the sum",
    "near future windows tell a reasoning fork from a surface form mismatch",
    "question: what is 345 + 678 ? answer: 1023",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim = hidden/heads = 64, a size vLLM's CPU attention supports."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    vocab_size: int = 384
    seed: int = 0


def build_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with chat special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(), *, tokenizer: Any = None,
                     dtype: str = "float32", device: str = "cpu", init_std: float | None = 0.08) -> Path:
    """Write tokenizer + randomly initialised (seeded) Qwen2 model (safetensors) to `path`; return it.

    The one Qwen2 builder of the tests and benchmarks. init_std 0.08 (larger than HF's default) makes
    the tiny models' distributions far from uniform; None keeps HF's init (the GPU check's big models).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(spec.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, dtype=dtype,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    with torch.device(device):  # big models initialise in seconds on a GPU, minutes on a CPU
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    return path
