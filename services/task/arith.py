"""The built-in reasoning task: multi-operand column addition with a chain of thought.

A problem adds `n_operands` numbers of `n_digits` digits each (zero-padded in the prompt):

    prompt:    "Q: 4821+0937+5560\n"
    solution:  "by columns\n"                                  header (one of three)
               "1) 0+0+7+1=8 -> 8 carry 0\n"                   one line per column, units first,
               "c2: 0+2+3+6 is 11: 1 c1\n"                     each in one of 36 surface forms
               "col 3: 1+5+9+8 is 23: 3 c2\n"                  (carry first or last, operands
               "4) 2+4+0+5=11, 1 c1\n"                         top-down or bottom-up)
               "answer: 11318"                                  then EOS

Every line is drawn from a small grammar (`line_options`): a step's surface form varies in its
label ("c1:", "col 1:", "1)"), the order of its terms (operands top-down or bottom-up, carry first
or last) and its phrasing, so two correct solutions can differ token by token while saying the
same thing. `check` verifies the final answer; `is_recoverable` uses the grammar to tell whether a
response prefix can still be completed into a correct solution (the ground truth for the detector).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from topd_client.errors import ConfigurationError

EOS_TEXT = "<|endoftext|>"
ANSWER_PREFIX = "answer: "
_ANSWER_RE = re.compile(r"answer: (\d+)\s*$")
_PROMPT_RE = re.compile(r"Q: (\d+(?:\+\d+)+)\n")
_HEADERS = ("by columns", "units first", "digit sums")
_LABELS = ("c{i}:", "col {i}:", "{i})")
_PHRASES = ("{terms}={s}, {d} c{c}", "{terms}={s} -> {d} carry {c}", "{terms} is {s}: {d} c{c}")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty of the task.

    n_digits: digits per operand (columns in the chain of thought).
    n_operands: numbers added; each column sums n_operands digits plus the carry.
    seed: seed of the splits.
    """

    n_digits: int = 3
    n_operands: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_digits <= 12:
            raise ConfigurationError(f"n_digits must be in 1..12, got {self.n_digits}")
        if not 2 <= self.n_operands <= 9:
            raise ConfigurationError(f"n_operands must be in 2..9, got {self.n_operands}")


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model sees and the answer the checker expects."""

    operands: tuple[int, ...]
    n_digits: int

    @property
    def prompt(self) -> str:
        return "Q: " + "+".join(f"{x:0{self.n_digits}d}" for x in self.operands) + "\n"

    @property
    def answer(self) -> str:
        return str(sum(self.operands))

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "operands": list(self.operands),
                "n_digits": self.n_digits}

    @classmethod
    def from_json(cls, row: dict) -> "Problem":
        if "operands" not in row:
            return cls.from_prompt(row["prompt"])
        return cls(operands=tuple(int(x) for x in row["operands"]), n_digits=int(row["n_digits"]))

    @classmethod
    def from_prompt(cls, prompt: str) -> "Problem":
        """The problem a prompt states, e.g. "Q: 730+836\n" (for callers that only kept the text)."""
        match = _PROMPT_RE.fullmatch(prompt)
        if match is None:
            raise ValueError(f"not a prompt of the built-in task: {prompt!r}")
        terms = match.group(1).split("+")
        return cls(operands=tuple(int(t) for t in terms), n_digits=len(terms[0]))


@dataclass(frozen=True)
class Column:
    """The arithmetic of one column: digits top-down, carry in, sum, written digit, carry out."""

    index: int  # 1 = units
    digits: tuple[int, ...]
    carry_in: int

    @property
    def total(self) -> int:
        return sum(self.digits) + self.carry_in


def is_prompt(text: str) -> bool:
    """Is `text` a prompt of this task ("Q: 730+836\n")?"""
    return _PROMPT_RE.fullmatch(text) is not None


def columns(problem: Problem) -> list[Column]:
    """The columns of the addition, units first, with their carries."""
    out, carry = [], 0
    for i in range(problem.n_digits):
        digits = tuple((x // 10**i) % 10 for x in problem.operands)
        col = Column(index=i + 1, digits=digits, carry_in=carry)
        out.append(col)
        carry = col.total // 10
    return out


def step_forms(col: Column) -> list[str]:
    """Every correct surface form of one column's line (without the newline)."""
    s, d, c = col.total, col.total % 10, col.total // 10
    orders = (list(col.digits), list(reversed(col.digits)))
    term_lists = [o + [col.carry_in] for o in orders] + [[col.carry_in] + o for o in orders]
    forms = []
    for label in _LABELS:
        for terms in term_lists:
            t = "+".join(str(x) for x in terms)
            for phrase in _PHRASES:
                forms.append(label.format(i=col.index) + " " + phrase.format(terms=t, s=s, d=d, c=c))
    return forms


def line_options(problem: Problem) -> list[list[str]]:
    """The solution grammar: line k of a correct solution is one of line_options(problem)[k]."""
    return [list(_HEADERS)] + [step_forms(col) for col in columns(problem)] + [[ANSWER_PREFIX + problem.answer]]


def render_solution(problem: Problem, rng: random.Random) -> str:
    """A random surface form of a correct chain of thought plus answer line (no EOS)."""
    return "\n".join(rng.choice(options) for options in line_options(problem))


def render_canonical(problem: Problem) -> str:
    """The first surface form of every line (a fixed, deterministic solution)."""
    return "\n".join(options[0] for options in line_options(problem))


def extract_answer(completion: str) -> str | None:
    """The number on the last line if it reads "answer: <digits>", else None (EOS text ignored)."""
    text = completion.split(EOS_TEXT, 1)[0]
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    match = _ANSWER_RE.fullmatch(last.strip())
    return match.group(1) if match else None


def check(problem: Problem, completion: str) -> bool:
    """True when the completion's final line states the correct answer ("answer: N")."""
    got = extract_answer(completion)
    return got is not None and int(got) == int(problem.answer)


def check_chain(problem: Problem, completion: str) -> bool:
    """Stricter: every line of the chain of thought is a correct step, in some surface form."""
    text = completion.split(EOS_TEXT, 1)[0]
    lines = text.split("\n")
    options = line_options(problem)
    return len(lines) == len(options) and all(line in opts for line, opts in zip(lines, options))


def is_recoverable(problem: Problem, prefix: str) -> bool:
    """Can this response prefix still be completed into a correct solution in some surface form?

    True iff every complete line is a correct step (in whichever surface form) and the partial
    last line is a prefix of some correct form of the next step. A prefix that contains the EOS
    text is recoverable only if it is a complete correct solution before the EOS.
    """
    if EOS_TEXT in prefix:
        return check_chain(problem, prefix)
    lines = prefix.split("\n")
    options = line_options(problem)
    if len(lines) > len(options):
        return False
    for line, opts in zip(lines[:-1], options):
        if line not in opts:
            return False
    partial = lines[-1]
    return any(opt.startswith(partial) for opt in options[len(lines) - 1])


def label_tokens(problem: Problem, token_texts: Sequence[str]) -> list[bool]:
    """Ground truth per response token: True (benign) if the prefix up to and including the token
    is recoverable, False (error) if not. Once a prefix is unrecoverable all later ones are too."""
    labels, text, ok = [], "", True
    for piece in token_texts:
        text += piece
        ok = ok and is_recoverable(problem, text)
        labels.append(ok)
    return labels


def first_error(problem: Problem, response: str) -> int | None:
    """Index of the first character after which the response cannot be completed correctly."""
    lo, hi = 0, len(response)
    if is_recoverable(problem, response):
        return None
    while lo < hi:  # recoverability is monotone in the prefix: binary search the first failure
        mid = (lo + hi) // 2
        if is_recoverable(problem, response[: mid + 1]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _sample_problem(cfg: TaskConfig, rng: random.Random) -> Problem:
    return Problem(operands=tuple(rng.randrange(10**cfg.n_digits) for _ in range(cfg.n_operands)),
                   n_digits=cfg.n_digits)


def make_splits(cfg: TaskConfig, n_train: int, n_val: int, n_test: int) -> dict[str, list[Problem]]:
    """Disjoint train/val/test problems, deterministic in cfg (test drawn first, so growing
    n_train never changes val or test)."""
    space = 10 ** (cfg.n_digits * cfg.n_operands)
    total = n_train + n_val + n_test
    if total > space // 2:
        raise ConfigurationError(f"{total} problems requested but only {space} exist for {cfg}")
    rng = random.Random(f"topd-arith-{cfg.n_digits}-{cfg.n_operands}-{cfg.seed}")
    seen: set[tuple[int, ...]] = set()
    splits: dict[str, list[Problem]] = {}
    for name, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        out: list[Problem] = []
        while len(out) < n:
            p = _sample_problem(cfg, rng)
            if p.operands not in seen:
                seen.add(p.operands)
                out.append(p)
        splits[name] = out
    return {"train": splits["train"], "val": splits["val"], "test": splits["test"]}


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """One {"prompt", "answer", "operands", "n_digits"} object per line (the trainer's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    """Problems written by `write_jsonl`."""
    with Path(path).open() as f:
        return [Problem.from_json(json.loads(line)) for line in f if line.strip()]


def alphabet() -> str:
    """Every character a prompt or solution can contain (the tokenizer's vocabulary)."""
    chars = set("0123456789Q+:\n ")
    for text in (*_HEADERS, *_LABELS, *_PHRASES, ANSWER_PREFIX):
        chars.update(text.replace("{", "").replace("}", ""))
    return "".join(sorted(chars))
