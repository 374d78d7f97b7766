"""The styled task: styles, the generator, its ground truth, and the detector scored on a known batch."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from services.task import arith, styled
from services.task.arith import Problem
from services.task.styled import Style, render_styled, step_form, zipf_weights

P = Problem(operands=(730, 836, 739), n_digits=3)  # columns (0,6,9)+0=15, (3,3,3)+1=10, (7,8,7)+1=23


def one_form(header: int, label: int, order: int, phrase: int) -> Style:
    """A style that always writes the same form."""
    def pick(i: int, n: int) -> tuple[float, ...]:
        return tuple(1.0 if j == i else 0.0 for j in range(n))
    return Style(pick(header, 3), pick(label, 3), pick(order, 4), pick(phrase, 3))


def test_zipf_weights_by_hand():
    assert zipf_weights(3, 1.0) == pytest.approx((6 / 11, 3 / 11, 2 / 11))
    assert zipf_weights(3, 1.0, reverse=True) == pytest.approx((2 / 11, 3 / 11, 6 / 11))
    assert zipf_weights(4, 0.0) == pytest.approx((0.25,) * 4)
    assert zipf_weights(4, 2.0)[0] == pytest.approx(1 / (1 + 1 / 4 + 1 / 9 + 1 / 16))


def test_style_refuses_bad_weights():
    from topd_client.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="labels"):
        Style((1, 0, 0), (0.5, 0.5), (1, 0, 0, 0), (1, 0, 0))
    with pytest.raises(ConfigurationError, match="orders"):
        Style((1, 0, 0), (1, 0, 0), (0.5, 0.2, 0.2, 0.2), (1, 0, 0))


def test_step_form_by_hand_and_same_grammar_as_arith():
    c1, c2, c3 = arith.columns(P)
    assert step_form(c1, 0, 0, 0) == "c1: 0+6+9+0=15, 5 c1"
    assert step_form(c1, 2, 1, 2) == "1) 9+6+0+0 is 15: 5 c1"
    assert step_form(c1, 1, 2, 1) == "col 1: 0+0+6+9=15 -> 5 carry 1"
    assert step_form(c3, 2, 3, 0) == "3) 1+7+8+7=23, 3 c2"
    for col in (c1, c2, c3):  # every styled form is a form of the arith grammar, and all of them are reachable
        styled_forms = {step_form(col, li, oi, pi) for li in range(3) for oi in range(4) for pi in range(3)}
        assert styled_forms == set(arith.step_forms(col))


def test_render_styled_by_hand():
    text = render_styled(P, one_form(1, 2, 0, 1), random.Random(0))
    assert text == ("units first\n"
                    "1) 0+6+9+0=15 -> 5 carry 1\n"
                    "2) 3+3+3+1=10 -> 0 carry 1\n"
                    "3) 7+8+7+1=23 -> 3 carry 2\n"
                    "answer: 2305")
    assert arith.check_chain(P, text) and all(arith.label_tokens(P, list(text)))


def test_render_styled_follows_the_style():
    rng = random.Random(1)
    problems = arith.make_splits(arith.TaskConfig(), 200, 0, 0)["train"]
    labels = Counter()
    for p in problems:
        text = render_styled(p, styled.TEACHER_STYLE, rng)
        assert arith.check_chain(p, text)
        for line in text.split("\n")[1:-1]:
            labels[0 if line.startswith("c") and not line.startswith("col") else 1 if line.startswith("col") else 2] += 1
    n = sum(labels.values())
    for i, w in enumerate(styled.TEACHER_STYLE.labels):  # 600 lines: within 4 standard errors
        assert abs(labels[i] / n - w) < 4 * math.sqrt(w * (1 - w) / n) + 1e-3


def test_restyle_by_hand_keeps_numbers_and_errors():
    text = ("units first\n1) 0+6+9+0=16 -> 6 carry 1\ncol 2: 3+3+3+1 is 10: 0 c1\nc3: 7+8+7+2=24, 4 c2\n"
            "garbage\nanswer: 2406")
    assert styled.restyle(P, text, one_form(2, 1, 3, 2), random.Random(0)) == (
        "digit sums\n"
        "col 1: 0+9+6+0 is 16: 6 c1\n"   # wrong sum kept; terms read the digits: carry first, bottom-up
        "col 2: 1+3+3+3 is 10: 0 c1\n"
        "col 3: 7+8+7+2 is 24: 4 c2\n"   # a wrong carry among the terms: their order is kept
        "garbage\nanswer: 2406")
    rng = random.Random(5)
    for p in arith.make_splits(arith.TaskConfig(), 30, 0, 0)["train"]:  # a correct solution stays correct
        again = styled.restyle(p, arith.render_solution(p, rng), styled.STUDENT_STYLE, rng)
        assert arith.check_chain(p, again)


def test_teacher_and_student_prefer_different_forms():
    t, s = styled.TEACHER_STYLE, styled.STUDENT_STYLE
    for factor in ("headers", "labels", "orders", "phrases"):
        tw, sw = getattr(t, factor), getattr(s, factor)
        favourite = sw.index(max(sw))
        assert favourite != tw.index(max(tw)) and tw[favourite] == min(tw)


# ------------------------------------------------------------------ ground truth and the detector

RESPONSES = [  # (response text, the cut where it becomes unrecoverable or None)
    ("units first\n1) 0+6+9+0=15 -> 5 carry 1\n2) 3+3+3+1=10 -> 0 carry 1\n", None),
    ("by columns\nc1: 0+6+9+0=16, 6 c1\n", len("by columns\nc1: 0+6+9+0=16")),
]


def test_styled_error_labels_on_a_known_batch():
    from services.task.models import build_tokenizer
    from services.task.styled_plugin import StyledTask
    from services.trainer.task_api import candidate_truth

    tok = build_tokenizer()
    records = [{"prompt": P.prompt, "operands": list(P.operands), "n_digits": 3}] * 2
    responses = [tok.encode(text, add_special_tokens=False) for text, _ in RESPONSES]
    # row 0: the label "1)" and the phrase's "-" (form choices); row 1: the "1" of "16" (still "15"-able),
    # the wrong "6", and the "c" of the line's "c1" after it
    wrong = RESPONSES[1][1] - 1
    rows, cols = [0, 0, 1, 1, 1], [12, 26, wrong - 1, wrong, wrong + 5]
    assert [tok.decode(responses[r][c:c + 1]) for r, c in zip(rows, cols)] == ["1", "-", "1", "6", "c"]
    labels = StyledTask().error_labels(records, responses, rows, cols, tok)
    assert labels.tolist() == [False, False, False, True, True]
    truth = candidate_truth(StyledTask(), records, responses, rows, cols, tok)
    assert truth.error_N.tolist() == labels.tolist()
    assert truth.fork_N.tolist() == [False, False, False, True, False]  # the wrong "6" is where row 1 was lost


def _completion(text: str, tok) -> SimpleNamespace:
    return SimpleNamespace(tokens=tok.encode(text, add_special_tokens=False))


def test_detector_auc_on_a_known_batch_by_hand():
    """Five candidates with known labels, windows written by hand, D by one-hot OT, AUC by hand."""
    import torch

    from services.task.models import build_tokenizer
    from services.trainer.clients import Branches
    from services.trainer.detect import DetectionConfig, divergence
    from services.trainer.diagnostics import detector_scores
    from services.trainer.objective import divergent_set
    from services.trainer.ot import OTConfig

    tok = build_tokenizer()
    # teacher vs student windows of 4 characters; one-hot OT of equal-length windows = 1 - shared/4
    pairs = [("c1: ", "c1: "),   # benign, D = 0
             ("=15,", "=15 "),   # benign, D = 0.25
             ("5 c1", "6 c1"),   # error,  D = 0.25
             ("6 c1", "6 c0"),   # error,  D = 0.25 ("1" vs "0")
             ("15 -", "16, ")]   # error,  D = 0.5 ("1", " " shared)
    branches = Branches([], [_completion(t, tok) for t, _ in pairs], [_completion(s, tok) for _, s in pairs])
    cfg = DetectionConfig(0.2, "trajectory", None, 4, 0.0, "threshold", 0.7, 0.2, True, OTConfig())
    D_N = divergence(branches, cfg, None)
    assert D_N.tolist() == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.5])
    error_N = [False, False, True, True, True]
    divergent = divergent_set(D_N, cfg.divergent_rule, cfg.divergent_frac, cfg.divergent_threshold)
    fork_N = [False, False, True, False, False]  # the first error; the other two come after their fork
    scores = detector_scores(error_N, D_N, divergent, fork_N)
    # pairs (error, benign): D 0.25 vs 0 win, 0.25 vs 0.25 tie (x2), 0.5 wins both -> (1 + .5 + 1 + .5 + 2) / 6
    assert scores["gt/auc"] == pytest.approx(5 / 6)
    # threshold 0.2: divergent = the four with D = 0.25 or 0.5; three of them are errors, all errors caught
    assert divergent.tolist() == [False, True, True, True, True]
    assert scores["gt/precision"] == pytest.approx(3 / 4) and scores["gt/recall"] == 1.0
    assert scores["gt/benign_frac"] == pytest.approx(2 / 5)
    # forks only: the fork's D 0.25 against benign 0 (win) and 0.25 (tie) -> 0.75
    assert scores["gt/auc_forks"] == pytest.approx(0.75) and scores["gt/after_error_frac"] == pytest.approx(2 / 5)
    # the one false-alarm call (D = 0) is benign; it finds one of the two benign candidates
    assert scores["gt/fa_precision"] == 1.0 and scores["gt/fa_recall"] == 0.5
    assert isinstance(D_N, torch.Tensor)
