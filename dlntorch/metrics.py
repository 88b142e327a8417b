"""Observables, batched over replicas: each is a tensor with leading axis B.

Computed only at logged times, never per step. The singular values come from one SVD shared by
every observable that needs them — in closed form for the tiny shapes (2x2, a row or a column),
where LAPACK's batched SVD and LU cost 20x the arithmetic.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .geometry import balance_gap, entropy
from .network import chain_and_balancedness
from .tasks import Task
from .tiny import axis_sum, pair_singular_values, root_sum_squares


def singular_values(W: Tensor) -> Tensor:
    """σ_1 ≥ σ_2 ≥ … of each W (B, m, n), as torch.linalg.svdvals gives them, to float64 rounding
    (an error of a few ε·σ_1, which is LAPACK's own). Closed forms: a row or a column has the one
    singular value ‖W‖; a 2x2 W, tiny.pair_singular_values."""
    m, n = W.shape[-2:]
    tiny = torch.finfo(W.dtype).tiny
    if min(m, n) == 1:
        x = W.flatten(1)
        largest = x.abs().amax(1, keepdim=True)       # scaled like LAPACK: no under- or overflow
        return largest * (x / largest.clamp_min(tiny)).norm(dim=1, keepdim=True)
    if (m, n) == (2, 2):
        return torch.stack(pair_singular_values(W), dim=-1)
    return torch.linalg.svdvals(W)


def determinant(W: Tensor) -> Tensor:
    """det W of each square W (B, d, d): ad − bc for 2x2 and the entry for 1x1 (LAPACK's LU gives
    the same to rounding), LU otherwise."""
    d = W.shape[-1]
    if d == 1:
        return W[:, 0, 0]
    if d == 2:
        return W[:, 0, 0] * W[:, 1, 1] - W[:, 0, 1] * W[:, 1, 0]
    return torch.linalg.det(W)


def effective_rank(s: Tensor) -> Tensor:
    """Roy & Vetterli (2007): exp(−Σ p_i log p_i), p_i = s_i/Σ_j s_j, with 0 log 0 = 0.

    The zero matrix has no distribution p; we report 0 for it (its rank)."""
    total = axis_sum(s)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)[..., None]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(s.dtype).tiny)), torch.zeros_like(p))
    return torch.where(total > 0, torch.exp(-axis_sum(plogp)), torch.zeros_like(total))


def stable_rank(s: Tensor) -> Tensor:
    """‖W‖_F² / ‖W‖_2² (0 for the zero matrix)."""
    top = s[..., 0] ** 2
    return torch.where(top > 0, axis_sum(s ** 2) / top.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(top))


def numerical_rank(s: Tensor, tol: float) -> Tensor:
    """#{i : s_i > tol · s_1} (s sorted descending, as svdvals returns it)."""
    return axis_sum(s > tol * s[..., :1]).to(s.dtype) * (s[..., 0] > 0)


def frobenius(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def total_norm(parts: Sequence[Tensor]) -> Tensor:
    """(Σ_p ‖x_p‖_F²)^{1/2} per replica."""
    return root_sum_squares([frobenius(x) for x in parts])


def entry_name(i: int, j: int) -> str:
    """The observable of the entry W_ij, named as in mathematics: 1-based, w12 = W[0, 1] (the seed
    task's own names); w10_3 once an index has two digits, so that names stay unambiguous."""
    return f"w{i}{j}" if i < 10 and j < 10 else f"w{i}_{j}"


def check_entries(entries: Sequence[Sequence[int]], shape: tuple[int, int]) -> None:
    """run.log_entries: pairs [i, j] with 1 ≤ i ≤ m, 1 ≤ j ≤ n (1-based, as W_ij is written)."""
    m, n = shape
    for entry in entries:
        pair = list(entry)
        if len(pair) != 2 or not all(isinstance(x, int) for x in pair) or not (1 <= pair[0] <= m and 1 <= pair[1] <= n):
            raise ConfigError(f"run.log_entries={[list(e) for e in entries]} is not allowed: each entry must be "
                              f"[i, j] with 1 ≤ i ≤ {m} and 1 ≤ j ≤ {n} (1-based) for the task's {m}x{n} "
                              f"matrix, and {pair} is not.")


def entries_of(W: Tensor, entries: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """The chosen entries of W (B, m, n) as observables w_ij (1-based indices)."""
    return {entry_name(i, j): W[:, i - 1, j - 1] for i, j in entries}


def observe(factors: Sequence[Tensor], task: Task, G0: Sequence[Tensor], rank_tol: float,
            beta: float | None = None, depth: int | None = None,
            diverged: Tensor | None = None, sigma_k: int = 0,
            entries: Sequence[Sequence[int]] = (), keep_product: bool = False) -> dict[str, Tensor]:
    """Every observable of the current state. Scalars per replica are (B,); `singular_values`
    is (B, k), and its first `sigma_k` columns are also the scalars sigma_1, sigma_2, … (so that
    TensorBoard and the summary's aggregates carry them). `entries` ([i, j], 1-based) adds the
    scalars w_ij. `depth` is the N of the entropy S_N when `factors` is just [W] (downstairs flows).
    `keep_product`: the raw product W_N ⋯ W_1 too, as `product` (B, m, n).

    Diverged (non-finite) replicas report their raw energy and factor norms and NaN for the rest:
    they are computed on zeros instead, since LAPACK refuses non-finite input."""
    raw = [f.detach() for f in factors]
    B, depth = raw[0].shape[0], depth or len(raw)
    bad = ~torch.stack([torch.isfinite(f).flatten(1).all(1) for f in raw]).all(0)
    if diverged is not None:
        bad = bad | diverged
    product, G = chain_and_balancedness(raw)
    energy = task.energy(product)      # the raw one: a diverged replica shows its own
    masked = bool(bad.any())           # one host sync: the masks cost as much as the observables
    if masked:                         # zero factors there, so W = 0 and G = 0 exactly
        def zero(x: Tensor) -> Tensor:
            return torch.where(bad.view(B, 1, 1), torch.zeros_like(x), x)
        factors, W, G = [zero(f) for f in raw], zero(product), [zero(g) for g in G]
    else:
        factors, W = raw, product
    s = singular_values(W)
    out: dict[str, Tensor] = {}
    if len(factors) > 1:
        junctions = {f"balancedness_{p}": frobenius(g) for p, g in enumerate(G, start=1)}
        out["balancedness"] = root_sum_squares(list(junctions.values()))   # = total_norm(G)
        out["balancedness_drift"] = total_norm([g - g0 for g, g0 in zip(G, G0)])
        out.update(junctions)
        out["balance_gap"] = balance_gap(factors, singular_values=s)
    elif depth == 1:
        out["balancedness"] = out["balancedness_drift"] = out["balance_gap"] = torch.zeros_like(s[:, 0])
    out.update(effective_rank=effective_rank(s), stable_rank=stable_rank(s),
               numerical_rank=numerical_rank(s, rank_tol), sigma_max=s[:, 0], sigma_min=s[:, -1])
    if W.shape[-1] == W.shape[-2]:
        out["sigma_ratio"] = s[:, -1] / s[:, 0].clamp_min(torch.finfo(s.dtype).tiny)
        out["det"] = determinant(W)
        if 1 < depth < math.inf:     # S_N has (N − 1) log c_d: none at N = 1 or N = inf
            out["entropy"] = entropy(W, depth, singular_values=s)
            if beta is not None:
                out["free_energy"] = energy - out["entropy"] / beta
    out.update(task.observables(W))
    out.update(entries_of(W, entries))
    out.update({f"sigma_{i}": s[:, i - 1] for i in range(1, min(sigma_k, s.shape[-1]) + 1)})
    out["product_norm"] = frobenius(W)
    if masked:
        out = {k: torch.where(bad, torch.nan, v.to(W.dtype)) for k, v in out.items()}
        s = torch.where(bad.view(B, 1), torch.nan, s)
    else:
        out = {k: v.to(W.dtype) for k, v in out.items()}
    out["energy"] = energy
    for p, f in enumerate(raw, start=1):
        out[f"factor_norm_{p}"] = frobenius(f)
    out["singular_values"] = s
    if keep_product:
        out["product"] = product
    return out


def product_drift(W: Tensor, W0: Tensor, diverged: Tensor) -> Tensor:
    """‖W(t) − W(0)‖_F per replica, the product's displacement since the start: noise along the
    fibre alone (gl_walk, fibre_brownian) never moves it, so without a drift it stays 0 to
    rounding; NaN for diverged (or non-finite) replicas, like the other observables."""
    drift = frobenius(W - W0)
    return torch.where(diverged | ~torch.isfinite(drift), torch.nan, drift)
