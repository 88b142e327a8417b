"""The run's length: how many steps run.steps and run.time ask for, with or without a
learning-rate schedule. Its own room, light (no torch unless a schedule is asked about), so that
the config, the reports, collect and the step-based dynamics read one rule without importing
each other."""
from __future__ import annotations

import math
from typing import Any

DEFAULT_STEPS = 20000    # the step budget when neither run.steps nor run.time is given


def budget(cfg: Any) -> tuple[int, str]:
    """(steps, "steps" | "time"): the step budget and the key that sets it. run.time alone needs
    the steps after which t = Σ_k lr_k reaches it: ceil(time / lr) at constant lr, else as the
    learning-rate schedule says (optim.steps_to_reach); with run.steps too, whichever comes
    first; neither: DEFAULT_STEPS."""
    steps, time = cfg.run.steps, cfg.run.time
    if time is None:
        return int(DEFAULT_STEPS if steps is None else steps), "steps"
    schedule = cfg.optim.get("schedule", "constant")
    if schedule == "constant":
        # the 1e-9 keeps t = lr·step from missing `time` by one step to rounding (1e-3 · 105000)
        for_time = max(1, math.ceil(time / cfg.optim.lr - 1e-9))
    else:
        from .optim import steps_to_reach  # torch: only for a schedule
        for_time = steps_to_reach(cfg.optim, time)
        if for_time is None:          # never reached: run.steps ends the run (validate refused the rest)
            return int(steps), "steps"
    if steps is not None and steps < for_time:
        return int(steps), "steps"
    return int(for_time), "time"


def total_steps(cfg: Any) -> int:
    """The step budget (see `budget`)."""
    return budget(cfg)[0]
