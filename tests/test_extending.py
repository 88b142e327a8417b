"""Adding a task and an optimiser touches only their own module, their yaml and their test.

This file is that module, yaml and test at once: it registers a toy task and a toy optimiser
(and the ConfigStore nodes that stand for their yaml files) from here, and they run through
Hydra's compose and `run(cfg)` with nothing else in dlntorch changed: the allowed names, the
schema, the value checks and the builders all come from the registries."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from torch import Tensor
from torch.optim import Optimizer

from dlntorch import config
from dlntorch.errors import ConfigError, fail, non_negative_finite
from dlntorch.network import chain
from dlntorch.optim import OPTIMISERS
from dlntorch.tasks import TASKS, Task, task_shape
from dlntorch.train import Lab, run

# ---------------------------------------------------------------- the task's module

class Target(Task):
    """E(W) = ½ ‖W − Y‖² over every entry, Y = the all-ones matrix: residual W − Y, adjoint r."""

    name = "toy_target"

    def __init__(self, target: Tensor, loss: str):
        super().__init__(tuple(target.shape), loss, target.numel(), target)
        self.target = target

    def residual(self, W: Tensor) -> Tensor:
        return W - self.target

    def adjoint(self, r: Tensor) -> Tensor:
        return r

    @property
    def units(self) -> int:
        return self.residuals

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        return chosen.view(-1, *self.shape)


def _check_target(cfg) -> None:
    if task_shape(cfg.task)[0] > 4:
        fail("task.size", cfg.task.size, "the toy target is at most 4x4")


def _target(cfg, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    return Target(torch.ones(m, n, dtype=torch.float64), cfg.loss)


# ---------------------------------------------------------------- the optimiser's module

@dataclass
class SignDescentConfig:
    name: str = "toy_sign"
    lr: float = 0.01
    shrink: float = 0.0        # its own key: W ← W − lr (sign(g) + shrink·W)


class SignDescent(Optimizer):
    def __init__(self, params, lr: float, shrink: float):
        super().__init__(params, dict(lr=lr, shrink=shrink))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad) + group["shrink"] * p, alpha=-group["lr"])


def _check_sign(cfg) -> None:
    non_negative_finite("optim.shrink", cfg.optim.shrink)


def _sign_descent(cfg, params, generator) -> Optimizer:
    return SignDescent(params, lr=cfg.lr, shrink=cfg.shrink)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """What the two modules do at import (register), and what their yaml files hold."""
    TASKS.register("toy_target", check=_check_target)(_target)
    OPTIMISERS.register("toy_sign", schema=SignDescentConfig, check=_check_sign)(_sign_descent)
    store = ConfigStore.instance()
    store.store(group="task", name="toy_target", node={"name": "toy_target", "size": 3, "loss": "half_sum"})
    store.store(group="optim", name="toy_sign",
                node={"defaults": ["toy_sign_schema", "_self_"], "name": "toy_sign", "lr": 0.01, "shrink": 0.0})
    config.register()          # as at start-up, after every option module has been imported
    yield
    TASKS.unregister("toy_target")
    OPTIMISERS.unregister("toy_sign")


COMMON = ("task=toy_target", "optim=toy_sign", "replicas=4", "init.scale=0.5", "run.log_points=10")


def test_the_toy_task_and_optimiser_run_through_compose_and_run(make_cfg, tmp_path):
    summary = run(make_cfg(*COMMON, "run.steps=200", "run.stop_energy=0"))
    assert summary["status"] == "completed" and summary["steps"] == 200
    assert summary["config"]["optim"] == {"name": "toy_sign", "lr": 0.01, "shrink": 0.0}
    with np.load(tmp_path / "run" / "trajectory.npz") as trajectory:
        energy = trajectory["energy"]
    # sign descent from a small start towards the all-ones 3x3 matrix: E = ½·9 at W = 0
    assert energy[0].min() > 3 and energy[-1].max() < 0.1 * energy[0].min()


def test_one_step_of_the_toy_optimiser_is_its_rule(make_cfg):
    """W ← W − lr (sign(∂L/∂W) + shrink·W), against the rule computed here with autograd."""
    lab = Lab(make_cfg(*COMMON, "optim.shrink=0.5"))
    start = [f.clone().requires_grad_(True) for f in lab.dynamics.factors()]
    lab.task.energy(chain(start)).sum().backward()
    lab.dynamics.advance(1)
    for got, w in zip(lab.dynamics.factors(), start):
        expected = w.detach() - 0.01 * (torch.sign(w.grad) + 0.5 * w.detach())
        # the same two roundings in another order: a few ulps of O(1) entries
        assert (got - expected).abs().max() < 1e-15


def test_the_toy_task_gradient_is_the_energy_derivative(make_cfg):
    lab = Lab(make_cfg(*COMMON))
    W = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    lab.task.energy(W).sum().backward()
    assert torch.allclose(lab.task.gradient(W.detach()), W.grad, rtol=0, atol=1e-14)   # exact: W − Y


def test_the_registries_give_the_toys_their_checks_and_their_keys(make_cfg):
    with pytest.raises(ConfigError, match=r"^optim.shrink=-1 is not allowed: it must be a finite number ≥ 0\.$"):
        run(make_cfg(*COMMON, "optim.shrink=-1"))
    with pytest.raises(ConfigError, match=r"^task.size=9 is not allowed: the toy target is at most 4x4\.$"):
        run(make_cfg(*COMMON, "task.size=9"))
    with pytest.raises(ConfigCompositionException):     # Langevin's key is not the toy's
        make_cfg(*COMMON, "optim.beta=5")
    with pytest.raises(ConfigError, match=r"^optim.name='toy_missing' is not allowed: choose one of .*toy_sign"):
        config.as_config({"optim": {"name": "toy_missing"}})


def test_a_plain_dict_picks_the_toy_schema_by_its_name(tmp_path):
    cfg = {"task": {"name": "toy_target", "size": 2}, "optim": {"name": "toy_sign", "lr": 0.02, "shrink": 0.1},
           "replicas": 2, "run": {"steps": 20, "progress": False, "out_dir": str(tmp_path / "dict")}}
    summary = run(cfg)
    assert summary["config"]["optim"] == {"name": "toy_sign", "lr": 0.02, "shrink": 0.1}
    assert math.isfinite(summary["aggregates"]["energy"]["max"])
    with pytest.raises(Exception, match="beta"):       # OmegaConf names the key that is not the toy's
        run({**cfg, "optim": {"name": "toy_sign", "beta": 5}})
