"""Near-future divergence (services/trainer/ot.py) on hand-worked windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.trainer.ot import (
    OTConfig,
    Windows,
    cost_matrices,
    exact_ot,
    one_hot_embedding,
    ot_distances,
)

# 2-d embeddings: e0 and e1 orthogonal, e2 at 45 degrees between them, e3 = -e0.
TABLE_2D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def _windows(*rows: list[int], K: int | None = None) -> Windows:
    K = K or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), K, dtype=torch.long)
    for n, r in enumerate(rows):
        ids[n, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Windows(ids, torch.tensor([len(r) for r in rows]))


def _random_table(V: int = 12, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(V, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_window_with_itself_is_zero(solver: str) -> None:
    w = _windows([3, 1, 4, 1, 5], [9, 2, 6, 5, 3])
    D = ot_distances(w, w, _random_table(), OTConfig(solver=solver, eps=0.01))
    assert D.dtype == torch.float64 and D.shape == (2,)
    assert torch.allclose(D, torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_permutation_is_zero_exact() -> None:
    a = _windows([3, 1, 4, 7, 5])
    b = _windows([5, 7, 3, 4, 1])
    assert ot_distances(a, b, _random_table()).item() == pytest.approx(0.0, abs=1e-12)


def test_two_by_two_by_hand() -> None:
    # teacher (e0, e1), student (e2, e1). Costs 1 - cos: C(e0,e2) = 1 - 1/sqrt2 = 0.2929,
    # C(e0,e1) = 1, C(e1,e2) = 0.2929, C(e1,e1) = 0.
    # Matching e0->e2, e1->e1 costs 0.2929 + 0 = 0.2929; e0->e1, e1->e2 costs 1.2929.
    # D = mean matched cost = (1 - 1/sqrt2) / 2 = 0.14645.
    D = ot_distances(_windows([0, 1]), _windows([2, 1]), TABLE_2D)
    assert D.item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-12)


def test_opposite_and_orthogonal_tokens() -> None:
    # (e0) vs (e3 = -e0): cost 2. (e0) vs (e1): cost 1.
    D = ot_distances(_windows([0], [0]), _windows([3], [1]), TABLE_2D)
    assert D.tolist() == pytest.approx([2.0, 1.0])


def test_unequal_lengths_by_hand() -> None:
    # teacher (e0): mass 1 at e0. student (e0, e1): mass 1/2 each. Half of e0's mass stays put
    # (cost 0), half moves to e1 (cost 1): D = 0.5.
    D = ot_distances(_windows([0]), _windows([0, 1]), TABLE_2D)
    assert D.item() == pytest.approx(0.5, abs=1e-9)


def test_unequal_lengths_match_pot() -> None:
    ot = pytest.importorskip("ot")
    table = _random_table(V=20, d=6, seed=1)
    a = _windows([2, 7, 11], K=5)  # stopped at EOS after 3 tokens
    b = _windows([4, 2, 19, 8, 13])
    C = cost_matrices(a, b, table)[0, :3, :5].numpy()
    ref = ot.emd2(np.full(3, 1 / 3), np.full(5, 1 / 5), C)
    assert exact_ot(C) == pytest.approx(ref, abs=1e-9)
    assert ot_distances(a, b, table).item() == pytest.approx(ref, abs=1e-9)
    sink = ot_distances(a, b, table, OTConfig(solver="sinkhorn", eps=0.005, max_iter=5000)).item()
    assert sink == pytest.approx(ref, abs=1e-2)


def test_sinkhorn_approaches_exact_as_eps_shrinks() -> None:
    table = _random_table(V=16, d=4, seed=2)
    a = _windows([1, 5, 9, 13], [0, 2, 4, 6])
    b = _windows([2, 6, 10, 14], [15, 11, 7, 3])
    exact = ot_distances(a, b, table)
    err = {
        eps: (ot_distances(a, b, table, OTConfig(solver="sinkhorn", eps=eps, max_iter=5000)) - exact).abs().max().item()
        for eps in (0.1, 0.01)
    }
    assert err[0.01] < err[0.1]
    assert err[0.01] < 1e-2


def test_batched_mixed_lengths_equal_one_by_one() -> None:
    table = _random_table(V=10, d=3, seed=3)
    rows_a = [[1, 2, 3], [4, 5], [6]]
    rows_b = [[3, 2], [7, 8, 9], [6, 1, 0]]
    batched = ot_distances(_windows(*rows_a), _windows(*rows_b), table)
    single = [ot_distances(_windows(ra), _windows(rb), table).item() for ra, rb in zip(rows_a, rows_b)]
    assert batched.tolist() == pytest.approx(single, abs=1e-12)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_empty_windows(solver: str) -> None:
    a = _windows([], [], [1], K=2)
    b = _windows([], [2], [], K=2)
    D = ot_distances(a, b, TABLE_2D, OTConfig(solver=solver, empty_cost=0.75))
    assert D.tolist() == [0.0, 0.75, 0.75]


def test_one_hot_embedding_counts_mismatches() -> None:
    # (5, 7, 9) vs (7, 5, 8): 5 and 7 match at cost 0, 9 -> 8 costs 1: D = 1/3.
    a, b, table = one_hot_embedding(_windows([5, 7, 9]), _windows([7, 5, 8]))
    assert table.shape == (4, 4)
    assert ot_distances(a, b, table).item() == pytest.approx(1 / 3)


def test_padding_ids_are_ignored() -> None:
    clean = _windows([0, 1], K=3)
    dirty = Windows(torch.tensor([[0, 1, 3]]), torch.tensor([2]))
    assert ot_distances(dirty, _windows([2, 1]), TABLE_2D).item() == pytest.approx(
        ot_distances(clean, _windows([2, 1]), TABLE_2D).item()
    )


def test_unknown_solver_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="exact, sinkhorn"):
        OTConfig(solver="greedy")
