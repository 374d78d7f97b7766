"""OPD estimators: the per-token distillation loss L_OPD by name, as pure functions on tensors.

Each estimator is `(EstimatorInputs, OPDConfig) -> (loss, metrics)`, with its formula in its
docstring, registered in `ESTIMATORS` (a bad name lists the valid ones). They differ in what the
teacher is asked for (`Estimator.teacher_call`) and which inputs they read (`Estimator.needs`):

    sampled       one-sample reverse KL at the sampled token, importance-sampled (the paper's)
    student_topk  exact reverse KL over the student's top-k ids plus a tail bucket
    teacher_topk  forward KL over the teacher's top-k ids plus a tail bucket (GKD-style)
    full          exact reverse KL over the whole vocabulary (small vocabularies: the built-in task's is 41)

Every estimator's per-token term is multiplied by w_t (`EstimatorInputs.weights_BT`), so TOPD's
suppression weights (`objective.variant_weights`) compose with each of them, and L_traj is added
beside them by the step. Masking and normalisation happen once, in `objective.aggregate_tokens`:
N = num_tokens, the whole batch's response tokens when the step splits it into micro-batches.

Metrics are namespaced (opd/...). Every estimator also reports `policy_metrics` (the student's
entropy, the sampler-vs-trainer log-prob gap). Each estimator reports opd/loss and opd/reverse_kl, a per-token
estimate of KL(pi_S || pi_T) over the response tokens, so runs with different estimators share one
axis: `sampled` the one-sample estimate log pi_S(y_t) - log pi_T(y_t) at the sampler's tokens,
the top-k ones the KL between the k + 1 bins (a lower bound on the exact KL: merging ids never
raises a KL), `full` the exact KL. The states (prefixes) are always the sampler's: only `sampled`
corrects its token for the sampler (rho); the others are exact at each visited state.

Shape suffixes as in objective.py: B rows, T response tokens, V vocabulary, k ids per position.
Row t of every [B, T, ...] tensor belongs to response token y_t (the student's logits_BTV[:, t]
are those predicting y_t, as `student.position_logits` returns them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from services.trainer.kl import LOGP_FLOOR, entropy, gather_logprobs, topk_forward_kl, topk_reverse_kl
from services.trainer.objective import OPDConfig, OPDInputs, aggregate_tokens, check_choice, opd_loss
from topd_client.errors import InvalidInputError


@dataclass(frozen=True)
class EstimatorInputs:
    """One (micro-)batch. Optional fields are read only by the estimators that list them in `needs`."""

    logits_BTV: Tensor  # student logits predicting y_t, with grad (float32)
    tokens_BT: Tensor  # the sampled response tokens y_t
    mask_BT: Tensor  # bool, True on response tokens
    logp_sampler_BT: Tensor | None = None  # log pi_sampler(y_t), from the rollout
    logp_teacher_BT: Tensor | None = None  # log pi_T(y_t), Score's token_logprobs
    ids_BTk: Tensor | None = None  # the k ids of each position whose teacher log-probs are given
    logp_teacher_BTk: Tensor | None = None  # log pi_T at ids_BTk (for `full` with ids_BTk None: [B, T, V] in id order)
    weights_BT: Tensor | None = None  # w_t (`objective.variant_weights`); None = 1
    num_tokens: float | None = None  # N of `aggregate_tokens`; None = this batch's mask sum

    def __post_init__(self) -> None:
        BT = tuple(self.mask_BT.shape)
        if self.logits_BTV.dim() != 3 or tuple(self.logits_BTV.shape[:2]) != BT:
            raise InvalidInputError(f"logits_BTV has shape {list(self.logits_BTV.shape)}; mask_BT is {list(BT)}")
        for f in fields(self):
            x = getattr(self, f.name)
            if isinstance(x, Tensor) and f.name.endswith("_BT") and tuple(x.shape) != BT:
                raise InvalidInputError(f"{f.name} has shape {list(x.shape)}, not {list(BT)} like mask_BT")
        k_ids, k_logp = self.ids_BTk, self.logp_teacher_BTk
        if k_logp is not None and (k_logp.dim() != 3 or tuple(k_logp.shape[:2]) != BT):
            raise InvalidInputError(f"logp_teacher_BTk has shape {list(k_logp.shape)}; mask_BT is {list(BT)}")
        if k_ids is not None and (k_logp is None or k_ids.shape != k_logp.shape):
            raise InvalidInputError(f"ids_BTk {list(k_ids.shape)} needs logp_teacher_BTk of the same shape, got "
                                    f"{None if k_logp is None else list(k_logp.shape)}")
        V = self.logits_BTV.shape[-1]
        if k_ids is not None and k_ids.numel() and bool(((k_ids < 0) | (k_ids >= V))[self.mask_BT.bool()].any()):
            raise InvalidInputError(f"ids_BTk holds ids outside the vocabulary [0, {V}) at response positions")


def _weighted_mean(x_BT: Tensor, inp: EstimatorInputs) -> Tensor:
    """(1/N) sum_t m_t w_t x_t (w detached: weights are constants of the step)."""
    w_BT = torch.ones_like(x_BT) if inp.weights_BT is None else inp.weights_BT.detach().to(x_BT.dtype)
    return aggregate_tokens(w_BT * x_BT, inp.mask_BT, inp.num_tokens)


def _given(inp: EstimatorInputs, name: str) -> Tensor:
    x = getattr(inp, name)
    if x is None:
        raise InvalidInputError(f"this OPD estimator needs {name}")
    return x


def _teacher_BTk(inp: EstimatorInputs) -> Tensor:
    """The teacher's log-probs, finite at padding (a NaN there would reach the gradient as 0 * NaN)."""
    return _given(inp, "logp_teacher_BTk").detach().masked_fill(~inp.mask_BT.bool()[..., None], LOGP_FLOOR)


def _student_at_ids(inp: EstimatorInputs) -> Tensor:
    """log pi_S at ids_BTk, with grad; padded positions read id 0."""
    ids_BTk = _given(inp, "ids_BTk").long().masked_fill(~inp.mask_BT.bool()[..., None], 0)
    return gather_logprobs(inp.logits_BTV, ids_BTk)


def _mean(x_BT: Tensor, inp: EstimatorInputs) -> float:
    return float(aggregate_tokens(x_BT.detach(), inp.mask_BT))


# ---------------------------------------------------------------- the estimators
def sampled(inp: EstimatorInputs, cfg: OPDConfig) -> tuple[Tensor, dict[str, float]]:
    """One-sample reverse KL with importance sampling (the paper's; tinker's): `objective.opd_loss`,

        L = -(1/N) sum_t m_t w_t rho_t A_t,   A_t = stopgrad(log pi_T(y_t) - log pi_S(y_t)),
        rho_t = exp(log pi_theta(y_t) - log pi_sampler(y_t)),  log pi_theta(y_t) from logits_BTV.

    Unbiased for the reverse KL's gradient from one token per state: cheap (Score's token
    logprobs only), but its variance is that of the single sampled token.
    """
    logp_new_BT = gather_logprobs(inp.logits_BTV, inp.tokens_BT.long()[..., None]).squeeze(-1)
    return opd_loss(OPDInputs(logp_new_BT=logp_new_BT, logp_sampler_BT=_given(inp, "logp_sampler_BT"),
                              logp_teacher_BT=_given(inp, "logp_teacher_BT"), mask_BT=inp.mask_BT,
                              weights_BT=inp.weights_BT, num_tokens=inp.num_tokens), cfg)


def student_topk(inp: EstimatorInputs, cfg: OPDConfig) -> tuple[Tensor, dict[str, float]]:
    """Exact reverse KL over the student's top-k ids S_t at every position, plus one tail bucket:

        KL_t = sum_{j in S_t} pS_j (log pS_j - log pT_j) + pS_tail (log pS_tail - log pT_tail),
        p_tail = 1 - sum_{j in S_t} p_j,        L = (1/N) sum_t m_t w_t KL_t

    (`objective.topk_reverse_kl`). S_t = ids_BTk, k distinct ids per position that the teacher
    scored through Score's candidate_ids (normally the rollout's top-k for the sampled prefix); any
    fixed ids give a true KL between binned distributions, exact when S_t holds all of pS's mass.
    The gradient is that of KL_t through pS = softmax(logits) over every id (the tail included),
    with no sampling noise. Extra metrics: opd/student_topk_mass, opd/teacher_topk_mass (sum_j p_j).
    """
    s_BTk, t_BTk = _student_at_ids(inp), _teacher_BTk(inp)
    kl_BT = topk_reverse_kl(s_BTk, t_BTk, tail=True, tail_eps=cfg.tail_eps)
    loss = _weighted_mean(kl_BT, inp)
    return loss, {"opd/loss": float(loss.detach()), "opd/reverse_kl": _mean(kl_BT, inp),
                  "opd/student_topk_mass": _mean(s_BTk.exp().sum(-1), inp),
                  "opd/teacher_topk_mass": _mean(t_BTk.exp().sum(-1), inp)}


def teacher_topk(inp: EstimatorInputs, cfg: OPDConfig) -> tuple[Tensor, dict[str, float]]:
    """Forward KL over the teacher's top-k ids T_t plus one tail bucket (GKD-style, on-policy states):

        KL_t = sum_{j in T_t} pT_j (log pT_j - log pS_j) + pT_tail (log pT_tail - log pS_tail),
        L = (1/N) sum_t m_t w_t KL_t

    (`objective.topk_forward_kl`). ids_BTk, logp_teacher_BTk = Score's topk_ids, topk_logprobs.
    Mode-covering where the reverse KL is mode-seeking: the student is pulled towards every id the
    teacher likes. Metrics: opd/forward_kl (the loss's KL), opd/reverse_kl (binned on the same
    k + 1 bins), opd/student_topk_mass, opd/teacher_topk_mass.
    """
    s_BTk, t_BTk = _student_at_ids(inp), _teacher_BTk(inp)
    fkl_BT = topk_forward_kl(s_BTk, t_BTk, cfg.tail_eps)
    loss = _weighted_mean(fkl_BT, inp)
    rkl_BT = topk_reverse_kl(s_BTk.detach(), t_BTk, tail=True, tail_eps=cfg.tail_eps)
    return loss, {"opd/loss": float(loss.detach()), "opd/forward_kl": _mean(fkl_BT, inp),
                  "opd/reverse_kl": _mean(rkl_BT, inp), "opd/student_topk_mass": _mean(s_BTk.exp().sum(-1), inp),
                  "opd/teacher_topk_mass": _mean(t_BTk.exp().sum(-1), inp)}


def full(inp: EstimatorInputs, cfg: OPDConfig) -> tuple[Tensor, dict[str, float]]:
    """Exact reverse KL over the whole vocabulary, when the teacher can score every id:

        KL_t = sum_{v < V} pS_v (log pS_v - log pT_v),        L = (1/N) sum_t m_t w_t KL_t

    The teacher's log-probs of all V ids per position: Score with candidate_ids = arange(V) on every
    row (ids_BTk None: logp_teacher_BTk is [B, T, V] in id order), or any ids_BTk listing each id
    once per position (e.g. topk_ids with top_k = V). Metrics: opd/reverse_kl and opd/forward_kl,
    both exact.
    """
    logp_BTV = torch.log_softmax(inp.logits_BTV, dim=-1)
    t_BTV = _teacher_by_id(inp)
    kl_BT = topk_reverse_kl(logp_BTV, t_BTV, tail=False)
    loss = _weighted_mean(kl_BT, inp)
    fkl_BT = topk_forward_kl(logp_BTV.detach(), t_BTV, cfg.tail_eps)
    return loss, {"opd/loss": float(loss.detach()), "opd/reverse_kl": _mean(kl_BT, inp),
                  "opd/forward_kl": _mean(fkl_BT, inp)}


def _teacher_by_id(inp: EstimatorInputs) -> Tensor:
    """logp_teacher [B, T, V] in id order (scattered from ids_BTk when given); refuses fewer than V ids."""
    V = inp.logits_BTV.shape[-1]
    t_BTk = _teacher_BTk(inp)
    if t_BTk.shape[-1] != V:
        raise InvalidInputError(f"estimator 'full' needs the teacher's log-prob of all {V} ids per position, got "
                                f"{t_BTk.shape[-1]}: score with candidate_ids = arange({V}) on every row")
    if inp.ids_BTk is None:
        return t_BTk
    mask = inp.mask_BT.bool()[..., None]
    ids_BTV = torch.where(mask, inp.ids_BTk.long(), torch.arange(V, device=t_BTk.device).expand(t_BTk.shape))
    by_id = torch.full_like(t_BTk, float("nan")).scatter(-1, ids_BTV, t_BTk)
    if bool(torch.isnan(by_id).any()):
        raise InvalidInputError("estimator 'full': ids_BTk must list every vocabulary id once per response position")
    return by_id


# ---------------------------------------------------------------- registry
EstimatorFn = Callable[[EstimatorInputs, OPDConfig], "tuple[Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class Estimator:
    """An OPD estimator: its loss, the EstimatorInputs fields it reads beyond logits_BTV, tokens_BT
    and mask_BT, and what the step asks the teacher for."""

    name: str
    loss: EstimatorFn
    needs: tuple[str, ...]
    teacher_call: str


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("sampled", sampled, ("logp_sampler_BT", "logp_teacher_BT"),
                  "Score(top_k=0): token_logprobs -> logp_teacher_BT"),
        Estimator("student_topk", student_topk, ("ids_BTk", "logp_teacher_BTk"),
                  "Score(candidate_ids=[the rollout's top-k ids, [R, k] per sample]): candidate_logprobs"),
        Estimator("teacher_topk", teacher_topk, ("ids_BTk", "logp_teacher_BTk"),
                  "Score(top_k=k): topk_ids -> ids_BTk, topk_logprobs -> logp_teacher_BTk"),
        Estimator("full", full, ("logp_teacher_BTk",),
                  "Score(candidate_ids=[arange(V) on every row]): candidate_logprobs, [R, V] in id order"),
    )
}


# Logits per micro-batch that `policy_metrics` reads: every position when V is small (the built-in
# task's 41 ids), evenly spaced positions when V is large (a 150k vocabulary: ~28), so the metrics
# cost a few percent of the step's loss at most.
POLICY_METRICS_LOGITS = 1 << 22


def policy_metrics(inp: EstimatorInputs, budget: int = POLICY_METRICS_LOGITS) -> dict[str, float]:
    """What the student's own numbers say, whatever the estimator (detached):

        opd/entropy            mean over response tokens of H(pi_theta(. | y_<t)), nats
        opd/sampler_logp_gap   mean |log pi_theta(y_t) - log pi_sampler(y_t)|: before the update, the
                               trainer-vs-sampler mismatch on fresh samples (plus the policy's drift
                               on samples a version old); 0 for a sampler that computes what the trainer does

    Over every response position when they hold at most `budget` logits, else over evenly spaced ones.
    """
    rows_N, cols_N = inp.mask_BT.bool().nonzero(as_tuple=True)
    n, V = rows_N.numel(), inp.logits_BTV.shape[-1]
    if n == 0:
        return {"opd/entropy": 0.0, **({"opd/sampler_logp_gap": 0.0} if inp.logp_sampler_BT is not None else {})}
    m = min(n, max(1, budget // V))
    if m < n:
        pick = torch.linspace(0, n - 1, m, device=rows_N.device).round().long()
        rows_N, cols_N = rows_N[pick], cols_N[pick]
    logits_NV = inp.logits_BTV.detach()[rows_N, cols_N]
    out = {"opd/entropy": float(entropy(logits_NV).mean())}
    if inp.logp_sampler_BT is not None:
        logp_N = gather_logprobs(logits_NV, inp.tokens_BT[rows_N, cols_N].long()[:, None]).squeeze(-1)
        out["opd/sampler_logp_gap"] = float((logp_N - inp.logp_sampler_BT.detach()[rows_N, cols_N]).abs().mean())
    return out


def get_estimator(name: str) -> Estimator:
    """The registered estimator called name; an unknown name lists the valid ones."""
    check_choice("OPD estimator", name, tuple(ESTIMATORS))
    return ESTIMATORS[name]


def estimator_loss(name: str, inp: EstimatorInputs, cfg: OPDConfig = OPDConfig()) -> tuple[Tensor, dict[str, float]]:
    """L_OPD of estimator `name` on one (micro-)batch, after checking that its inputs are there."""
    est = get_estimator(name)
    missing = [f for f in est.needs if getattr(inp, f) is None]
    if missing:
        raise InvalidInputError(f"OPD estimator {name!r} needs {', '.join(missing)} ({est.teacher_call})")
    loss, metrics = est.loss(inp, cfg)
    return loss, {**metrics, **policy_metrics(inp)}
