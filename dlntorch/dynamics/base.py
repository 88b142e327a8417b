"""The interface the run loop drives: what moves the state between two pauses of the loop.

Step-based dynamics (dynamics/step.py: an update rule, t = lr × step) and the exact flows
(dynamics/flows.py) implement it, so the loop, the logging and the stop rules are one code path
for all dynamics.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor


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

    @property
    def beta(self) -> float | None:
        """The inverse temperature β of stochastic dynamics (its stationary law ∝ e^{−βL}), or
        None for deterministic ones: the free energy F_β = E − S_N/β is observed where it is set."""
        return None

    @property
    def stochastic(self) -> bool:
        """Whether the dynamics is stochastic (its runs log the product's drift and 95 % bands
        over replicas, dlntorch.metrics.stochastic_observables); a deterministic flow may still
        have a β (the free-energy flow)."""
        return False

    def energy(self) -> Tensor:
        raise NotImplementedError

    def observables(self) -> dict[str, Tensor]:
        """Observables particular to these dynamics (merged into metrics.observe's)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Counts particular to these dynamics, for the summary (besides gradient_evaluations)."""
        return {}

    def plan(self, pauses) -> None:
        """The steps at which the loop will pause (a flow integrates ahead through them)."""

    def task_changed(self) -> None:
        """The task's data changed in place (a task.schedule switch): drop whatever was built
        from the old data. The loop plans no pause past a switch, so flows hold nothing ahead."""

    def freeze(self, diverged: Tensor) -> None:
        """Stop moving the replicas flagged in `diverged` (B,)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
