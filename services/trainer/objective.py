"""The TOPD objective as pure functions on tensors (docs/method.md, sections 1 and 3-5).

Nothing here does I/O or reads settings: every knob is a parameter the trainer's settings pass in.
Per-token terms never average themselves; `aggregate_tokens` is the one place where response
tokens are masked and normalised.

Shape suffixes: B batch rows, T response tokens, N candidates or windows, K window length, k top-k
ids, V vocabulary; X stands for any leading shape (BT or NK).

Candidate order: a per-candidate vector `*_N` beside a candidate mask `cand_BT` lists candidates in
`cand_BT.nonzero()` order (row-major). `candidate_positions` is that contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from services.trainer.kl import gather_logprobs, topk_forward_kl
from topd_client.errors import ConfigurationError, InvalidInputError

SCOPES = ("trajectory", "batch")
ADVANTAGE_SOURCES = ("sampler", "current")
TRAJ_NORMALISATIONS = ("response_tokens", "window_tokens")

# 0.7 * 10 == 7.000000000000001 must count as 7 items, not 8 (relative, so a tiny q still keeps 1).
_FRAC_SLACK = 1e-12


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    """Refuse an unknown name, listing the valid ones."""
    if value not in valid:
        raise ConfigurationError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{what} must lie in [0, 1], got {value}")


def fraction_count(frac: float, n: int) -> int:
    """How many of n items a fraction keeps: ceil(frac * n), capped at n.

    ceil, not round: any frac > 0 keeps at least one item of a non-empty set, so a short
    trajectory still offers its worst token, and 0.2 of 3 tokens is 1, not 0.
    """
    return max(0, min(n, math.ceil(frac * n * (1.0 - _FRAC_SLACK))))


def _ranks_desc(x: Tensor, dim: int = -1) -> Tensor:
    """Rank of each entry when sorted in descending order along dim (0 = largest).

    The sort is stable, so ties go to the earlier position: selections are deterministic.
    """
    order = torch.sort(x, dim=dim, descending=True, stable=True).indices
    return order.argsort(dim=dim)


def aggregate_tokens(x_BT: Tensor, mask_BT: Tensor, num_tokens: float | None = None) -> Tensor:
    """sum_t mask_t * x_t / N, with N = num_tokens, or the mask's sum when None (at least 1).

    num_tokens lets a trainer that splits a batch into micro-batches divide each piece by the
    whole batch's token count, so the pieces' gradients add up to the batch's. torch.where (not a
    product) keeps non-finite values at padding out of the sum.
    """
    mask = mask_BT.bool()
    denom = float(mask.sum()) if num_tokens is None else float(num_tokens)
    return torch.where(mask, x_BT, torch.zeros_like(x_BT)).sum() / max(denom, 1.0)


# ---------------------------------------------------------------- OPD (section 1)
def token_loss(logp_student_BT: Tensor, logp_teacher_BT: Tensor) -> Tensor:
    """l_t = log pi_S(y_t) - log pi_T(y_t), detached: the paper's per-token loss, a one-sample
    reverse-KL estimate, = -A_t before discount or clipping. [B, T] -> [B, T]."""
    return (logp_student_BT - logp_teacher_BT).detach()


def discount_backward(x_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """x'_t = sum_{s >= t} gamma^(s-t) m_s x_s within each row; 0 where m_t = 0.

    tinker's kl_discount_factor: a token also answers for the reverse KL of the tokens it led to.
    s - t counts positions, masked ones included (they add nothing). Detached: advantages carry no
    gradient. Runs as a first-order linear filter over the reversed rows (scipy, on the CPU):
    exact and O(BT), where a cumsum of x_s * gamma^-s would overflow on long rows.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ConfigurationError(f"kl discount gamma must lie in [0, 1], got {gamma}")
    mask = mask_BT.bool()
    x = torch.where(mask, x_BT.detach(), torch.zeros_like(x_BT))
    if gamma == 0.0 or x.numel() == 0:
        return x
    from scipy.signal import lfilter  # lazy: scipy.signal takes seconds to import, and gamma is often 0

    rev = x.to("cpu", torch.float64).numpy()[:, ::-1]
    out = lfilter([1.0], [1.0, -gamma], rev, axis=1)[:, ::-1].copy()
    return torch.from_numpy(out).to(x.device, x.dtype) * mask


@dataclass(frozen=True)
class OPDConfig:
    """Knobs of the OPD loss: adv_clip, kl_discount and advantage_from shape the sampled-token
    estimator (`opd_loss`), tail_eps the top-k ones (services/trainer/estimators.py)."""

    # Clip A_t to [-c, c] after discounting; None = off. Bounds the per-token gradient scale: the
    # CPU prototype saw A_t of -8 to -10 nats once the student had gone wrong.
    adv_clip: float | None = None
    kl_discount: float = 0.0  # gamma of `discount_backward`; 0 = off
    # Student log-prob inside A_t: "sampler" (the policy that sampled, as tinker) or "current" (detached).
    advantage_from: str = "sampler"
    tail_eps: float = 1e-6  # floor of the tail buckets' mass in the top-k estimators (`tail_logprob`)

    def __post_init__(self) -> None:
        check_choice("advantage_from", self.advantage_from, ADVANTAGE_SOURCES)
        if self.adv_clip is not None and self.adv_clip <= 0:
            raise ConfigurationError(f"adv_clip must be > 0 or None (off), got {self.adv_clip}")
        if not 0.0 <= self.kl_discount <= 1.0:
            raise ConfigurationError(f"kl_discount must lie in [0, 1], got {self.kl_discount}")


@dataclass(frozen=True)
class OPDInputs:
    """One batch of sampled tokens y_t, [B, T] each."""

    logp_new_BT: Tensor  # log pi_theta(y_t) under the current parameters, with grad
    logp_sampler_BT: Tensor  # log-probs from the policy that sampled (may lag theta)
    logp_teacher_BT: Tensor  # log pi_T(y_t)
    mask_BT: Tensor  # bool, True on response tokens
    weights_BT: Tensor | None = None  # w_t (see `variant_weights`); None = 1
    num_tokens: float | None = None  # N of `aggregate_tokens`; None = this batch's mask sum


def opd_advantages(inp: OPDInputs, cfg: OPDConfig) -> Tensor:
    """A_t = stopgrad(log pi_T(y_t) - log pi_S(y_t)), discounted backwards, before clipping. [B, T]."""
    student_BT = inp.logp_sampler_BT if cfg.advantage_from == "sampler" else inp.logp_new_BT
    r_BT = -token_loss(student_BT, inp.logp_teacher_BT)
    return discount_backward(r_BT, inp.mask_BT, cfg.kl_discount)


def opd_loss(inp: OPDInputs, cfg: OPDConfig = OPDConfig()) -> tuple[Tensor, dict[str, float]]:
    """Importance-sampled OPD surrogate:

        L = -(1/N) sum_t m_t w_t rho_t A_t,   rho_t = exp(log pi_theta(y_t) - log pi_sampler(y_t))

    Only rho_t carries the gradient, grad L = -(1/N) sum_t m_t w_t rho_t A_t grad log pi_theta(y_t),
    which is the policy-gradient form A_t * grad log pi when on-policy (rho = 1). A_t, w_t and the
    sampler's log-probs are constants. Metrics: opd/reverse_kl = mean of l_t = -r_t over response
    tokens (undiscounted, unclipped), opd/rho_mean, opd/clip_frac, opd/adv_mean and opd/adv_var (of the
    clipped A_t over response tokens: the estimator's per-token noise), opd/loss.
    """
    mask = inp.mask_BT.bool()
    adv_BT = opd_advantages(inp, cfg)
    clipped_BT = adv_BT if cfg.adv_clip is None else adv_BT.clamp(-cfg.adv_clip, cfg.adv_clip)
    rho_BT = torch.exp(inp.logp_new_BT - inp.logp_sampler_BT.detach())
    w_BT = torch.ones_like(adv_BT) if inp.weights_BT is None else inp.weights_BT.detach()
    loss = -aggregate_tokens(w_BT * rho_BT * clipped_BT, mask, inp.num_tokens)
    reverse_kl_BT = token_loss(inp.logp_sampler_BT, inp.logp_teacher_BT)
    metrics = {
        "opd/loss": float(loss.detach()),
        "opd/reverse_kl": float(aggregate_tokens(reverse_kl_BT, mask)),
        "opd/rho_mean": float(aggregate_tokens(rho_BT.detach(), mask)),
        "opd/clip_frac": float(aggregate_tokens((clipped_BT != adv_BT).float(), mask)),
        "opd/adv_mean": float(aggregate_tokens(clipped_BT, mask)),
        "opd/adv_var": masked_variance(clipped_BT, mask),
    }
    return loss, metrics


def masked_variance(x_BT: Tensor, mask_BT: Tensor) -> float:
    """Population variance of x over the masked entries, sum m (x - mean)^2 / sum m (0 when empty)."""
    mask = mask_BT.bool()
    if not bool(mask.any()):
        return 0.0
    x = x_BT.detach()[mask].double()
    return float(((x - x.mean()) ** 2).mean())


# ---------------------------------------------------------------- detection (section 3)
def select_candidates(
    loss_BT: Tensor, mask_BT: Tensor, q: float, scope: str = "trajectory", max_candidates: int | None = None
) -> Tensor:
    """Candidate (high-loss) positions as a bool mask [B, T].

    scope "trajectory": the top ceil(q * n_b) of l_t among each row's n_b response tokens (at
    least one per non-empty row when q > 0); "batch": the top ceil(q * n) over all n response
    tokens. max_candidates then keeps the highest-loss ones overall (it bounds the branch
    windows a step must generate). Ties go to the earlier position. See `fraction_count`.
    """
    _check_fraction("candidate fraction q", q)
    check_choice("candidate scope", scope, SCOPES)
    mask = mask_BT.bool()
    loss = torch.where(mask, loss_BT.detach().float(), torch.full_like(loss_BT, -math.inf, dtype=torch.float32))
    if scope == "trajectory":
        n_B = torch.tensor([fraction_count(q, int(n)) for n in mask.sum(1).tolist()], device=mask.device)
        cand = (_ranks_desc(loss, dim=1) < n_B[:, None]) & mask
    else:
        n = fraction_count(q, int(mask.sum()))
        cand = (_ranks_desc(loss.flatten(), dim=0).view_as(loss) < n) & mask
    if max_candidates is not None and int(cand.sum()) > max_candidates:
        kept = torch.where(cand, loss, torch.full_like(loss, -math.inf))
        cand = cand & (_ranks_desc(kept.flatten(), dim=0).view_as(loss) < max_candidates)
    return cand


def candidate_positions(cand_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(rows_N, cols_N) of the candidates, in the row-major order every `*_N` vector follows."""
    return cand_BT.nonzero(as_tuple=True)


def divergent_by_fraction(D_N: Tensor, divergent_frac: float) -> Tensor:
    """Truly divergent = the top ceil(divergent_frac * N) candidates by D; the rest are false alarms.

    The paper's suppression of "the bottom 30% low-OT" candidates is divergent_frac = 0.7.
    Ties go to the earlier candidate. [N] -> bool [N].
    """
    _check_fraction("divergent_frac", divergent_frac)
    return _ranks_desc(D_N, dim=0) < fraction_count(divergent_frac, D_N.numel())


def divergent_by_threshold(D_N: Tensor, threshold: float) -> Tensor:
    """Truly divergent = D > threshold: a fixed bar, so the divergent count tracks training. [N] -> bool [N]."""
    return D_N > threshold


DIVERGENT_RULES = ("fraction", "threshold")


def divergent_set(D_N: Tensor, rule: str, divergent_frac: float, threshold: float | None) -> Tensor:
    """The divergent candidates by `rule`: "fraction" (`divergent_by_fraction`, a fixed share of every
    batch) or "threshold" (`divergent_by_threshold`, a fixed bar on D). [N] -> bool [N]."""
    check_choice("divergent rule", rule, DIVERGENT_RULES)
    if rule == "fraction":
        return divergent_by_fraction(D_N, divergent_frac)
    if threshold is None:
        raise ConfigurationError("divergent_rule=threshold needs a threshold on D")
    return divergent_by_threshold(D_N, threshold)


@dataclass(frozen=True)
class Detection:
    """One batch's near-future test."""

    candidates_BT: Tensor  # bool, the high-loss positions (`select_candidates`)
    D_N: Tensor  # near-future divergence of each candidate, in `candidate_positions` order
    divergent_N: Tensor  # bool, high loss AND high D; the other candidates are false alarms

    def __post_init__(self) -> None:
        n, n_d, n_v = int(self.candidates_BT.sum()), self.D_N.numel(), self.divergent_N.numel()
        if n_d != n or n_v != n:
            raise InvalidInputError(f"{n} candidates but D_N has {n_d} and divergent_N {n_v} entries")

    @property
    def false_alarm_N(self) -> Tensor:
        return ~self.divergent_N.bool()


# ---------------------------------------------------------------- weights per variant (section 4)
def weights_opd(mask_BT: Tensor, det: Detection | None, alpha: float) -> Tensor:
    """w_t = 1: plain OPD."""
    return torch.ones(mask_BT.shape, dtype=torch.float32, device=mask_BT.device)


def _weights_at(cand_BT: Tensor, picked_N: Tensor, alpha: float) -> Tensor:
    """w_BT = alpha at the picked candidates, 1 elsewhere (padding included: the loss masks it)."""
    w_BT = torch.ones(cand_BT.shape, dtype=torch.float32, device=cand_BT.device)
    rows_N, cols_N = candidate_positions(cand_BT)
    picked_N = picked_N.bool().to(rows_N.device)
    w_BT[rows_N[picked_N], cols_N[picked_N]] = alpha
    return w_BT


def weights_suppress(mask_BT: Tensor, det: Detection | None, alpha: float) -> Tensor:
    """w_t = alpha at false alarms (high loss, low D), 1 elsewhere: don't chase surface forms."""
    return _weights_at(det.candidates_BT, det.false_alarm_N, alpha)


def weights_suppress_control(mask_BT: Tensor, det: Detection | None, alpha: float) -> Tensor:
    """w_t = alpha at the n_fa HIGHEST-D candidates (n_fa = number of false alarms), 1 elsewhere.

    The paper's control: down-weighting as many tokens, but the ones the detector calls divergent,
    should hurt, which shows the detector is not noise.
    """
    n_fa = int(det.false_alarm_N.sum())
    return _weights_at(det.candidates_BT, _ranks_desc(det.D_N, dim=0) < n_fa, alpha)


WeightFn = Callable[[Tensor, "Detection | None", float], Tensor]


@dataclass(frozen=True)
class Variant:
    """A training objective: token weights for L_OPD, whether it needs the near-future test, and
    whether it adds lambda * L_traj at the divergent states."""

    name: str
    weights: WeightFn
    needs_detection: bool
    uses_traj: bool


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("opd", weights_opd, needs_detection=False, uses_traj=False),
        Variant("opd_suppress", weights_suppress, needs_detection=True, uses_traj=False),
        Variant("opd_suppress_control", weights_suppress_control, needs_detection=True, uses_traj=False),
        Variant("topd", weights_suppress, needs_detection=True, uses_traj=True),
    )
}


def get_variant(name: str) -> Variant:
    """The registered variant called name; an unknown name lists the valid ones."""
    check_choice("objective variant", name, tuple(VARIANTS))
    return VARIANTS[name]


def variant_weights(name: str, mask_BT: Tensor, detection: Detection | None, alpha: float) -> Tensor:
    """w_BT (float32) of variant `name`; alpha in [0, 1] is the suppressed tokens' weight."""
    variant = get_variant(name)
    _check_fraction("suppression weight alpha", alpha)
    if variant.needs_detection and detection is None:
        raise InvalidInputError(f"variant {name!r} weighs tokens by the near-future test: pass a Detection")
    return variant.weights(mask_BT, detection, alpha)


# ---------------------------------------------------------------- L_traj (section 5)
@dataclass(frozen=True)
class TrajConfig:
    """Knobs of L_traj."""

    lam: float = 1.0  # lambda, applied inside `traj_loss`; its metrics report L_traj unscaled
    offset_weights: tuple[float, ...] | None = None  # u_i, i = 0..K-1; None = ones (`discounted_offset_weights`)
    tail_eps: float = 1e-6  # floor of the tail buckets' mass (`tail_logprob`)

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ConfigurationError(f"lambda must be >= 0, got {self.lam}")


def traj_num_tokens(normalisation: str, num_response_tokens: float, num_window_tokens: float) -> float:
    """N of L_traj, decided once per batch (micro-batches then share it, as `aggregate_tokens` expects).

    "response_tokens": the batch's response-token count (the prototype's choice: each window adds K
    tokens of supervision on the OPD loss's scale); "window_tokens": the windows' token count (a mean
    over window tokens).
    """
    check_choice("L_traj normalisation", normalisation, TRAJ_NORMALISATIONS)
    return float(num_response_tokens if normalisation == "response_tokens" else num_window_tokens)


def discounted_offset_weights(K: int, gamma: float) -> tuple[float, ...]:
    """(1, gamma, gamma^2, ...): trust the teacher's window less the further it runs from the state."""
    return tuple(gamma**i for i in range(K))


def traj_loss(
    student_logits_NKV: Tensor, teacher_ids_NKk: Tensor, teacher_logp_NKk: Tensor, mask_NK: Tensor,
    num_tokens: float | None, cfg: TrajConfig = TrajConfig(),
) -> tuple[Tensor, dict[str, float]]:
    """lambda * L_traj, forward KL along the teacher's windows from the divergent states:

        L_traj = (1/N) sum_n sum_i m_ni u_i KL_k( pi_T(. | c_n, ytilde_<i) || pi_S(. | c_n, ytilde_<i) )

    KL_k is `topk_forward_kl` (teacher top-k plus tail); u_i are the offset weights; N is num_tokens
    (see `traj_num_tokens`), or this call's window tokens when None. student_logits_NKV are the
    student's logits (or log-probs) teacher-forced on the windows, with grad; the teacher's ids
    and log-probs at padded positions are ignored. Metrics: topd/traj_kl (mean unweighted KL per
    valid window token), topd/traj_loss (unscaled), topd/num_windows.
    """
    mask = mask_NK.bool()
    ids_NKk = teacher_ids_NKk.long().masked_fill(~mask[..., None], 0)
    kl_NK = topk_forward_kl(gather_logprobs(student_logits_NKV, ids_NKk), teacher_logp_NKk, cfg.tail_eps)
    K = mask.shape[1]
    offsets = cfg.offset_weights if cfg.offset_weights is not None else (1.0,) * K
    if len(offsets) != K:
        raise InvalidInputError(f"{len(offsets)} offset weights for windows of {K} tokens")
    u_K = torch.tensor(offsets, dtype=kl_NK.dtype, device=kl_NK.device)
    traj = aggregate_tokens(kl_NK * u_K, mask, num_tokens)
    metrics = {
        "topd/traj_kl": float(aggregate_tokens(kl_NK.detach(), mask)),
        "topd/traj_loss": float(traj.detach()),
        "topd/num_windows": float(mask.shape[0]),
    }
    return cfg.lam * traj, metrics
