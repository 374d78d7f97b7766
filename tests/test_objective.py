"""The TOPD objective (services/trainer/objective.py, diagnostics.py) on hand-worked tensors."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from services.trainer.diagnostics import batch_diagnostics, choose_threshold, pearson, roc_auc, spearman
from services.trainer.kl import entropy, gather_logprobs, topk_forward_kl, topk_reverse_kl
from services.trainer.objective import (
    VARIANTS,
    Detection,
    OPDConfig,
    OPDInputs,
    TrajConfig,
    aggregate_tokens,
    discount_backward,
    divergent_by_fraction,
    divergent_by_threshold,
    divergent_set,
    fraction_count,
    get_variant,
    masked_variance,
    opd_advantages,
    opd_loss,
    select_candidates,
    token_loss,
    traj_loss,
    traj_num_tokens,
    variant_weights,
)

# ---------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binned_kl_ref(p: np.ndarray, q: np.ndarray, ids: np.ndarray) -> float:
    """KL(p || q) in float64 after merging every id outside `ids` into one tail bin."""
    pb = np.r_[p[ids], 1 - p[ids].sum()]
    qb = np.r_[q[ids], 1 - q[ids].sum()]
    keep = pb > 1e-15
    return float((pb[keep] * np.log(pb[keep] / qb[keep])).sum())


# ---------------------------------------------------------------- counting and aggregation


def test_fraction_count_is_ceil_without_float_drift() -> None:
    assert fraction_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 in floats
    assert fraction_count(0.2, 3) == 1
    assert fraction_count(0.2, 0) == 0
    assert fraction_count(0.0, 5) == 0
    assert fraction_count(1.0, 5) == 5
    assert fraction_count(1e-12, 5) == 1


def test_aggregate_tokens_ignores_nonfinite_padding() -> None:
    x = torch.tensor([[1.0, 3.0, float("nan")], [2.0, float("inf"), 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate_tokens(x, mask).item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert aggregate_tokens(x, mask, num_tokens=12).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- OPD


def test_discount_by_hand() -> None:
    # gamma = 0.5, row 0: x = (1, 2, 3, pad): x'_2 = 3, x'_1 = 2 + 1.5 = 3.5, x'_0 = 1 + 1.75 = 2.75.
    # row 1 has a hole at t = 1: x'_2 = 4, x'_1 = 0, x'_0 = 1 + 0.5 * 0 + 0.25 * 4 = 2.
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [1.0, 100.0, 4.0, 99.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, False]])
    out = discount_backward(x, mask, 0.5)
    assert out.tolist() == [[2.75, 3.5, 3.0, 0.0], [2.0, 0.0, 4.0, 0.0]]
    assert discount_backward(x, mask, 0.0).tolist() == [[1.0, 2.0, 3.0, 0.0], [1.0, 0.0, 4.0, 0.0]]


def test_opd_loss_and_metrics_by_hand() -> None:
    # On-policy (rho = 1). A = teacher - student = (-1, -3, +1) on the three response tokens.
    student = torch.tensor([[-1.0, -1.0, -2.0, -5.0]])
    teacher = torch.tensor([[-2.0, -4.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    inp = OPDInputs(student.clone().requires_grad_(), student, teacher, mask)
    loss, m = opd_loss(inp)
    assert loss.item() == pytest.approx(-(-1 - 3 + 1) / 3)
    assert m["opd/reverse_kl"] == pytest.approx(1.0)
    assert m["opd/rho_mean"] == pytest.approx(1.0)
    assert m["opd/clip_frac"] == 0.0
    assert m["opd/adv_var"] == pytest.approx(8 / 3)  # mean -1: (0 + 4 + 4) / 3; padding's 5 left out
    # Clip at c = 2: A = (-1, -2, 1), one of three tokens clipped.
    loss, m = opd_loss(inp, OPDConfig(adv_clip=2.0))
    assert loss.item() == pytest.approx(2 / 3)
    assert m["opd/clip_frac"] == pytest.approx(1 / 3)
    assert m["opd/reverse_kl"] == pytest.approx(1.0)  # the metric is before clipping
    assert m["opd/adv_var"] == pytest.approx(14 / 9)  # of the clipped A = (-1, -2, 1): mean -2/3


def test_masked_variance_and_entropy_by_hand() -> None:
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_variance(x, mask) == pytest.approx(8 / 3)  # mean 3: (4 + 0 + 4) / 3
    assert masked_variance(x, torch.zeros_like(mask)) == 0.0
    # p = (0.5, 0.3, 0.2): H = -(0.5 ln 0.5 + 0.3 ln 0.3 + 0.2 ln 0.2) = 1.0297 nats; uniform over 4: ln 4;
    # an id at -inf (p = 0) adds nothing: (0, 0, -inf) is uniform over 2.
    logits = torch.stack([torch.tensor([0.5, 0.3, 0.2]).log() + 7.0, torch.zeros(3)])
    assert entropy(logits).tolist() == pytest.approx([1.0296530, math.log(3)], abs=1e-6)
    assert entropy(torch.tensor([[0.0, 0.0, -math.inf]])).item() == pytest.approx(math.log(2))


def test_opd_importance_ratio_and_discount() -> None:
    sampler = torch.tensor([[-1.0, -1.0]])
    new = sampler + torch.tensor([[math.log(2.0), 0.0]])  # the policy moved: rho = (2, 1)
    teacher = torch.tensor([[0.0, -3.0]])  # r = (1, -2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = opd_loss(OPDInputs(new, sampler, teacher, mask, num_tokens=4.0))
    assert loss.item() == pytest.approx(-(2 * 1 + 1 * -2) / 4)
    assert m["opd/rho_mean"] == pytest.approx(1.5)
    # gamma = 0.5: A = (1 + 0.5 * -2, -2) = (0, -2); the metric stays the raw reverse KL.
    loss, m = opd_loss(OPDInputs(new, sampler, teacher, mask), OPDConfig(kl_discount=0.5))
    assert loss.item() == pytest.approx(-(2 * 0 + 1 * -2) / 2)
    assert m["opd/reverse_kl"] == pytest.approx(0.5)


def _opd_toy(weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, V = 2, 4, 5
    logits = torch.randn(B, T, V, generator=_gen(0), requires_grad=True)
    ids = torch.randint(V, (B, T), generator=_gen(1))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    teacher = torch.randn(B, T, generator=_gen(2)).clamp(max=-0.1).requires_grad_()
    sampler = (gather_logprobs(logits, ids[..., None])[..., 0].detach() - 0.1).requires_grad_()
    new = gather_logprobs(logits, ids[..., None])[..., 0]
    loss, _ = opd_loss(OPDInputs(new, sampler, teacher, mask, weights_BT=weights))
    loss.backward()
    return logits.grad, teacher, sampler, mask


def test_opd_gradients_flow_only_to_the_policy_at_response_tokens() -> None:
    grad, teacher, sampler, mask = _opd_toy()
    assert teacher.grad is None and sampler.grad is None
    per_token = grad.abs().sum(-1)
    assert (per_token[~mask] == 0).all()
    assert (per_token[mask] > 0).all()


def test_opd_zero_weight_tokens_get_no_gradient() -> None:
    w = torch.ones(2, 4)
    w[0, 1] = 0.0
    grad, _, _, mask = _opd_toy(w)
    per_token = grad.abs().sum(-1)
    assert per_token[0, 1] == 0
    assert (per_token[mask & (w > 0)] > 0).all()


def test_opd_gradient_matches_formula() -> None:
    # dL/dlogp_new_t = -w_t rho_t A_t / N.
    new = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampler = torch.tensor([[-1.2, -2.0, -0.1]])
    teacher = torch.tensor([[-0.5, -3.0, -1.0]])
    w = torch.tensor([[1.0, 0.5, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = opd_loss(OPDInputs(new, sampler, teacher, mask, weights_BT=w))
    loss.backward()
    rho = torch.exp(new.detach() - sampler)
    expected = -w * rho * (teacher - sampler) / 3
    assert torch.allclose(new.grad, expected)


@pytest.mark.parametrize("source", ["sampler", "current"])
def test_advantages_are_stop_gradient(source: str) -> None:
    sampler = torch.tensor([[-1.0, -2.0]])
    teacher = torch.tensor([[-0.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    new = torch.tensor([[-1.1, -2.2]], requires_grad=True)
    cfg = OPDConfig(advantage_from=source)
    adv = opd_advantages(OPDInputs(new, sampler, teacher, mask), cfg)
    assert not adv.requires_grad
    moved = opd_advantages(OPDInputs(new + 0.3, sampler, teacher, mask), cfg)
    # from the sampler, A_t ignores the current policy; from the current one it follows it (detached)
    assert torch.equal(adv, moved) == (source == "sampler")
    if source == "current":
        assert torch.allclose(moved - adv, torch.full_like(adv, -0.3))


def test_bad_opd_config_names_valid_options() -> None:
    with pytest.raises(ValueError, match="sampler, current"):
        OPDConfig(advantage_from="teacher")


# ---------------------------------------------------------------- top-k KL terms


@pytest.mark.parametrize("k", [6, 3])  # k = V: no tail; k < V: a real tail
def test_kl_terms_zero_when_student_equals_teacher(k: int) -> None:
    logp_V = torch.log_softmax(torch.randn(2, 6, generator=_gen(3)), -1)
    ids = logp_V.topk(k, -1).indices
    logp_k = logp_V.gather(-1, ids)
    assert topk_forward_kl(logp_k, logp_k).abs().max().item() < 1e-6
    assert topk_reverse_kl(logp_k, logp_k).abs().max().item() < 1e-6


@pytest.mark.parametrize("k", [6, 3])
def test_kl_terms_match_float64_reference(k: int) -> None:
    t_logits = torch.randn(3, 6, generator=_gen(4))
    s_logits = torch.randn(3, 6, generator=_gen(5))
    ids = t_logits.topk(k, -1).indices
    t_k = torch.log_softmax(t_logits, -1).gather(-1, ids)
    s_k = gather_logprobs(s_logits, ids)
    fwd = topk_forward_kl(s_k, t_k)
    rev = topk_reverse_kl(s_k, t_k)
    pT = torch.softmax(t_logits.double(), -1).numpy()
    pS = torch.softmax(s_logits.double(), -1).numpy()
    for n in range(3):
        assert fwd[n].item() == pytest.approx(_binned_kl_ref(pT[n], pS[n], ids[n].numpy()), abs=1e-5)
        assert rev[n].item() == pytest.approx(_binned_kl_ref(pS[n], pT[n], ids[n].numpy()), abs=1e-5)
    no_tail = topk_reverse_kl(s_k, t_k, tail=False)
    ref = (pS[0][ids[0]] * np.log(pS[0][ids[0]] / pT[0][ids[0]])).sum()
    assert no_tail[0].item() == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------- candidates and classification

LOSS = torch.tensor([[5.0, 1.0, 3.0, 2.0], [6.0, 7.0, 9.0, 100.0]])  # 100 sits on padding
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])


def _cells(mask_BT: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(x) for x in mask_BT.nonzero().tolist()}


def test_candidates_trajectory_scope() -> None:
    # q = 0.5: row 0 keeps ceil(2) = 2 of (5, 1, 3, 2); row 1 keeps ceil(1.5) = 2 of (6, 7, 9).
    cand = select_candidates(LOSS, MASK, 0.5, "trajectory")
    assert _cells(cand) == {(0, 0), (0, 2), (1, 2), (1, 1)}
    # q = 0.1: at least one per non-empty row.
    assert _cells(select_candidates(LOSS, MASK, 0.1, "trajectory")) == {(0, 0), (1, 2)}


def test_candidates_batch_scope_and_cap() -> None:
    # 7 response tokens, q = 0.5: ceil(3.5) = 4 highest overall: 9, 7, 6, 5.
    cand = select_candidates(LOSS, MASK, 0.5, "batch")
    assert _cells(cand) == {(1, 2), (1, 1), (1, 0), (0, 0)}
    # trajectory picks (5, 3, 9, 7); a cap of 3 keeps the three highest: 9, 7, 5.
    capped = select_candidates(LOSS, MASK, 0.5, "trajectory", max_candidates=3)
    assert _cells(capped) == {(1, 2), (1, 1), (0, 0)}


def test_candidates_edge_cases() -> None:
    empty_row = MASK.clone()
    empty_row[1] = False
    assert _cells(select_candidates(LOSS, empty_row, 0.5)) == {(0, 0), (0, 2)}
    assert not select_candidates(LOSS, MASK, 0.0).any()
    with pytest.raises(ValueError, match="trajectory, batch"):
        select_candidates(LOSS, MASK, 0.5, "sequence")


def test_token_loss_is_detached_student_minus_teacher() -> None:
    s = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = token_loss(s, torch.tensor([-3.0, -1.0]))
    assert out.tolist() == [2.0, -1.0] and not out.requires_grad


def test_classification_fraction_and_threshold() -> None:
    D = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    # 0.6 of 5 = 3 highest: 0.9, 0.7, 0.5.
    assert divergent_by_fraction(D, 0.6).tolist() == [False, True, True, False, True]
    assert divergent_by_threshold(D, 0.4).tolist() == [False, True, True, False, True]


def test_divergent_set_by_rule() -> None:
    D = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7], dtype=torch.float64)
    # fraction: always 2 of 5 (0.4), whatever D is; threshold: however many clear the bar
    assert divergent_set(D, "fraction", 0.4, None).tolist() == [False, True, False, False, True]
    assert divergent_set(D, "threshold", 0.4, 0.2).tolist() == [False, True, True, True, True]
    assert divergent_set(D * 0.1, "threshold", 0.4, 0.2).tolist() == [False] * 5
    assert divergent_set(D * 0.1, "fraction", 0.4, None).sum() == 2
    with pytest.raises(ValueError, match="fraction, threshold"):
        divergent_set(D, "top", 0.4, None)
    with pytest.raises(ValueError, match="needs a threshold"):
        divergent_set(D, "threshold", 0.4, None)


def test_choose_threshold_by_hand() -> None:
    D = [0.1, 0.2, 0.3, 0.4, 0.5]
    error = [0, 0, 1, 0, 1]
    # cuts 0.15 / 0.25 / 0.35 / 0.45: recall 1, 1, .5, .5; false-positive rate 2/3, 1/3, 1/3, 0;
    # Youden's J .33, .67, .17, .5: the bar is 0.25
    assert choose_threshold(D, error) == pytest.approx(0.25)
    assert choose_threshold([0.3, 0.3, 0.9], [0, 1, 1]) == pytest.approx(0.6)
    assert choose_threshold([0.5, 0.5], [0, 1]) == 0.5  # nothing to separate: the only value
    with pytest.raises(ValueError, match="both benign and error"):
        choose_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="3 values of D but 2 labels"):
        choose_threshold([0.1, 0.2, 0.3], [0, 1])


def test_threshold_rule_settings() -> None:
    from services.trainer.detect import DetectionConfig
    from services.trainer.settings import load_settings

    s = load_settings(None, ["divergent_rule=threshold", "divergent_threshold=0.3"])
    cfg = DetectionConfig.from_settings(s.detection)
    assert (cfg.divergent_rule, cfg.divergent_threshold) == ("threshold", 0.3)
    with pytest.raises(ValueError, match="needs divergent_threshold"):
        load_settings(None, ["divergent_rule=threshold"])
    with pytest.raises(ValueError, match="divergent_threshold"):
        load_settings(None, ["divergent_rule=threshold", "divergent_threshold=3"])


# ---------------------------------------------------------------- weights per variant


def _detection() -> Detection:
    # Candidates in row-major order: (0,0), (0,2), (1,1), (1,2) with D = 0.1, 0.9, 0.5, 0.3.
    cand = torch.zeros(2, 4, dtype=torch.bool)
    for r, c in [(0, 0), (0, 2), (1, 1), (1, 2)]:
        cand[r, c] = True
    D = torch.tensor([0.1, 0.9, 0.5, 0.3])
    # divergent_frac 0.5: top 2 by D are (0,2) and (1,1); false alarms (0,0) and (1,2).
    return Detection(cand, D, divergent_by_fraction(D, 0.5))


def test_variant_weights_by_hand() -> None:
    det, mask, a = _detection(), torch.ones(2, 4, dtype=torch.bool), 0.25
    ones = torch.ones(2, 4)
    assert torch.equal(variant_weights("opd", mask, None, a), ones)
    suppress = ones.clone()
    suppress[0, 0] = suppress[1, 2] = a  # the two false alarms
    assert torch.equal(variant_weights("opd_suppress", mask, det, a), suppress)
    control = ones.clone()
    control[0, 2] = control[1, 1] = a  # as many (2), but the highest-D candidates
    assert torch.equal(variant_weights("opd_suppress_control", mask, det, a), control)
    assert torch.equal(variant_weights("topd", mask, det, a), suppress)
    assert get_variant("topd").uses_traj and not get_variant("opd_suppress").uses_traj


def test_variant_errors() -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=", ".join(VARIANTS)):
        get_variant("topd_v2")
    with pytest.raises(ValueError, match="Detection"):
        variant_weights("opd_suppress", mask, None, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        variant_weights("opd", mask, None, 1.5)
    with pytest.raises(ValueError, match="4 candidates"):
        Detection(_detection().candidates_BT, torch.zeros(3), torch.zeros(3, dtype=torch.bool))


# ---------------------------------------------------------------- L_traj


def _windows(k: int, same: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K, V = 2, 3, 6
    t_logits = torch.randn(N, K, V, generator=_gen(6))
    s_logits = (t_logits if same else torch.randn(N, K, V, generator=_gen(7))).clone().requires_grad_()
    ids = t_logits.topk(k, -1).indices
    t_logp = torch.log_softmax(t_logits, -1).gather(-1, ids)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    ids = ids.masked_fill(~mask[..., None], -1)  # garbage padding must be ignored
    t_logp = t_logp.masked_fill(~mask[..., None], -math.inf)
    return s_logits, ids, t_logp, mask


@pytest.mark.parametrize("k", [6, 3])
def test_traj_zero_when_student_equals_teacher(k: int) -> None:
    loss, m = traj_loss(*_windows(k, same=True), num_tokens=10)
    assert abs(loss.item()) < 1e-6 and abs(m["topd/traj_kl"]) < 1e-6


def test_traj_value_normalisation_and_gradients() -> None:
    s_logits, ids, t_logp, mask = _windows(3, same=False)
    pS = torch.softmax(s_logits.detach().double(), -1).numpy()
    pT = np.exp(t_logp.double().numpy())
    ref = np.zeros((2, 3))
    for n, i in mask.nonzero().tolist():
        full_T = np.zeros(6)
        full_T[ids[n, i].numpy()] = pT[n, i]
        full_T[full_T == 0] = (1 - pT[n, i].sum()) / 3  # any split of the tail: it is binned
        ref[n, i] = _binned_kl_ref(full_T, pS[n, i], ids[n, i].numpy())
    u = (1.0, 0.5, 0.25)
    weighted = sum(ref[n, i] * u[i] for n, i in mask.nonzero().tolist())
    loss, _ = traj_loss(s_logits, ids, t_logp, mask, 10, TrajConfig(lam=2.0, offset_weights=u))
    assert loss.item() == pytest.approx(2.0 * weighted / 10, abs=1e-5)
    loss_w, m = traj_loss(s_logits, ids, t_logp, mask, None)  # N = the 4 window tokens
    assert loss_w.item() == pytest.approx(ref.sum() / 4, abs=1e-5)
    assert traj_num_tokens("window_tokens", 10, 4) == 4 and traj_num_tokens("response_tokens", 10, 4) == 10
    assert m["topd/num_windows"] == 2
    loss_w.backward()
    per_pos = s_logits.grad.abs().sum(-1)
    assert (per_pos[~mask] == 0).all() and (per_pos[mask] > 0).all()
    assert torch.isfinite(s_logits.grad).all()


def test_traj_config_errors() -> None:
    with pytest.raises(ValueError, match="response_tokens, window_tokens"):
        traj_num_tokens("per_window", 10, 4)
    with pytest.raises(ValueError, match="lambda"):
        TrajConfig(lam=-1.0)
    with pytest.raises(ValueError, match="offset weights"):
        traj_loss(*_windows(3, same=False), 5, TrajConfig(offset_weights=(1.0, 1.0)))


# ---------------------------------------------------------------- diagnostics


def test_correlations_match_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.3 * x + rng.normal(size=30)
    y[:5] = y[5]  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)


def test_correlations_degenerate_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson([1.0], [2.0]))
        assert math.isnan(pearson([], []))
        assert math.isnan(spearman([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))


def test_roc_auc_by_hand() -> None:
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # Positives 0.35 and 0.8 vs negatives 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both: 3/4.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # A tie counts half: 0.5 vs (0.5, 0.2) -> 0.5 + 1 over 2 pairs.
    assert roc_auc([0.5, 0.5, 0.2], [1, 0, 0]) == 0.75
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_batch_diagnostics_by_hand() -> None:
    det = _detection()
    loss = torch.zeros(2, 4)
    loss[0, 0], loss[0, 2], loss[1, 1], loss[1, 2] = 1.0, 2.0, 3.0, 4.0
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = batch_diagnostics(loss, mask, det)
    assert out["opd/reverse_kl"] == pytest.approx(10 / 8)
    assert out["topd/false_alarm_frac"] == 0.5
    assert out["topd/num_divergent"] == 2 and out["topd/num_candidates"] == 4
    assert out["topd/mean_ot"] == pytest.approx(0.45)
    D = [0.1, 0.9, 0.5, 0.3]
    assert out["topd/pearson"] == pytest.approx(stats.pearsonr([1, 2, 3, 4], D)[0])
    assert out["topd/spearman"] == pytest.approx(stats.spearmanr([1, 2, 3, 4], D)[0])
    none = Detection(torch.zeros(2, 4, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = batch_diagnostics(loss, mask, none)
    assert empty["topd/num_divergent"] == 0 and math.isnan(empty["topd/false_alarm_frac"])
    assert set(batch_diagnostics(loss, mask, None)) == {"opd/reverse_kl"}


# ---------------------------------------------------------------- OPD estimators (services/trainer/estimators.py)
from services.trainer.estimators import (  # noqa: E402
    ESTIMATORS,
    EstimatorInputs,
    estimator_loss,
    get_estimator,
    policy_metrics,
)
from topd_client.errors import ConfigurationError, InvalidInputError  # noqa: E402

# One position, V = 3: student p = (0.5, 0.3, 0.2), teacher q = (0.25, 0.25, 0.5).
P3, Q3 = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.25, 0.25, 0.5])
HAND = {  # worked by hand from P3, Q3
    "full": 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4),   # sum p log(p / q) = 0.218
    "student_topk": 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),  # bins {0}, {1, 2}: 0.5 log(4/3)
    "teacher_topk": 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8),    # forward, bins {2}, {0, 1}
    "teacher_topk/reverse": 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5),
    "sampled": math.log(0.3 / 0.25),  # y = 1, on-policy: log p(y) - log q(y)
}


def _hand_inputs(name: str, pad_with: float = float("nan")) -> EstimatorInputs:
    """B = 1, T = 2: position 0 is P3 vs Q3; position 1 is padding whose teacher numbers are pad_with."""
    logits = torch.stack([P3.log(), torch.zeros(3)])[None].requires_grad_()
    mask = torch.tensor([[True, False]])
    tokens = torch.tensor([[1, 0]])
    pad = torch.tensor([pad_with])
    if name == "sampled":
        return EstimatorInputs(logits, tokens, mask, logp_sampler_BT=torch.tensor([[math.log(0.3), 0.0]]),
                               logp_teacher_BT=torch.cat([Q3[1:2].log(), pad])[None])
    if name == "full":
        return EstimatorInputs(logits, tokens, mask, logp_teacher_BTk=torch.stack([Q3.log(), pad.expand(3)])[None])
    ids = {"student_topk": 0, "teacher_topk": 2}[name]
    return EstimatorInputs(logits, tokens, mask, ids_BTk=torch.tensor([[[ids], [7]]]),
                           logp_teacher_BTk=torch.tensor([[[math.log(Q3[ids])], [pad_with]]]))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimators_by_hand_with_nan_padding(name: str) -> None:
    """Hand-worked values; NaN teacher numbers (and an out-of-vocabulary id) at padding change nothing."""
    inp = _hand_inputs(name)
    loss, m = estimator_loss(name, inp)
    assert loss.item() == pytest.approx(HAND[name], abs=1e-6)
    expected_rkl = HAND["teacher_topk/reverse"] if name == "teacher_topk" else HAND[name]
    assert m["opd/reverse_kl"] == pytest.approx(expected_rkl, abs=1e-6)  # every estimator reports it
    assert all(key.startswith("opd/") for key in m) and "opd/loss" in m
    loss.backward()
    assert torch.isfinite(inp.logits_BTV.grad).all() and (inp.logits_BTV.grad[0, 1] == 0).all()


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_reports_entropy_and_sampler_gap_by_hand(name: str) -> None:
    """The student's entropy at response tokens and |log pi_theta(y) - log pi_sampler(y)|, padding left out."""
    inp = _hand_inputs(name)
    sampler = torch.tensor([[math.log(0.3) - 0.1, 5.0]])  # the sampler gave y = 1 e^-0.1 of the trainer's 0.3
    _, m = estimator_loss(name, dataclasses.replace(inp, logp_sampler_BT=sampler))
    assert m["opd/entropy"] == pytest.approx(1.0296530, abs=1e-6)
    assert m["opd/sampler_logp_gap"] == pytest.approx(0.1, abs=1e-6)


def test_policy_metrics_read_evenly_spaced_positions_of_a_large_vocabulary() -> None:
    """Position t of 5 is uniform over its first t + 1 ids (H = ln(t + 1)); a budget of 2 positions' logits
    reads positions 0 and 4 (of the response positions, in row-major order); padding is never read."""
    V = 6
    logits = torch.full((2, 4, V), -math.inf)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    for t, (b, c) in enumerate(mask.nonzero().tolist()):
        logits[b, c, : t + 1] = 0.0
    inp = EstimatorInputs(logits, torch.zeros(2, 4, dtype=torch.long), mask,
                          logp_sampler_BT=torch.tensor([[0.0, -1.0, -2.0, 9.0], [-3.0, -4.0, 9.0, 9.0]]))
    every = policy_metrics(inp)
    assert every["opd/entropy"] == pytest.approx(sum(math.log(t + 1) for t in range(5)) / 5)
    two = policy_metrics(inp, budget=2 * V)
    assert two["opd/entropy"] == pytest.approx((math.log(1) + math.log(5)) / 2)
    # y = id 0 at both: log p = 0 and -ln 5 against the sampler's 0 and -4
    assert two["opd/sampler_logp_gap"] == pytest.approx((0.0 + abs(-math.log(5) + 4.0)) / 2)


def test_topk_estimator_mass_metrics_and_full_forward_kl_by_hand() -> None:
    _, m = estimator_loss("student_topk", _hand_inputs("student_topk"))
    assert m["opd/student_topk_mass"] == pytest.approx(0.5) and m["opd/teacher_topk_mass"] == pytest.approx(0.25)
    _, m = estimator_loss("teacher_topk", _hand_inputs("teacher_topk"))
    assert m["opd/forward_kl"] == pytest.approx(HAND["teacher_topk"], abs=1e-6)
    _, m = estimator_loss("full", _hand_inputs("full"))
    assert m["opd/forward_kl"] == pytest.approx(float((Q3 * (Q3 / P3).log()).sum()), abs=1e-6)


def _random_problem(seed: int, B: int = 2, T: int = 5, V: int = 7, k: int = 3):
    """Student logits, a full teacher distribution, sampled tokens, a mask with padding, weights."""
    g = _gen(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t_BTV = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    s_ids = logits.topk(k, dim=-1).indices
    t_ids = t_BTV.topk(k, dim=-1).indices
    return logits, t_BTV, tokens, mask, w, s_ids, t_ids


def _inputs(name: str, logits, t_BTV, tokens, mask, w, s_ids, t_ids, num_tokens=None) -> EstimatorInputs:
    logp_BTV = torch.log_softmax(logits.detach(), -1)
    common = dict(weights_BT=w, num_tokens=num_tokens)
    if name == "sampled":
        return EstimatorInputs(logits, tokens, mask, logp_sampler_BT=logp_BTV.gather(-1, tokens[..., None])[..., 0],
                               logp_teacher_BT=t_BTV.gather(-1, tokens[..., None])[..., 0], **common)
    if name == "full":
        return EstimatorInputs(logits, tokens, mask, logp_teacher_BTk=t_BTV, **common)
    ids = s_ids if name == "student_topk" else t_ids
    return EstimatorInputs(logits, tokens, mask, ids_BTk=ids, logp_teacher_BTk=t_BTV.gather(-1, ids), **common)


def _binned(p_BTV: torch.Tensor, ids_BTk: torch.Tensor) -> torch.Tensor:
    """[B, T, k + 1]: the probabilities of the k ids, then of everything else (plain formula)."""
    head = p_BTV.gather(-1, ids_BTk)
    return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)


def _plain_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def _plain_loss(name: str, logits, t_BTV, tokens, mask, w, s_ids, t_ids) -> torch.Tensor:
    """The estimator's formula written out with softmax, sums and logs (float64), for autograd."""
    p, q = torch.softmax(logits, -1), t_BTV.exp()
    if name == "full":
        kl = _plain_kl(p, q)
    elif name == "student_topk":
        kl = _plain_kl(_binned(p, s_ids), _binned(q, s_ids))
    elif name == "teacher_topk":
        kl = _plain_kl(_binned(q, t_ids), _binned(p, t_ids))
    else:  # on-policy: rho = p(y) / stopgrad(p(y)), A = stopgrad(log q(y) - log p(y))
        p_y, q_y = p.gather(-1, tokens[..., None])[..., 0], q.gather(-1, tokens[..., None])[..., 0]
        kl = -(p_y / p_y.detach()) * (q_y.log() - p_y.log()).detach()
    return (w * kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_value_and_gradient_match_autograd_of_the_plain_formula(name: str) -> None:
    problem = _random_problem(seed=10)
    logits = problem[0].clone().requires_grad_()
    ref_logits = problem[0].clone().requires_grad_()
    loss, _ = estimator_loss(name, _inputs(name, logits, *problem[1:]))
    ref = _plain_loss(name, ref_logits, *problem[1:])
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-7, atol=1e-10)


def test_sampled_estimator_is_unbiased_for_the_full_gradient() -> None:
    """Weighting the sampled estimator's loss at every possible token y by p(y) (the weights compose)
    gives exactly the gradient of the exact reverse KL: E_y[A grad log p(y)] = grad KL."""
    V = 6
    g = _gen(3)
    logits_V = torch.randn(V, generator=g, dtype=torch.float64)
    t_V = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    logits = logits_V.expand(V, 1, V).clone().requires_grad_()  # row y samples token y
    tokens = torch.arange(V)[:, None]
    p_y = torch.softmax(logits_V, -1)[:, None]
    inp = EstimatorInputs(logits, tokens, torch.ones(V, 1, dtype=torch.bool),
                          logp_sampler_BT=p_y.log(), logp_teacher_BT=t_V[:, None], weights_BT=p_y, num_tokens=1.0)
    estimator_loss("sampled", inp)[0].backward()
    full_logits = logits_V[None, None].clone().requires_grad_()
    estimator_loss("full", EstimatorInputs(full_logits, tokens[:1], torch.ones(1, 1, dtype=torch.bool),
                                           logp_teacher_BTk=t_V[None, None]))[0].backward()
    torch.testing.assert_close(logits.grad.sum(0), full_logits.grad[0], rtol=1e-9, atol=1e-12)


def test_full_equals_exact_kl_and_topk_with_k_equal_v_equals_full() -> None:
    logits, t_BTV, tokens, mask, w, _, _ = _random_problem(seed=11)
    perm = torch.argsort(torch.rand(logits.shape, generator=_gen(12)), -1)  # every id once, shuffled
    grads, losses = {}, {}
    for name, kw in [("full", dict(logp_teacher_BTk=t_BTV)),
                     ("full_by_ids", dict(ids_BTk=perm, logp_teacher_BTk=t_BTV.gather(-1, perm))),
                     ("student_topk", dict(ids_BTk=perm, logp_teacher_BTk=t_BTV.gather(-1, perm)))]:
        x = logits.clone().requires_grad_()
        loss, m = estimator_loss(name.removesuffix("_by_ids"), EstimatorInputs(x, tokens, mask, weights_BT=w, **kw))
        loss.backward()
        grads[name], losses[name] = x.grad, (loss.item(), m["opd/reverse_kl"])
    exact = torch.nn.functional.kl_div(t_BTV, torch.log_softmax(logits, -1), log_target=True, reduction="none").sum(-1)
    assert losses["full"][1] == pytest.approx(float(exact[mask].mean()), rel=1e-9)
    assert losses["full"][0] == pytest.approx(float((w * exact)[mask].sum() / mask.sum()), rel=1e-9)
    for name in ("full_by_ids", "student_topk"):
        assert losses[name] == pytest.approx(losses["full"], rel=1e-9)
        torch.testing.assert_close(grads[name], grads["full"], rtol=1e-7, atol=1e-10)
    fwd = estimator_loss("teacher_topk", EstimatorInputs(logits, tokens, mask, ids_BTk=perm,
                                                         logp_teacher_BTk=t_BTV.gather(-1, perm)))[1]
    exact_fwd = (t_BTV.exp() * (t_BTV - torch.log_softmax(logits, -1))).sum(-1)
    assert fwd["opd/forward_kl"] == pytest.approx(float(exact_fwd[mask].mean()), rel=1e-9)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_weights_compose_and_micro_batches_add_up(name: str) -> None:
    """L(w) = (1/N) sum_t m_t w_t l_t token by token; micro-batches normalised by the whole batch's
    count add up to the batch's loss and gradient; a zero weight silences its token."""
    logits, t_BTV, tokens, mask, w, s_ids, t_ids = _random_problem(seed=13, B=4)
    N = float(mask.sum())
    x = logits.clone().requires_grad_()
    whole, _ = estimator_loss(name, _inputs(name, x, t_BTV, tokens, mask, w, s_ids, t_ids))
    whole.backward()
    parts, x_parts = 0.0, logits.clone().requires_grad_()
    for rows in (slice(0, 1), slice(1, 4)):
        part, _ = estimator_loss(name, _inputs(name, x_parts[rows], t_BTV[rows], tokens[rows], mask[rows], w[rows],
                                               s_ids[rows], t_ids[rows], num_tokens=N))
        part.backward()
        parts += part.item()
    assert parts == pytest.approx(whole.item(), rel=1e-9)
    torch.testing.assert_close(x_parts.grad, x.grad, rtol=1e-9, atol=1e-12)
    per_token = []
    for b, t in mask.nonzero().tolist():
        one = torch.zeros_like(mask)
        one[b, t] = True
        per_token.append(w[b, t] * estimator_loss(name, _inputs(name, logits, t_BTV, tokens, one, torch.ones_like(w),
                                                                s_ids, t_ids, num_tokens=N))[0])
    assert float(sum(per_token)) == pytest.approx(whole.item(), rel=1e-9)
    w0 = w.clone()
    w0[1, 2] = 0.0
    y = logits.clone().requires_grad_()
    estimator_loss(name, _inputs(name, y, t_BTV, tokens, mask, w0, s_ids, t_ids))[0].backward()
    assert (y.grad[1, 2] == 0).all() and (y.grad[1, 1] != 0).any()


def test_estimator_registry_and_input_errors() -> None:
    with pytest.raises(ConfigurationError, match="unknown OPD estimator 'exact'; valid: sampled, student_topk, "
                                                 "teacher_topk, full"):
        get_estimator("exact")
    logits, t_BTV, tokens, mask, w, s_ids, _ = _random_problem(seed=14)
    bare = EstimatorInputs(logits, tokens, mask)
    with pytest.raises(InvalidInputError, match=r"'student_topk' needs ids_BTk, logp_teacher_BTk \(Score\(candidate"):
        estimator_loss("student_topk", bare)
    with pytest.raises(InvalidInputError, match="this OPD estimator needs logp_sampler_BT"):
        ESTIMATORS["sampled"].loss(bare, OPDConfig())
    with pytest.raises(InvalidInputError, match="needs the teacher's log-prob of all 7 ids per position, got 3"):
        estimator_loss("full", EstimatorInputs(logits, tokens, mask, logp_teacher_BTk=t_BTV[..., :3]))
    dup = torch.zeros_like(t_BTV, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="must list every vocabulary id once"):
        estimator_loss("full", EstimatorInputs(logits, tokens, mask, ids_BTk=dup, logp_teacher_BTk=t_BTV))
    with pytest.raises(InvalidInputError, match=r"logits_BTV has shape \[2, 5, 7\]; mask_BT is \[2, 4\]"):
        EstimatorInputs(logits, tokens[:, :4], mask[:, :4])
    with pytest.raises(InvalidInputError, match=r"weights_BT has shape \[2\], not \[2, 5\]"):
        EstimatorInputs(logits, tokens, mask, weights_BT=w[:, 0])
    with pytest.raises(InvalidInputError, match="ids_BTk .* needs logp_teacher_BTk of the same shape"):
        EstimatorInputs(logits, tokens, mask, ids_BTk=s_ids)
    with pytest.raises(InvalidInputError, match=r"ids outside the vocabulary \[0, 7\)"):
        EstimatorInputs(logits, tokens, mask, ids_BTk=s_ids + 7, logp_teacher_BTk=t_BTV[..., :3])
