"""Dynamics: what moves the state between two pauses of the run loop.

base.py     the interface the loop drives (`Dynamics`)
step.py     step-based dynamics: a registered update rule per step, the closed-form fast path
layouts.py  the fast path's layouts (batch, replica-last planes) and their buffers
graphs.py   CUDA-graph replay of the fast path
flows.py    the exact flows (optim=flow | downstairs), registered as optimisers
free_energy.py  the free-energy flow of F_β = E − S_N/β (optim=free_energy)
rle.py      the Riemannian Langevin equation of F_β on the product (optim=rle)
"""
from __future__ import annotations

from typing import Any

from ..network import DeepLinearNetwork
from ..optim import OPTIMISERS
from ..tasks import Task
from . import (
    flows,  # noqa: F401 — registers optim=flow and optim=downstairs
    free_energy,  # noqa: F401 — registers optim=free_energy
    rle,  # noqa: F401 — registers optim=rle
)
from .base import Dynamics
from .step import StepDynamics

__all__ = ["Dynamics", "StepDynamics", "build_dynamics"]


def build_dynamics(cfg: Any, net: DeepLinearNetwork, task: Task, seed: int) -> Dynamics:
    """The dynamics of `cfg.optim.name`: a registered flow's own (with the seed where it draws noise),
    else one update rule per step."""
    extra = OPTIMISERS[cfg.optim.name].extra
    make = extra.get("dynamics")
    if make is None:
        return StepDynamics(cfg, net, task, seed)
    return make(cfg, net, task, seed) if extra.get("seeded") else make(cfg, net, task)
