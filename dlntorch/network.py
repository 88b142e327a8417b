"""The deep linear network W = W_N ⋯ W_1, batched over a leading replica axis.

Factor p (p = 1..N) is one nn.Parameter of shape (B, d_p, d_{p-1}); the product is
(B, d_N, d_0). Everything here is a batched matmul: replicas never interact.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def chain(factors: Sequence[Tensor]) -> Tensor:
    """W_N ⋯ W_1 for factors given input-to-output as [W_1, …, W_N]."""
    product = factors[0]
    for factor in factors[1:]:
        product = torch.matmul(factor, product)
    return product


def balancedness_of(factors: Sequence[Tensor]) -> list[Tensor]:
    """G_p = W_{p+1}^T W_{p+1} − W_p W_p^T for p = 1..N−1, each (B, d_p, d_p)."""
    return [
        upper.mT @ upper - lower @ lower.mT
        for lower, upper in zip(factors[:-1], factors[1:])
    ]


def factor_gradients(factors: Sequence[Tensor], grad_product: Tensor) -> list[Tensor]:
    """∂L/∂W_p = (W_N ⋯ W_{p+1})^T ∇E(W) (W_{p−1} ⋯ W_1)^T for L = E ∘ φ.

    The chain rule by prefix products (inputs side) and suffix products (outputs side):
    2N batched matmuls in all instead of autograd's graph, the fast path for closed-form ∇E.
    """
    depth = len(factors)
    # prefix[p] = W_p ⋯ W_1 (prefix[0] = None stands for the identity)
    prefix: list[Tensor | None] = [None]
    for factor in factors[:-1]:
        prefix.append(factor if prefix[-1] is None else factor @ prefix[-1])
    grads: list[Tensor] = [None] * depth  # type: ignore[list-item]
    # back = (W_N ⋯ W_{p+1})^T ∇E, built from the output side down
    back = grad_product
    for p in range(depth - 1, -1, -1):
        grads[p] = back if prefix[p] is None else back @ prefix[p].mT
        if p > 0:
            back = factors[p].mT @ back
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
