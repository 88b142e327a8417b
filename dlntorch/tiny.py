"""Arithmetic on many tiny matrices at once (the 2x2 tasks' thousands of replicas).

Torch reduces a short trailing axis one output at a time and multiplies a batch of tiny matrices
one matrix at a time, so both cost far more than their arithmetic: at B = 65 536 replicas (one
torch thread), `s.sum(-1)` of s (B, 2) takes 1.4 ms against 0.04 ms for `s[:, 0] + s[:, 1]`,
`torch.stack([x, y]).norm(dim=0)` 7.5 ms against 0.3 ms for √(x² + y²), and a 2x2 `bmm` 1.8 ms
against 0.25 ms for the same products on planes. Planes hold the replica axis last and
contiguous, (d_out, d_in, B): C = A B is Σ_k A[:, k] ⊗ B[k, :], d elementwise ops each
vectorised over d_out·d_in·B numbers. The functions here do the same sums in those cheap forms.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TINY = 4                    # an axis of at most this many entries is summed slice by slice
PLANES_MAX_WIDTH = 6        # planes pay off when every width is ≤ this …
PLANES_MIN_REPLICAS = 512   # … and there are at least this many replicas (crossovers measured on a CPU)


def tiny_widths(widths: Sequence[int]) -> bool:
    """Widths small enough for planes to beat batched matmuls once there are many replicas."""
    return max(widths) <= PLANES_MAX_WIDTH


def planes_pay(widths: Sequence[int], replicas: int) -> bool:
    """Whether planes beat batched tiny matmuls (the fast path's and the per-replica flow's choice)."""
    return tiny_widths(widths) and replicas >= PLANES_MIN_REPLICAS


def planes_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """C = A B on planes (d_out, d_in, B): Σ_k A[:, k] ⊗ B[k, :], into `out`, or (None) out of
    place with the same ops, which torch.compile can trace (an in-place chain on a traced input
    compiled a wrong step in torch 2.13)."""
    if out is None:
        out = a[:, 0:1] * b[0:1]
        for k in range(1, a.shape[1]):
            out = torch.addcmul(out, a[:, k:k + 1], b[k:k + 1])
        return out
    torch.mul(a[:, 0:1], b[0:1], out=out)
    for k in range(1, a.shape[1]):
        out.addcmul_(a[:, k:k + 1], b[k:k + 1])
    return out


def planes_T(x: Tensor) -> Tensor:
    return x.transpose(0, 1)


def to_planes(x: Tensor) -> Tensor:
    """(B, m, n) → planes (m, n, B), contiguous."""
    return x.permute(1, 2, 0).contiguous()


def from_planes(x: Tensor) -> Tensor:
    """Planes (m, n, B) → (B, m, n), contiguous."""
    return x.permute(2, 0, 1).contiguous()


def axis_sum(x: Tensor, dim: int = -1) -> Tensor:
    """x.sum(dim); an axis of at most TINY entries as adds of its slices (a bool x is counted)."""
    if x.dtype == torch.bool:
        x = x.to(torch.int64)
    if not 0 < x.shape[dim] <= TINY:      # an empty axis sums to 0
        return x.sum(dim)
    parts = x.unbind(dim)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def root_sum_squares(parts: Sequence[Tensor]) -> Tensor:
    """(Σ_i x_i²)^{1/2} elementwise over tensors x_i of one shape: torch.stack(parts).norm(dim=0)
    without the stack and its norm over the outer axis."""
    total = parts[0] * parts[0]
    for part in parts[1:]:
        total = torch.addcmul(total, part, part)
    return total.sqrt()


def pair_singular_values(M: Tensor) -> tuple[Tensor, Tensor]:
    """σ_1 ≥ σ_2 ≥ 0 of 2x2 matrices M (…, 2, 2) in closed form, to float64 rounding (an error of a
    few ε·σ_1, which is LAPACK's own): M = [[a, b], [c, d]] is a rotation-like part plus a
    reflection-like part, σ_1 = (‖(a + d, c − b)‖ + ‖(a − d, b + c)‖)/2, and σ_2 = σ_1 |det(M/σ_1)|
    (σ_1σ_2 = |det M|: an exactly singular M has σ_2 = 0; scaled, so that no tiny M underflows).
    The one closed form of both metrics.singular_values and geometry.svd_pair."""
    a, b, c, d = M[..., 0, 0], M[..., 0, 1], M[..., 1, 0], M[..., 1, 1]
    top = 0.5 * (torch.hypot(a + d, c - b) + torch.hypot(a - d, b + c))
    scale = top.clamp_min(torch.finfo(M.dtype).tiny)
    bottom = top * ((a / scale) * (d / scale) - (b / scale) * (c / scale)).abs()
    return top, torch.minimum(bottom, top)      # σ_2 ≤ σ_1 through rounding too
