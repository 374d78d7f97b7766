"""Teacher and student for the built-in task: specs and presets, tokenizer, training, generation,
evaluation. `services/task/prepare.py` turns a preset into a cache entry.

Two presets, each a task of its own (services/task/plugin.py): `arith`, the full task, and
`arith-mini`, a miniature that prepares in seconds (smoke runs and the test suite).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from services.task import arith
from services.task.arith import Problem, TaskConfig
from topd_client.errors import ConfigurationError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen2 shape. head_dim = hidden_size / num_heads must be a size vLLM's CPU attention supports."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TrainSpec:
    """One supervised run: steps, batch, learning rate, and when to stop early on validation."""

    max_steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_frac: float = 0.1  # linear decay from lr to lr * final_lr_frac at max_steps
    eval_every: int = 200
    stop_at_acc: float = 1.01  # stop once validation accuracy reaches this (default: never)


@dataclass(frozen=True)
class BuildConfig:
    """Everything `prepare_builtin` builds; the cache key is the preset, the version and the seed."""

    task: TaskConfig = TaskConfig()
    teacher: ModelSpec = ModelSpec(hidden_size=192, num_layers=4, num_heads=3, intermediate_size=512)
    student: ModelSpec = ModelSpec(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256)
    teacher_train: TrainSpec = TrainSpec(max_steps=600, batch_size=64, lr=2e-3, warmup_steps=30, eval_every=100,
                                         stop_at_acc=0.97)
    student_warmup: TrainSpec = TrainSpec(max_steps=1500, batch_size=32, lr=3e-3, eval_every=50, stop_at_acc=0.3)
    n_train: int = 50_000
    n_val: int = 500
    n_test: int = 1000
    n_eval_during_training: int = 100
    n_teacher_samples: int = 2048
    sample_temperature: float = 1.0
    threads: int = 2


_MINI_MODEL = ModelSpec(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128)

# The built-in task's presets, by task name (each a plugin: services/task/plugin.py).
PRESETS: dict[str, BuildConfig] = {
    "arith": BuildConfig(),
    # A miniature of the whole pipeline that prepares in seconds (smoke runs, the test suite): sums of three
    # 1-digit numbers, one-layer models, small splits, one thread (two threads of a model this small spend
    # their time waiting for each other). Its teacher is weak (~20-40%) and its student weaker (~5%):
    # what it checks is the plumbing.
    "arith-mini": BuildConfig(
        task=TaskConfig(n_digits=1, n_operands=3), teacher=_MINI_MODEL, student=_MINI_MODEL,
        teacher_train=TrainSpec(max_steps=500, batch_size=32, lr=5e-3, warmup_steps=20, eval_every=500),
        student_warmup=TrainSpec(max_steps=100, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=100),
        n_train=400, n_val=32, n_test=64, n_eval_during_training=16, n_teacher_samples=256, threads=1),
}
DEFAULT_PRESET = "arith"


def preset(name: str) -> BuildConfig:
    """The BuildConfig of a built-in preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ConfigurationError(f"unknown built-in task {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """One token per character of the task's alphabet, as a byte-level BPE without merges.

    Byte-level, because `AutoTokenizer` (and vLLM) load a Qwen2 checkpoint's tokenizer as
    `Qwen2Tokenizer`, which imposes a ByteLevel pre-tokenizer: a plain character vocabulary then
    loses every space and newline. Spelling the vocabulary in byte-level characters (" " is "Ġ",
    "\n" is "Ċ") gives the same ids whichever class loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character map

    b2u = bytes_to_unicode()
    chars = [b2u[ord(c)] for c in arith.alphabet()]
    vocab = {t: i for i, t in enumerate([EOS, PAD, UNK] + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, padding_side="left", model_max_length=256)


def build_model(spec: ModelSpec, tokenizer, seed: int):
    """A randomly initialised (seeded) Qwen2ForCausalLM with untied embeddings."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False, torch_dtype="float32", bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def max_new_tokens_for(cfg: TaskConfig) -> int:
    """Longest correct solution (in tokens = characters) plus EOS and a margin."""
    worst = Problem(operands=tuple(10**cfg.n_digits - 1 for _ in range(cfg.n_operands)), n_digits=cfg.n_digits)
    return sum(max(len(o) for o in opts) + 1 for opts in arith.line_options(worst)) + 8


# ------------------------------------------------------------------------------------ training


def _encode_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Right-padded input ids and labels (-100 on prompt and padding); response ends with EOS."""
    import torch

    rows = []
    for prompt, response in zip(prompts, responses):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(ids) for ids, _ in rows)
    ids_BL = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels_BL = torch.full((len(rows), width), -100, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        ids_BL[b, : len(ids)] = torch.tensor(ids)
        labels_BL[b, : len(ids)] = torch.tensor(labels)
        mask_BL[b, : len(ids)] = 1
    return ids_BL, mask_BL, labels_BL


def progress_bar(total: int, desc: str, progress: bool, unit: str = "step"):
    """A tqdm bar with an ETA (on stderr; disabled when progress is False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


def train_sft(model, tokenizer, batch_fn: Callable[[int], tuple[list[str], list[str]]], spec: TrainSpec,
              eval_fn: Callable[[], float] | None = None, seed: int = 0, progress: bool = False,
              desc: str = "train") -> list[dict]:
    """Cross-entropy on responses. batch_fn(step) -> (prompts, responses). Returns the eval history
    [{"step", "seconds", "cpu_seconds", "acc", "loss"}]; stops early once eval accuracy >= spec.stop_at_acc."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup_steps)
                                              * (1.0 - (1.0 - spec.final_lr_frac) * s / spec.max_steps))
    history, t0, c0, losses = [], time.perf_counter(), time.process_time(), []
    with progress_bar(spec.max_steps, desc, progress) as bar:
        for step in range(1, spec.max_steps + 1):
            model.train()
            ids_BL, mask_BL, labels_BL = _encode_examples(tokenizer, *batch_fn(step))
            loss = model(input_ids=ids_BL, attention_mask=mask_BL, labels=labels_BL).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            if eval_fn is not None and (step % spec.eval_every == 0 or step == spec.max_steps):
                acc = eval_fn()
                row = {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                       "cpu_seconds": round(time.process_time() - c0, 1), "acc": acc,
                       "loss": round(sum(losses) / len(losses), 4)}
                losses = []
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{acc:.2f}")
                log.debug("%s %s", desc, row)
                if acc >= spec.stop_at_acc:
                    break
    model.eval()
    return history


# ---------------------------------------------------------------------------------- generation


def _load(model_dir_or_model, tokenizer):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if isinstance(model_dir_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_model, dtype="float32")
        tokenizer = tokenizer or PreTrainedTokenizerFast.from_pretrained(model_dir_or_model)
    else:
        model = model_dir_or_model
    return model.eval(), tokenizer


def generate_texts(model_dir_or_model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   temperature: float = 0.0, batch_size: int = 256, seed: int = 0,
                   desc: str | None = None) -> list[str]:
    """Completions (text up to, not including, EOS) with transformers; greedy when temperature == 0.
    `desc`: show a progress bar of that name."""
    import torch

    model, tokenizer = _load(model_dir_or_model, tokenizer)
    tokenizer.padding_side = "left"
    out: list[str] = []
    bar = progress_bar(len(prompts), desc or "", desc is not None, unit="prompt")
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start: start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            gen_BT = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **sampling)
        new_BT = gen_BT[:, enc["input_ids"].shape[1]:]
        for row in new_BT.tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode([t for t in row if t != tokenizer.pad_token_id]))
        bar.update(len(chunk))
    bar.close()
    return out


def evaluate(model_dir_or_model, tokenizer, problems: Sequence[Problem], batch_size: int = 256,
             max_new_tokens: int | None = None, desc: str | None = None) -> float:
    """Greedy accuracy (the checker on the final answer) with transformers, batched, left padding."""
    if not problems:
        return 0.0
    if max_new_tokens is None:
        p = problems[0]
        max_new_tokens = max_new_tokens_for(TaskConfig(n_digits=p.n_digits, n_operands=len(p.operands)))
    texts = generate_texts(model_dir_or_model, tokenizer, [p.prompt for p in problems], max_new_tokens,
                           temperature=0.0, batch_size=batch_size, desc=desc)
    return sum(arith.check(p, t) for p, t in zip(problems, texts)) / len(problems)


# ------------------------------------------------------------------------------------- builder


def _rendered_batches(problems: Sequence[Problem], batch_size: int, seed: int):
    """batch_fn over random train problems, each rendered in a random surface form."""
    rng = random.Random(seed)

    def batch_fn(step: int) -> tuple[list[str], list[str]]:
        chosen = [rng.choice(problems) for _ in range(batch_size)]
        return [p.prompt for p in chosen], [arith.render_solution(p, rng) for p in chosen]
    return batch_fn


def _sample_batches(samples: Sequence[tuple[str, str]], batch_size: int, seed: int):
    """batch_fn over fixed (prompt, response) pairs, e.g. teacher samples."""
    rng = random.Random(seed)

    def batch_fn(step: int) -> tuple[list[str], list[str]]:
        chosen = [rng.choice(samples) for _ in range(batch_size)]
        return [c[0] for c in chosen], [c[1] for c in chosen]
    return batch_fn
