"""The free-energy flow (problem 3): the downstairs Riemannian gradient flow of F_β = E − S_N/β.

    dW/dt = −A_N(∇F_β(W)),   ∇F_β = ∇E − ∇S_N/β,

for square full-rank W, an exact ODE integrated like `optim=downstairs` (same solvers, same
time grid t = lr·step). Its fixed points are the critical points of F_β (A_N is positive
definite at full rank), and from a generic start it descends to a local minimiser of F_β: where
the Langevin ensemble of problem 3 concentrates as it cools (β → ∞ gives the downstairs flow of E).

The entropy's gradient is in closed form from the singular values. S_N depends on W only through
s (S_N = (N−1) log c_d + ½ Σ_{i<j} log f_N(s_i, s_j), dlntorch.geometry.entropy), so for
W = U diag(s) V^T

    ∇S_N(W) = U diag(∂S_N/∂s) V^T,   ∂S_N/∂s_i = ½ Σ_{j≠i} ∂_1 log f_N(s_i, s_j),

with the scalar derivatives ∂_1 log f_N taken by autograd of geometry.f_N in its arguments (its
series branch near s_i = s_j keeps them accurate; no autograd through the SVD, which is ill-posed
at repeated singular values). Depths:

- N = 1: S_1 = 0 (one factor, a one-point fibre), so the flow is the gradient flow of E.
- N = inf: S_N = (N−1) log c_d + (d(d−1)/4) log N + ½ Σ log (f_N/N) and f_N/N → f_∞, so S_N
  grows like N log c_d through a constant only; its W-dependent part S̃_∞ = ½ Σ_{i<j} log f_∞(s_i, s_j)
  has a limit. The flow at N = inf is dW/dτ = −A_∞(∇E − ∇S̃_∞/β) in τ = N t (A_N grows like N),
  the limit of the finite-N flows in that clock at fixed β.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import fail, one_of, parse_depth, positive_finite, resolve_depth
from ..geometry import Depth, entropy_singular_gradient, pair_function
from ..network import DeepLinearNetwork
from ..optim import OPTIMISERS
from ..tasks import Task, task_shape
from .flows import DownstairsFlow, _check_solver, _Counted, _not_an_optimizer, _solve, _time_grid, clock_scale


def entropy_gradient(W: Tensor, N: Depth) -> Tensor:
    """∇S_N(W) = U diag(∂S_N/∂s) V^T for square full-rank W (B, d, d) (N = inf: ∇S̃_∞)."""
    U, s, Vh = torch.linalg.svd(W)
    return U @ (entropy_singular_gradient(s, N).unsqueeze(-1) * Vh)


def free_energy_gradient(W: Tensor, energy_gradient: Tensor, beta: float, N: Depth) -> Tensor:
    """∇F_β(W) = ∇E(W) − ∇S_N(W)/β (Euclidean, on the product)."""
    return energy_gradient - entropy_gradient(W, N) / beta


def free_energy_velocity(W: Tensor, energy_gradient: Tensor, beta: float, N: Depth) -> Tensor:
    """−A_N(∇F_β(W)) with one SVD: in W's frame U^T A_N(Z) V = f_N(s_i, s_j) ∘ U^T Z V and
    U^T ∇S_N V = diag(∂S_N/∂s), so −A_N(∇F_β) = −U (f_N(s_i, s_j) ∘ (U^T ∇E V − diag(∂S_N/∂s)/β)) V^T.
    N = inf: −A_∞(∇E − ∇S̃_∞/β), the velocity in τ = N t."""
    U, s, Vh = torch.linalg.svd(W)
    weights = pair_function(N)(s[..., :, None], s[..., None, :])
    inner = U.mT @ energy_gradient @ Vh.mT - torch.diag_embed(entropy_singular_gradient(s, N)) / beta
    return -U @ (weights * inner) @ Vh


def integrate_free_energy(W0: Tensor, energy_gradient: Callable[[Tensor], Tensor], beta: float, times,
                          N: Depth, time_scale: str = "raw", method: str = "dopri5", rtol: float = 1e-10,
                          atol: float = 1e-12, step_size: float | None = None,
                          first_step: float | None = None, frozen: Tensor | None = None) -> tuple[Tensor, int]:
    """The free-energy flow from W0 at times[0]: (trajectory (T, B, d, d), ∇E evaluations).
    time_scale 'raw' (t) or 'per_depth' (τ = N t, required at N = inf); other arguments as in
    dynamics.flows.integrate_downstairs; `frozen` (B,) replicas get zero velocity."""
    scale = clock_scale(N, time_scale)
    W0 = W0.detach()
    keep = 1.0 if frozen is None else (~frozen).to(W0.dtype).view(-1, 1, 1)
    rhs = _Counted(lambda W: keep * scale * free_energy_velocity(W, energy_gradient(W), beta, N))
    with torch.no_grad():
        path = _solve(rhs, W0, _time_grid(times, W0), method, rtol, atol, step_size, first_step)
    return path, rhs.calls


class FreeEnergyFlow(DownstairsFlow):
    """optim=free_energy: dW/dt = −A_N(∇E − ∇S_N/β) on the product, N = optim.depth (an int or
    inf; default the model's depth); at N = inf in τ = N t (optim.time_scale as for downstairs)."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        super().__init__(cfg, net, task)
        self._beta = float(cfg.optim.beta)

    @property
    def beta(self) -> float:
        return self._beta

    def velocity(self, state):
        """Per-replica step control: the rows the solver carries without moving them (frozen at
        W = 0, where S_N = −∞) are evaluated at I and get zero velocity."""
        W = state[0]
        idle = (~torch.isfinite(W).flatten(1).all(1) | (W.flatten(1).abs().sum(1) == 0)).view(-1, 1, 1)
        safe = torch.where(idle, torch.eye(W.shape[-1], dtype=W.dtype, device=W.device), W)
        v = free_energy_velocity(safe, self.task.gradient(safe), self._beta, self.N)
        return [torch.where(idle, 0.0, clock_scale(self.N, self.time_scale) * v)]

    def integrate(self, state, times, options):
        # frozen (diverged) replicas sit at W = 0, where S_N is −∞: they are integrated from W = I
        # with zero velocity (so they cannot spoil the error norm) and reported as 0 (NaN upstream)
        dead = self.dead.view(-1, 1, 1)
        eye = torch.eye(state[0].shape[-1], dtype=state[0].dtype, device=state[0].device)
        path, calls = integrate_free_energy(torch.where(dead, eye, state[0]), self.gradient, self._beta, times,
                                            self.N, time_scale=self.time_scale, frozen=self.dead, **options)
        self.gradient_evaluations += calls
        return [(torch.where(dead, 0.0, W),) for W in path[1:]]


@dataclass
class FreeEnergyConfig:
    """optim=free_energy. lr only sets the time grid t = lr·step shared with the other dynamics."""
    name: str = "free_energy"
    lr: float = 0.05
    beta: float = 10.0                  # inverse temperature of F_β = E − S_N/β
    method: str = "dopri5"
    rtol: float = 1e-10
    atol: float = 1e-12
    step_control: Optional[str] = None  # dopri5: per_replica (default) | shared, as for downstairs
    depth: Optional[str] = None         # N as an int or "inf"; None = model depth
    time_scale: str = "auto"            # raw (t) | per_depth (τ = N t) | auto (per_depth at N = inf)


def _check_free_energy(cfg: Any) -> None:
    _check_solver(cfg)
    optim = cfg.optim
    positive_finite("optim.beta", optim.beta)
    one_of("optim.time_scale", optim.time_scale, ("auto", "raw", "per_depth"))
    N = resolve_depth(cfg.model) if optim.depth is None else parse_depth(optim.depth)
    if N == math.inf and optim.time_scale == "raw":
        fail("optim.time_scale", optim.time_scale,
             "optim.depth=inf needs per_depth (rescaled time τ = N t; A_N grows like N)")
    m, n = task_shape(cfg.task)
    if m != n:
        fail("optim.name", optim.name, f"the entropy S_N is defined for square W, and the task's W is {m}x{n}")


OPTIMISERS.register("free_energy", schema=FreeEnergyConfig, check=_check_free_energy,
                    dynamics=FreeEnergyFlow)(_not_an_optimizer)
