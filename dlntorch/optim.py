"""Update rules as torch.optim.Optimizers (the torch.optim / geoopt contract: `step()`).

gd, sgd and momentum are torch.optim.SGD, adam is torch.optim.Adam; Langevin is ours. Step-based
dynamics approximate gradient flow in time t = lr × step.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


NOISES = ("isotropic", "fibre")


class Langevin(Optimizer):
    """Unadjusted Langevin: W ← W − lr (∂L/∂W + λW) + sqrt(2 lr/β) ξ.

    noise="isotropic": ξ ~ N(0, I) in every factor — the Euler–Maruyama step of
    dW = −∇L dt + sqrt(2/β) dB, whose stationary law is ∝ e^{−βL} (up to O(lr)).

    noise="fibre": noise tangential to the fibres only (problem 7). After the gradient step the
    factors — which must be the chain [W_1, …, W_N] in order — take an exact fibre move
    W_p ← e^{σA_p} W_p e^{−σA_{p−1}} (A_0 = A_N = 0) with A_p ∈ gl(d_p) of i.i.d. N(0, 1) entries
    and σ = sqrt(2 lr/β): a random walk along the GL orbit of the factors that leaves the
    product W exactly where the gradient step put it, so only the balancedness G_p is noisy.

    `generator` makes the noise reproducible and checkpointable.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, beta: float, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None, noise: str = "isotropic"):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr} must be finite and > 0")
        if not (beta > 0):
            raise ValueError(f"beta={beta} must be > 0")
        if noise not in NOISES:
            raise ValueError(f"noise={noise!r} must be one of {NOISES}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.generator, self.noise = generator, noise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, decay = group["lr"], group["beta"], group["weight_decay"]
            noise_scale = math.sqrt(2 * lr / beta)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if decay:   # W − lr(g + λW) = (1 − lr λ) W − lr g
                    p.mul_(1 - lr * decay)
                p.add_(p.grad, alpha=-lr)
                if self.noise == "isotropic":
                    noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                    p.add_(noise, alpha=noise_scale)
            if self.noise == "fibre":
                self._fibre_noise(group["params"], noise_scale)
        return loss

    def _fibre_noise(self, factors: list[Tensor], scale: float) -> None:
        from .geometry import fibre_move
        generators = [scale * torch.randn(f.shape[:-2] + (f.shape[-2], f.shape[-2]), generator=self.generator,
                                          dtype=f.dtype, device=f.device) for f in factors[:-1]]
        for p, moved in zip(factors, fibre_move([f.detach() for f in factors], generators)):
            p.copy_(moved)


def build_optimizer(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """The Optimizer of `cfg.optim` (step-based dynamics only)."""
    name, lr, decay = cfg.name, cfg.lr, cfg.weight_decay
    if name in ("gd", "sgd"):
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=decay)
    if name == "langevin":
        return Langevin(params, lr=lr, beta=cfg.beta, weight_decay=decay, generator=generator, noise=cfg.noise)
    raise ValueError(f"optim.name={name!r} is not a step-based optimizer")
