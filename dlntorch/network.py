"""The deep linear network W = W_N ⋯ W_1, batched over a leading replica axis.

Factor p (p = 1..N) is one nn.Parameter of shape (B, d_p, d_{p-1}); the product is
(B, d_N, d_0). Everything here is a batched matmul: replicas never interact.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .tiny import from_planes, planes_mm, planes_pay, planes_T, tiny_widths, to_planes


def chain(factors: Sequence[Tensor], mm: Callable = torch.matmul) -> Tensor:
    """W_N ⋯ W_1 for factors given input-to-output as [W_1, …, W_N] (`mm`: the layout's matmul)."""
    product = factors[0]
    for factor in factors[1:]:
        product = mm(factor, product)
    return product


def widths_of(factors: Sequence[Tensor]) -> list[int]:
    """[d_0, d_1, …, d_N] of factors (B, d_p, d_{p−1})."""
    return [factors[0].shape[-1]] + [f.shape[-2] for f in factors]


def fast_chain(factors: Sequence[Tensor]) -> Tensor:
    """chain(factors), on planes where they pay (tiny.planes_pay: tiny widths, many replicas):
    the stop test's product at every check (2x2 at depth 3, B = 4096: the two batched matmuls
    cost ~250 µs, planes ~60 µs). Equal to chain to rounding; for the loop's stop test, not for
    the observables, whose bits must not depend on B (chain_and_balancedness)."""
    if not planes_pay(widths_of(factors), factors[0].shape[0]):
        return chain(factors)
    return from_planes(chain([to_planes(f) for f in factors], planes_mm))


def balancedness_of(factors: Sequence[Tensor]) -> list[Tensor]:
    """G_p = W_{p+1}^T W_{p+1} − W_p W_p^T for p = 1..N−1, each (B, d_p, d_p)."""
    return [
        upper.mT @ upper - lower @ lower.mT
        for lower, upper in zip(factors[:-1], factors[1:])
    ]


def chain_and_balancedness(factors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """chain(factors) and balancedness_of(factors) together, for the observables; for tiny
    widths on planes (dlntorch.tiny), each factor copied there once, where 2x2 bmm costs 7x.
    Chosen by the widths alone, whatever the number of replicas: a replica's bits must not
    depend on how many are observed with it (recorder.observed_batches)."""
    if not tiny_widths(widths_of(factors)):
        return chain(factors), balancedness_of(factors)
    planes = [to_planes(f) for f in factors]
    product = chain(planes, planes_mm)
    G = [planes_mm(planes_T(upper), upper) - planes_mm(lower, planes_T(lower))
         for lower, upper in zip(planes[:-1], planes[1:])]
    return from_planes(product), [from_planes(g) for g in G]


def _matmul(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    return a @ b if out is None else torch.matmul(a, b, out=out)


def _transpose(x: Tensor) -> Tensor:
    return x.mT


def factor_gradients(factors: Sequence[Tensor], gradient: Tensor | Callable[[Tensor], Tensor],
                     mm: Callable = _matmul, T: Callable[[Tensor], Tensor] = _transpose,
                     out: Any = None) -> list[Tensor]:
    """∂L/∂W_p = (W_N ⋯ W_{p+1})^T ∇E(W) (W_{p−1} ⋯ W_1)^T for L = E ∘ φ: the chain rule.

    Prefix products W_p ⋯ W_1 from the input side, then from the output side down
    back_{p−1} = W_p^T back_p and grad_p = back_p (W_{p−1} ⋯ W_1)^T: 2N − 2 matmuls besides the
    product, instead of autograd's graph. `gradient` is ∇E(W) itself, or a function W ↦ ∇E(W),
    which then gets the last prefix product (so the product is computed once, here).

    Layout-agnostic: `mm(a, b, out)` and `T(x)` are the layout's matmul and transpose (batched
    `@` and `.mT` by default); `out` holds preallocated buffers `prefix[p]` (W_{p+1} ⋯ W_1),
    `back[p]` and `grads[p]` (p ≥ 1), as the fast path's workspace does, or is None.
    """
    depth = len(factors)
    full = callable(gradient)
    # prefix[p] = W_{p+1} ⋯ W_1; the product itself only when ∇E is to be evaluated here
    prefix = [factors[0]]
    for p in range(1, depth if full else depth - 1):
        prefix.append(mm(factors[p], prefix[-1], None if out is None else out.prefix[p]))
    back = gradient(prefix[-1]) if full else gradient
    grads: list[Tensor] = [None] * depth if out is None else out.grads  # type: ignore[list-item]
    # back = (W_N ⋯ W_{p+1})^T ∇E, built from the output side down
    for p in range(depth - 1, 0, -1):
        grads[p] = mm(back, T(prefix[p - 1]), None if out is None else out.grads[p])
        back = mm(T(factors[p]), back, None if out is None else out.back[p - 1])
    grads[0] = back
    return grads


def default_widths(depth: int, rows: int, cols: int) -> list[int]:
    """[d_0, …, d_N] with every hidden width max(d_0, d_N)."""
    hidden = max(rows, cols)
    return [cols] + [hidden] * (depth - 1) + [rows]


class DeepLinearNetwork(nn.Module):
    """B independent deep linear networks of widths [d_0, …, d_N] as one batched module."""

    def __init__(
        self,
        widths: Sequence[int],
        replicas: int = 1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths={list(widths)} needs at least [d_0, d_1] (depth ≥ 1)")
        if any(int(w) <= 0 for w in widths):
            raise ValueError(f"widths={list(widths)} must all be positive")
        if replicas < 1:
            raise ValueError(f"replicas={replicas} must be at least 1")
        self.widths = [int(w) for w in widths]
        self.replicas = int(replicas)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.zeros(replicas, d_out, d_in, dtype=dtype, device=device))
            for d_in, d_out in zip(self.widths[:-1], self.widths[1:])
        )

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) = (d_N, d_0) of the end-to-end matrix."""
        return self.widths[-1], self.widths[0]

    def product(self) -> Tensor:
        """The end-to-end matrices W = W_N ⋯ W_1, (B, d_N, d_0)."""
        return chain(list(self.factors))

    def forward(self, x: Tensor) -> Tensor:
        """W x for inputs x of shape (B, d_0, k) (or broadcastable)."""
        for factor in self.factors:
            x = factor @ x
        return x

    def balancedness(self) -> list[Tensor]:
        """The G_p, p = 1..N−1 (empty at depth 1)."""
        return balancedness_of(list(self.factors))

    @torch.no_grad()
    def set_factors(self, factors: Sequence[Tensor]) -> None:
        for param, value in zip(self.factors, factors, strict=True):
            param.copy_(value)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, replicas={self.replicas}"
