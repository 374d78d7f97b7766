"""The styled task: the built-in column addition, where the teacher has a style and the student another.

Same problems, same grammar, same checker and ground truth as `arith` (every styled solution is one
of `arith.line_options`), but the surface forms are not drawn uniformly: a `Style` weighs each
factor of a line's form separately,

    header   "by columns" | "units first" | "digit sums"
    label    "c{i}:" | "col {i}:" | "{i})"
    order    digits top-down, carry last | bottom-up, carry last | carry first, top-down | carry first, bottom-up
    phrase   "{terms}={s}, {d} c{c}" | "{terms}={s} -> {d} carry {c}" | "{terms} is {s}: {d} c{c}"

and a form's probability is the product of its factors' weights. The teacher is trained on one
Zipf-skewed mix and the student on the reversed ranking, so the student's favourite forms are the
teacher's rarest: choosing one costs the student loss under the teacher (a high-loss token) while
its arithmetic may be right, and the ground truth (`arith.is_recoverable`) calls that token benign.
This is the case TOPD's near-future test is built for (the paper's surface-form false alarms).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from services.task.arith import _HEADERS, _LABELS, _PHRASES, ANSWER_PREFIX, Column, Problem, columns
from topd_client.errors import ConfigurationError

N_ORDERS = 4  # term orders of a column line (see the module docstring)


def zipf_weights(n: int, s: float, reverse: bool = False) -> tuple[float, ...]:
    """Normalised weights 1/r^s over ranks r = 1..n (the last rank first when reverse). s = 0 is uniform."""
    if n < 1 or s < 0:
        raise ConfigurationError(f"zipf_weights needs n >= 1 and s >= 0, got n={n}, s={s}")
    raw = [1.0 / (r**s) for r in range(1, n + 1)]
    total = sum(raw)
    w = tuple(x / total for x in raw)
    return w[::-1] if reverse else w


@dataclass(frozen=True)
class Style:
    """Weights of each factor of a line's surface form (each tuple sums to 1)."""

    headers: tuple[float, ...]
    labels: tuple[float, ...]
    orders: tuple[float, ...]
    phrases: tuple[float, ...]

    def __post_init__(self) -> None:
        for name, want in (("headers", len(_HEADERS)), ("labels", len(_LABELS)), ("orders", N_ORDERS),
                           ("phrases", len(_PHRASES))):
            w = getattr(self, name)
            if len(w) != want or min(w) < 0 or abs(sum(w) - 1.0) > 1e-9:
                raise ConfigurationError(f"Style.{name} must be {want} non-negative weights summing to 1, got {w}")

    @classmethod
    def zipf(cls, s: float, reverse: bool = False) -> "Style":
        """Zipf(s) over every factor, the forms ranked as listed in the module docstring (or reversed)."""
        return cls(zipf_weights(len(_HEADERS), s, reverse), zipf_weights(len(_LABELS), s, reverse),
                   zipf_weights(N_ORDERS, s, reverse), zipf_weights(len(_PHRASES), s, reverse))


# The built-in styled pair: a teacher with a strong style, a student whose favourite forms are its rarest.
TEACHER_STYLE = Style.zipf(3.0)
STUDENT_STYLE = Style.zipf(2.0, reverse=True)


def step_form(col: Column, label: int, order: int, phrase: int) -> str:
    """Column `col`'s line (no newline) in one surface form; the same strings as `arith.step_forms`."""
    s, d, c = col.total, col.total % 10, col.total // 10
    top_down, bottom_up = list(col.digits), list(reversed(col.digits))
    terms = (top_down + [col.carry_in], bottom_up + [col.carry_in], [col.carry_in] + top_down,
             [col.carry_in] + bottom_up)[order]
    text = "+".join(str(x) for x in terms)
    return _LABELS[label].format(i=col.index) + " " + _PHRASES[phrase].format(terms=text, s=s, d=d, c=c)


def _pick(weights: tuple[float, ...], rng: random.Random) -> int:
    return rng.choices(range(len(weights)), weights=weights)[0]


def render_styled(problem: Problem, style: Style, rng: random.Random) -> str:
    """A correct chain of thought plus answer line (no EOS), each line's form drawn from `style`."""
    lines = [_HEADERS[_pick(style.headers, rng)]]
    lines += [step_form(col, _pick(style.labels, rng), _pick(style.orders, rng), _pick(style.phrases, rng))
              for col in columns(problem)]
    return "\n".join(lines + [ANSWER_PREFIX + problem.answer])


_LINE_RE = re.compile(r"(?:c(?P<i0>\d+):|col (?P<i1>\d+):|(?P<i2>\d+)\)) (?P<terms>\d+(?:\+\d+)*)"
                      r"(?:=(?P<s0>\d+), (?P<d0>\d+) c(?P<c0>\d+)|=(?P<s1>\d+) -> (?P<d1>\d+) carry (?P<c1>\d+)"
                      r"| is (?P<s2>\d+): (?P<d2>\d+) c(?P<c2>\d+))")


def restyle(problem: Problem, text: str, style: Style, rng: random.Random) -> str:
    """`text` (a response, right or wrong) with its surface forms redrawn from `style`, its content kept.

    Every header and every column line in one of the grammar's forms gets a label, phrase (and, when
    its terms read the problem's digits and carry in one of the four orders, a term order) drawn from
    `style`; the numbers it states (column index, terms, sum, digit, carry) stay as written, errors
    included. Lines in no form (garbled ones, the answer) are kept as they are.
    """
    cols = columns(problem)
    out = []
    for line in text.split("\n"):
        if line in _HEADERS:
            out.append(_HEADERS[_pick(style.headers, rng)])
            continue
        m = _LINE_RE.fullmatch(line)
        if m is None:
            out.append(line)
            continue
        index = next(m.group(f"i{k}") for k in range(3) if m.group(f"i{k}") is not None)
        s, d, c = next((m.group(f"s{k}"), m.group(f"d{k}"), m.group(f"c{k}")) for k in range(3)
                       if m.group(f"s{k}") is not None)
        terms = m.group("terms")
        i = int(index)
        if 1 <= i <= len(cols):
            col = cols[i - 1]
            orders = [step_form(col, 0, o, 0).split(" ", 1)[1].split("=", 1)[0] for o in range(N_ORDERS)]
            if terms in orders:
                terms = orders[_pick(style.orders, rng)]
        label = _LABELS[_pick(style.labels, rng)].format(i=index)
        out.append(label + " " + _PHRASES[_pick(style.phrases, rng)].format(terms=terms, s=s, d=d, c=c))
    return "\n".join(out)
