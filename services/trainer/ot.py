"""Near-future divergence D: optimal-transport distance between two token windows (method, section 3).

Window n of the teacher and window n of the student continue the same prefix. Each token is a
point in an embedding space (a table [V, d] the caller picks: the student's input embeddings, the
teacher's, or `one_hot_embedding`); the ground cost is C_ij = 1 - cos(e_i, e_j), in [0, 2]; each
window's tokens carry uniform mass 1/len. D = min_P <P, C> over plans P >= 0 with those marginals:
0 for the same multiset of tokens in any order, 1 for windows of mutually orthogonal tokens.

D_N is float64 on the CPU whatever the table's device: it is N numbers, and classification and
diagnostics run there.

Shape suffixes: N windows, K window length (Ka, Kb when the two sides differ), V vocab, d embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from services.trainer.objective import check_choice
from topd_client.errors import ConfigurationError, InvalidInputError

SOLVERS = ("exact", "sinkhorn")


@dataclass(frozen=True)
class Windows:
    """N padded token windows: window n is ids_NK[n, :len_N[n]]; ids past a length are ignored.

    A window shorter than K stopped at EOS (or the context limit).
    """

    ids_NK: Tensor
    len_N: Tensor

    def __post_init__(self) -> None:
        if self.ids_NK.dim() != 2 or self.len_N.shape != self.ids_NK.shape[:1]:
            raise InvalidInputError(f"windows need ids [N, K] and lengths [N], got {tuple(self.ids_NK.shape)}"
                                    f" and {tuple(self.len_N.shape)}")

    def valid_NK(self) -> Tensor:
        """bool [N, K]: True on a window's tokens."""
        K = self.ids_NK.shape[1]
        return torch.arange(K, device=self.ids_NK.device) < self.len_N.to(self.ids_NK.device)[:, None]


@dataclass(frozen=True)
class OTConfig:
    """Knobs of the OT distance.

    solver: "exact" (assignment for equal lengths, a transport LP otherwise) or "sinkhorn"
        (entropic, batched in torch on the table's device).
    eps: Sinkhorn's entropic regularisation, in cost units; smaller is closer to exact and slower.
    max_iter, tol: Sinkhorn stops after max_iter iterations or once every row marginal is within
        tol of 1/len (checked every 10 iterations).
    empty_cost: D when exactly one window is empty (two empty windows: D = 0). 1 is the cost of
        orthogonal tokens: "nothing" is as far from a window as unrelated text is.
    """

    solver: str = "exact"
    eps: float = 0.05
    max_iter: int = 1000
    tol: float = 1e-6
    empty_cost: float = 1.0

    def __post_init__(self) -> None:
        check_choice("OT solver", self.solver, SOLVERS)
        if self.eps <= 0 or self.max_iter < 1:
            raise ConfigurationError(f"Sinkhorn needs eps > 0 and max_iter >= 1, got {self.eps}, {self.max_iter}")


def one_hot_embedding(a: Windows, b: Windows) -> tuple[Windows, Windows, Tensor]:
    """One-hot "embeddings" for a pair of window sets: cost 0 for the same token, 1 otherwise.

    The ids are renumbered over the distinct tokens present (U of them), so the table is the
    identity [U, U] rather than [V, V]. Returns the renumbered windows and that table.
    """
    ids_all, inverse = torch.unique(torch.cat([a.ids_NK.flatten(), b.ids_NK.flatten()]), return_inverse=True)
    n_a = a.ids_NK.numel()
    ids_a = inverse[:n_a].view_as(a.ids_NK)
    ids_b = inverse[n_a:].view_as(b.ids_NK)
    table_UU = torch.eye(ids_all.numel(), dtype=torch.float64, device=a.ids_NK.device)
    return Windows(ids_a, a.len_N), Windows(ids_b, b.len_N), table_UU


def cost_matrices(a: Windows, b: Windows, table_Vd: Tensor) -> Tensor:
    """C_NKaKb = 1 - cos(e(a_ni), e(b_nj)), float64, on the table's device; clamped to [0, 2].

    Padded positions get the cost of id 0 (finite; the solvers give them no mass). A zero
    embedding has cosine 0 with everything (cost 1).
    """
    if a.ids_NK.shape[0] != b.ids_NK.shape[0]:
        raise InvalidInputError(f"{a.ids_NK.shape[0]} teacher windows but {b.ids_NK.shape[0]} student windows")
    emb = []
    for w in (a, b):
        ids_NK = torch.where(w.valid_NK(), w.ids_NK, torch.zeros_like(w.ids_NK)).to(table_Vd.device)
        emb.append(F.normalize(table_Vd[ids_NK.long()].to(torch.float64), dim=-1))
    return (1.0 - emb[0] @ emb[1].transpose(1, 2)).clamp(0.0, 2.0)


def exact_ot(C_nm: np.ndarray) -> float:
    """Exact OT cost between uniform masses 1/n and 1/m on a cost matrix [n, m] (n, m >= 1).

    n == m: an optimal plan is a permutation / n (Birkhoff), so D = the assignment's mean matched
    cost (scipy's linear_sum_assignment). n != m: the transport LP, min <P, C> s.t. P 1 = 1/n,
    P^T 1 = 1/m, P >= 0, solved by HiGHS (scipy.optimize.linprog): exact, and no extra dependency
    (tests check it against POT's ot.emd2).
    """
    from scipy.optimize import linear_sum_assignment, linprog  # lazy: a second of import, exact solver only

    n, m = C_nm.shape
    if n == m:
        rows, cols = linear_sum_assignment(C_nm)
        return float(C_nm[rows, cols].mean())
    A_eq = np.vstack([np.kron(np.eye(n), np.ones((1, m))), np.kron(np.ones((1, n)), np.eye(m))])
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    res = linprog(C_nm.ravel(), A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"transport LP failed on a {n}x{m} cost: {res.message}")
    return float(res.fun)


def _log_uniform(valid_NK: Tensor, len_N: Tensor) -> Tensor:
    """log of uniform masses 1/len on valid positions, -inf on padding. [N, K]."""
    log_mass_N = -torch.log(len_N.to(torch.float64))
    return torch.where(valid_NK, log_mass_N[:, None], torch.full_like(log_mass_N[:, None], -torch.inf))


def sinkhorn_ot(C_NKaKb: Tensor, a: Windows, b: Windows, cfg: OTConfig) -> Tensor:
    """Entropic OT in the log domain, all N pairs at once; every window must be non-empty.

        P_ij = exp(u_i - C_ij/eps + v_j),  u_i = log a_i - LSE_j(v_j - C_ij/eps),  v_j = log b_j - LSE_i(u_i - C_ij/eps)

    Returns <P, C>, the transport cost of the entropic plan (not the regularised objective): it
    tends to the exact D as eps -> 0. Padding has log-mass -inf, so it gets no mass. [N] float64,
    on C's device. Stops early once max_i |sum_j P_ij - a_i| < tol (columns are exact after each
    v update, so rows are what is left); otherwise after max_iter, unconverged but still a plan.
    """
    dev = C_NKaKb.device
    log_a_NKa = _log_uniform(a.valid_NK().to(dev), a.len_N.to(dev))
    log_b_NKb = _log_uniform(b.valid_NK().to(dev), b.len_N.to(dev))
    M_NKaKb = -C_NKaKb / cfg.eps
    u_NKa, v_NKb = log_a_NKa, log_b_NKb
    for it in range(cfg.max_iter):
        lse_rows_NKa = torch.logsumexp(M_NKaKb + v_NKb[:, None, :], dim=2)
        if it % 10 == 9:
            row_err = ((u_NKa + lse_rows_NKa).exp() - log_a_NKa.exp()).abs().max()
            if float(row_err) < cfg.tol:
                break
        u_NKa = log_a_NKa - lse_rows_NKa
        v_NKb = log_b_NKb - torch.logsumexp(M_NKaKb + u_NKa[:, :, None], dim=1)
    P_NKaKb = torch.exp(u_NKa[:, :, None] + M_NKaKb + v_NKb[:, None, :])
    return (P_NKaKb * C_NKaKb).sum(dim=(1, 2))


def ot_distances(teacher: Windows, student: Windows, table_Vd: Tensor, cfg: OTConfig = OTConfig()) -> Tensor:
    """D_N: OT distance between teacher window n and student window n (see the module docstring).

    Empty windows: D = 0 when both are empty, cfg.empty_cost when exactly one is. [N] float64, CPU.
    """
    C_NKaKb = cost_matrices(teacher, student, table_Vd)
    len_a_N, len_b_N = teacher.len_N.cpu().long(), student.len_N.cpu().long()
    empty_a_N, empty_b_N = len_a_N == 0, len_b_N == 0
    D_N = torch.zeros(len_a_N.shape[0], dtype=torch.float64)
    D_N[empty_a_N ^ empty_b_N] = cfg.empty_cost
    both_N = ~empty_a_N & ~empty_b_N
    if not bool(both_N.any()):
        return D_N
    if cfg.solver == "exact":
        C_cpu = C_NKaKb.cpu().numpy()
        for n in both_N.nonzero().flatten().tolist():
            D_N[n] = exact_ot(C_cpu[n, : len_a_N[n], : len_b_N[n]])
        return D_N
    sub_a = Windows(teacher.ids_NK[both_N.to(teacher.ids_NK.device)], len_a_N[both_N])
    sub_b = Windows(student.ids_NK[both_N.to(student.ids_NK.device)], len_b_N[both_N])
    D_N[both_N] = sinkhorn_ot(C_NKaKb[both_N.to(C_NKaKb.device)], sub_a, sub_b, cfg).cpu()
    return D_N
