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


class Langevin(Optimizer):
    """Unadjusted Langevin: W ← W − lr (∂L/∂W + λW) + sqrt(2 lr/β) ξ, ξ ~ N(0, I).

    The Euler–Maruyama step of dW = −∇L dW dt + sqrt(2/β) dB, whose stationary law is ∝ e^{−βL}
    (up to O(lr)). `generator` makes the noise reproducible and checkpointable.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, beta: float, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr} must be finite and > 0")
        if not (beta > 0):
            raise ValueError(f"beta={beta} must be > 0")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.generator = generator

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
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                p.add_(noise, alpha=noise_scale)
        return loss


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
        return Langevin(params, lr=lr, beta=cfg.beta, weight_decay=decay, generator=generator)
    raise ValueError(f"optim.name={name!r} is not a step-based optimizer")
