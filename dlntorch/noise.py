"""Noise models: the stochastic term a Langevin update composes with its drift (diffrax's
separate noise terms). Each is registered by name (`optim.noise`) next to its code.

A term adds σ·(its noise) to the factors [W_1, …, W_N] in place, σ = sqrt(2 lr/β), drawing from
`generator`. `add_` gets the factors in whatever layout the caller works in; the draws are always
made in the factors' own shape (B, d_p, d_{p−1}) — into `draws` buffers when given, moved onto the
layout by `view` — so every layout draws the same numbers in the same order.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import fail, resolve_depth
from .geometry import fibre_move
from .registry import Registry

NOISES = Registry("optim.noise")

View = Callable[[Tensor], Tensor]


def same(x: Tensor) -> Tensor:
    """The view of the factors' own layout."""
    return x


class NoiseTerm:
    """The interface. `any_layout`: whether the term works on the fast path's other layouts."""

    any_layout = True

    def add_(self, factors: Sequence[Tensor], scale: float, generator: torch.Generator | None,
             draws: Sequence[Tensor] | None = None, view: View = same) -> None:
        raise NotImplementedError


@NOISES.register("isotropic")
class Isotropic(NoiseTerm):
    """ξ ~ N(0, I) in every entry of every factor: the Euler–Maruyama step of
    dW = −∇L dt + sqrt(2/β) dB, whose stationary law is ∝ e^{−βL} (up to O(lr))."""

    def add_(self, factors, scale, generator, draws=None, view=same):
        for i, p in enumerate(factors):
            if draws is None:
                xi = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            else:
                xi = view(torch.randn(draws[i].shape, generator=generator, out=draws[i]))
            p.add_(xi, alpha=scale)


def _needs_a_fibre(cfg: Any) -> None:
    if resolve_depth(cfg.model) < 2:
        fail("optim.noise", cfg.optim.noise, "depth 1 has no fibre to move along; use depth ≥ 2 or isotropic")


@NOISES.register("fibre", check=_needs_a_fibre)
class Fibre(NoiseTerm):
    """An exact random walk along the fibre (problem 7): W_p ← e^{σA_p} W_p e^{−σA_{p−1}}
    (A_0 = A_N = 0) with A_p ∈ gl(d_p) of i.i.d. N(0, 1) entries. It moves along the GL orbit of
    the factors and leaves the product W where the drift put it: only the balancedness G_p is
    noisy. The factors must be the chain [W_1, …, W_N] in order, in the batch layout (a matrix
    exponential per hidden layer)."""

    any_layout = False

    def add_(self, factors, scale, generator, draws=None, view=same):
        generators = [scale * torch.randn(f.shape[:-2] + (f.shape[-2], f.shape[-2]), generator=generator,
                                          dtype=f.dtype, device=f.device) for f in factors[:-1]]
        for p, moved in zip(factors, fibre_move([f.detach() for f in factors], generators)):
            p.copy_(moved)


def noise_term(name: str) -> NoiseTerm:
    return NOISES[name].build()
