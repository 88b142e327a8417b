"""Dynamics: what moves the state between two pauses of the run loop.

`StepDynamics` wraps an Optimizer (gd, sgd, momentum, adam, langevin): t = lr × step.
The exact flows (optim=flow | downstairs) live in flows.py and plug in through the same
interface, so the loop, the logging and the stop rules are one code path for all dynamics.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .network import DeepLinearNetwork, chain, factor_gradients
from .optim import build_optimizer
from .tasks import Task


class Dynamics:
    """The interface the run loop drives."""

    step_based = True            # pauses for stop checks between logged steps
    gradient_evaluations = 0

    def __init__(self, lr: float):
        self.lr = lr

    def advance(self, steps: int) -> None:
        raise NotImplementedError

    def time(self, step: int) -> float:
        return self.lr * step

    def factors(self) -> list[Tensor]:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.factors())

    def energy(self) -> Tensor:
        raise NotImplementedError

    def observables(self) -> dict[str, Tensor]:
        """Observables particular to these dynamics (merged into metrics.observe's)."""
        return {}

    def freeze(self, diverged: Tensor) -> None:
        """Stop moving the replicas flagged in `diverged` (B,)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class StepDynamics(Dynamics):
    """One optimizer step per step; gradients in closed form (2N batched matmuls from ∇E) or by
    autograd (`run.gradient`). A diverged replica holds non-finite values, which every update
    rule here keeps non-finite and which never mix across replicas (all ops are per replica),
    so freezing it costs nothing per step: it is only excluded from aggregates and stop tests."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task, seed: int):
        super().__init__(cfg.optim.lr)
        self.net, self.task = net, task
        self.params = list(net.factors)
        self.generator = torch.Generator(device=net.factors[0].device).manual_seed(seed)
        self.optimizer = build_optimizer(cfg.optim, self.params, self.generator)
        self.closed_form = cfg.run.gradient != "autograd"
        self.batch_size = cfg.optim.batch_size if cfg.optim.name == "sgd" else None

    def advance(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def step(self) -> None:
        weights = None if self.batch_size is None else \
            self.task.minibatch(self.net.replicas, self.batch_size, self.generator)
        if self.closed_form:
            with torch.no_grad():
                grad_product = self.task.gradient(chain(self.params), weights)
                for param, grad in zip(self.params, factor_gradients(self.params, grad_product)):
                    param.grad = grad
        else:
            self.optimizer.zero_grad(set_to_none=True)
            # the sum hands each replica exactly its own gradient: replicas do not interact
            self.task.energy(self.net.product(), weights).sum().backward()
        self.optimizer.step()
        self.gradient_evaluations += 1

    def factors(self) -> list[Tensor]:
        return [p.detach() for p in self.params]

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(chain(self.factors()))

    def state_dict(self) -> dict[str, Any]:
        return {"factors": [p.detach().cpu() for p in self.params],
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "gradient_evaluations": self.gradient_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.set_factors([f.to(self.params[0].device) for f in state["factors"]])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.gradient_evaluations = state["gradient_evaluations"]


def build_dynamics(cfg: Any, net: DeepLinearNetwork, task: Task, seed: int) -> Dynamics:
    if cfg.optim.name in ("flow", "downstairs"):
        from .flows import build_flow_dynamics   # torchdiffeq is imported only when used
        return build_flow_dynamics(cfg, net, task)
    return StepDynamics(cfg, net, task, seed)
