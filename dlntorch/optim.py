"""Update rules: each written once, as a functional kernel over lists of tensors, and registered
by name (`optim.name`) with its own structured config and its value checks.

A kernel works in place on any layout of the factors — the parameters (B, d_p, d_{p−1}) or the
fast path's replica-last planes (d_p, d_{p−1}, B) — since it only adds and scales tensors of one
shape. The Optimizer's `step()` (the torch.optim / geoopt contract) and the fast path
(`dynamics.step.StepDynamics`) call the same kernel, so the fast path is "the same rule on
another layout". gd and sgd are torch.optim.SGD's own rule (its Optimizer is torch's; the
kernel repeats its ops exactly), momentum and adam are torch.optim's and have no kernel here.
Step-based dynamics approximate gradient flow in time t = lr × step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from .errors import at_least, fail, non_negative_finite, positive_finite
from .noise import NOISES, NoiseTerm, View, noise_term, same
from .registry import Registry

# name → Option(build = (cfg.optim, params, generator) -> Optimizer, check, schema, extra):
# extra["kernel"] = (optimizer, state, grads, draws, view) -> None, the rule for the fast path.
# The exact flows register here too (dynamics/flows.py), with extra["dynamics"].
OPTIMISERS = Registry("optim.name")


# ------------------------------------------------------------------------------ kernels

def sgd_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """torch.optim.SGD without momentum, op for op: g ← g + λW, then W ← W − lr·g, by
    `torch._foreach_add_` (the call SGD makes: foreach on CUDA, on the CPU its per-tensor
    `add_`, the same kernel), so the result is bit-identical given the same gradient."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(params, grads, alpha=-lr)


def langevin_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, beta: float,
                     weight_decay: float, noise: NoiseTerm, generator: torch.Generator | None,
                     draws: Sequence[Tensor] | None = None, view: View | None = None) -> None:
    """Unadjusted Langevin: W ← (1 − lr λ) W − lr ∂L/∂W, then the noise term adds
    sqrt(2 lr/β) × its noise (see dlntorch.noise)."""
    for p, g in zip(params, grads):
        if weight_decay:   # W − lr(g + λW) = (1 − lr λ) W − lr g
            p.mul_(1 - lr * weight_decay)
        p.add_(g, alpha=-lr)
    noise.add_(params, math.sqrt(2 * lr / beta), generator, draws, same if view is None else view)


# ------------------------------------------------------------------------------ Langevin

class Langevin(Optimizer):
    """Unadjusted Langevin (`langevin_update_`) as a torch.optim.Optimizer.

    noise: a registered noise model (dlntorch.noise): "isotropic" — ξ ~ N(0, I) in every factor,
    stationary law ∝ e^{−βL} — or "fibre" — an exact random walk along the fibres, the product
    only feels the gradient (problem 7); with fibre noise the parameters must be the chain
    [W_1, …, W_N] in order. `generator` makes the noise reproducible and checkpointable.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, beta: float, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None, noise: str = "isotropic",
                 kappa: float | None = None):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr} must be finite and > 0")
        if not (beta > 0):
            raise ValueError(f"beta={beta} must be > 0")
        if noise not in NOISES:
            raise ValueError(f"noise={noise!r} must be one of {NOISES.names()}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.generator, self.noise = generator, noise
        self.term: NoiseTerm = noise_term(noise, kappa)
        self.term.check_start([p for group in self.param_groups for p in group["params"]])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self.update_(params, [p.grad for p in params], group)
        return loss

    def update_(self, params, grads, group=None, draws=None, view=None) -> None:
        """The kernel with this optimizer's hyper-parameters and noise (the fast path calls it too)."""
        group = self.param_groups[0] if group is None else group
        langevin_update_(params, grads, group["lr"], group["beta"], group["weight_decay"], self.term,
                         self.generator, draws, view)


# ------------------------------------------------------------------------------ registered

@dataclass
class GdConfig:
    """optim=gd: plain full-batch gradient descent."""
    name: str = "gd"
    lr: float = 0.05
    weight_decay: float = 0.0


@dataclass
class SgdConfig:
    """optim=sgd: minibatch SGD, batch_size observed entries / measurements / samples per step."""
    name: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 1


@dataclass
class MomentumConfig:
    name: str = "momentum"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LangevinConfig:
    name: str = "langevin"
    lr: float = 0.05
    weight_decay: float = 0.0
    beta: float = 1e4                   # inverse temperature
    noise: str = "isotropic"            # a registered noise model (dlntorch.noise)
    kappa: Optional[float] = None       # tangential: weight of the normal noise, in [0, 1] (None: 0)


def _check_decay(cfg: Any) -> None:
    non_negative_finite("optim.weight_decay", cfg.optim.weight_decay)


def _check_sgd(cfg: Any) -> None:
    _check_decay(cfg)
    at_least("optim.batch_size", cfg.optim.batch_size, 1)


def _check_momentum(cfg: Any) -> None:
    _check_decay(cfg)
    if not (0 <= cfg.optim.momentum < 1):
        fail("optim.momentum", cfg.optim.momentum, "it must be in [0, 1)")


def _check_adam(cfg: Any) -> None:
    _check_decay(cfg)
    betas = list(cfg.optim.betas)
    if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        fail("optim.betas", betas, "it must be two numbers in [0, 1)")


def _check_langevin(cfg: Any) -> None:
    _check_decay(cfg)
    positive_finite("optim.beta", cfg.optim.beta)
    noise = NOISES[cfg.optim.noise]
    if cfg.optim.kappa is not None and cfg.optim.noise != "tangential":
        fail("optim.kappa", cfg.optim.kappa, "it mixes normal noise into optim.noise=tangential only")
    if noise.check is not None:
        noise.check(cfg)


def _sgd_kernel(optimizer: Optimizer, state, grads, draws=None, view=None) -> None:
    group = optimizer.param_groups[0]
    sgd_update_(state, grads, group["lr"], group["weight_decay"])


def _langevin_kernel(optimizer: "Langevin", state, grads, draws=None, view=None) -> None:
    optimizer.update_(state, grads, draws=draws, view=view)


@OPTIMISERS.register("gd", schema=GdConfig, check=_check_decay, kernel=_sgd_kernel)
def _gd(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)


OPTIMISERS.register("sgd", schema=SgdConfig, check=_check_sgd, kernel=_sgd_kernel, minibatch=True)(_gd)


@OPTIMISERS.register("momentum", schema=MomentumConfig, check=_check_momentum)
def _momentum(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMISERS.register("adam", schema=AdamConfig, check=_check_adam)
def _adam(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@OPTIMISERS.register("langevin", schema=LangevinConfig, check=_check_langevin, kernel=_langevin_kernel)
def _langevin(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    return Langevin(params, lr=cfg.lr, beta=cfg.beta, weight_decay=cfg.weight_decay, generator=generator,
                    noise=cfg.noise, kappa=cfg.kappa)


def build_optimizer(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """The Optimizer of `cfg.optim` (step-based dynamics only)."""
    option = OPTIMISERS[cfg.name]
    if "dynamics" in option.extra:
        raise ValueError(f"optim.name={cfg.name!r} is not a step-based optimizer")
    return option.build(cfg, params, generator)


def fast_kernel(optimizer: Optimizer, name: str) -> Callable | None:
    """The registered kernel the fast path may call for this optimizer, or None (torch.optim's
    own step): only where the kernel runs on any layout (a fibre noise term does not)."""
    kernel = OPTIMISERS[name].extra.get("kernel")
    if kernel is None or not getattr(getattr(optimizer, "term", None), "any_layout", True):
        return None
    return kernel
