"""optim=rle: the Riemannian Langevin equation of the free energy on the product (problems 3 and 5),

    dW = −grad_{g^N} F_β(W) dt + sqrt(2/β) dB^{g^N}   (Itô),   F_β = E − S_N/β,

for square full-rank W at depth N = optim.depth (an int, or inf in τ = N t), one step of size lr
per step (t = lr·step, like every step-based dynamics), batched over replicas. The SDE written
out in SVD coordinates, the scheme and its rules at the singular set and at repeated singular
values: dlntorch.rle. Its stationary law is ∝ e^{−βF_β} dvol_{g^N}; at N = inf that measure is
not normalisable (it behaves like ds_min/s_min at the singular set), so there is no stationary
law to reach, though the SDE is well defined and never reaches s = 0 in finite time.

A replica whose step proposes σ_min(W) < optim.singular_threshold (or crosses det W = 0, where
it is reflected) counts a singular hit: `singular_hits` per replica, in the trajectory, the
summary and TensorBoard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, fail, non_negative_finite, one_of, parse_depth, positive_finite
from ..geometry import Depth, is_infinite_depth
from ..network import DeepLinearNetwork
from ..optim import OPTIMISERS
from ..rle import Clock, frame, repeated_singular_values, rle_step
from ..tasks import Task, task_shape
from .base import Dynamics
from .flows import _not_an_optimizer, clock_scale


class RiemannianLangevin(Dynamics):
    """optim=rle: the state is the product W (B, d, d); a diverged (non-finite) replica is
    evaluated at I, keeps its non-finite state and is frozen by the loop."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task, seed: int):
        super().__init__(cfg.optim.lr)
        optim = cfg.optim
        self.task = task
        self.N: Depth = net.depth if optim.depth is None else parse_depth(optim.depth)
        self.time_scale = optim.time_scale if optim.time_scale != "auto" else \
            ("per_depth" if is_infinite_depth(self.N) else "raw")
        self.clock = Clock(self.N, clock_scale(self.N, self.time_scale))
        self._beta, self.threshold = float(optim.beta), float(optim.singular_threshold)
        self.W = net.product().detach().clone()
        self.generator = torch.Generator(device=self.W.device).manual_seed(seed)
        self.hits = torch.zeros(net.replicas, dtype=torch.int64, device=self.W.device)
        self.step = 0
        check_start(self.W)

    @property
    def depth(self) -> Depth:
        return self.N

    @property
    def beta(self) -> float:
        return self._beta

    @property
    def stochastic(self) -> bool:
        """A stochastic dynamics (its runs get the stochastic observables and bands where the loop
        asks Dynamics.stochastic)."""
        return True

    def advance(self, steps: int) -> None:
        eye = torch.eye(self.W.shape[-1], dtype=self.W.dtype, device=self.W.device)
        with torch.no_grad():
            for _ in range(steps):
                dead = ~torch.isfinite(self.W).flatten(1).all(1).view(-1, 1, 1)
                W = torch.where(dead, eye, self.W)
                xi = torch.randn(W.shape, generator=self.generator, dtype=W.dtype, device=W.device)
                moved, hit = rle_step(W, self.task.gradient(W), self._beta, self.lr, self.clock, xi, self.threshold)
                self.W = torch.where(dead, self.W, moved)
                self.hits += (hit & ~dead.view(-1)).to(self.hits.dtype)
        self.step += steps
        self.gradient_evaluations += steps

    def factors(self) -> list[Tensor]:
        return [self.W]

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(self.W)

    def observables(self) -> dict[str, Tensor]:
        return {"singular_hits": self.hits.to(self.W.dtype)}

    def counters(self) -> dict[str, int]:
        return {"singular_hits": int(self.hits.sum())}

    def freeze(self, diverged: Tensor) -> None:
        self.W = torch.where(diverged.view(-1, 1, 1), torch.nan, self.W)

    def state_dict(self) -> dict[str, Any]:
        return {"W": self.W.cpu(), "hits": self.hits.cpu(), "step": self.step,
                "generator": self.generator.get_state(), "gradient_evaluations": self.gradient_evaluations}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        device = self.W.device
        self.W, self.hits = saved["W"].to(device), saved["hits"].to(device)
        self.step, self.gradient_evaluations = saved["step"], saved["gradient_evaluations"]
        self.generator.set_state(saved["generator"])


def check_start(W: Tensor) -> None:
    """Refuse (one sentence) a start the scheme cannot leave: rank-deficient, or with repeated
    singular values (where its SVD coordinates are singular)."""
    _, s, _ = frame(W)
    low = s[:, -1] <= 1e-12 * s[:, 0].clamp_min(1.0)
    if bool(low.any()):
        raise ConfigError(f"optim=rle is not allowed from this start: {int(low.sum())} replica(s) have a "
                          "rank-deficient product (σ_min ≤ 1e-12 max(σ_max, 1)), where g^N degenerates; start "
                          "from full rank (e.g. a larger init.scale).")
    repeated = repeated_singular_values(s)
    if bool(repeated.any()):
        raise ConfigError(f"optim=rle is not allowed from this start: {int(repeated.sum())} replica(s) have repeated "
                          "singular values (e.g. init=identity), where the SVD coordinates of its scheme are "
                          "singular; start from a generic product (e.g. init=gaussian).")


@dataclass
class RLEConfig:
    """optim=rle. lr is the step h (in t, or in τ = N t with time_scale per_depth)."""
    name: str = "rle"
    lr: float = 0.001
    beta: float = 10.0                  # inverse temperature of F_β = E − S_N/β
    depth: Optional[str] = None         # N as an int or "inf"; None = model depth
    time_scale: str = "auto"            # raw (t) | per_depth (τ = N t) | auto (per_depth at N = inf)
    singular_threshold: float = 1e-6    # σ_min(W) below this counts a singular hit


def _check_rle(cfg: Any) -> None:
    optim = cfg.optim
    positive_finite("optim.lr", optim.lr)
    positive_finite("optim.beta", optim.beta)
    non_negative_finite("optim.singular_threshold", optim.singular_threshold)
    one_of("optim.time_scale", optim.time_scale, ("auto", "raw", "per_depth"))
    if optim.depth is not None and parse_depth(optim.depth) == math.inf and optim.time_scale == "raw":
        fail("optim.time_scale", optim.time_scale,
             "optim.depth=inf needs per_depth (rescaled time τ = N t; A_N grows like N)")
    m, n = task_shape(cfg.task)
    if m != n:
        fail("optim.name", optim.name, f"the RLE of F_β is defined for square W (S_N and its SVD coordinates), "
             f"and the task's W is {m}x{n}")


OPTIMISERS.register("rle", schema=RLEConfig, check=_check_rle, dynamics=RiemannianLangevin,
                    seeded=True)(_not_an_optimizer)
