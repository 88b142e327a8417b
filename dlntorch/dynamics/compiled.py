"""`run.compile`: the fast path's step through torch.compile, where it pays.

What is compiled is one step's deterministic part — the closed-form factor gradients on the
working layout and the rule's drift (dlntorch.optim: `sgd_drift`, `langevin_drift`), out of
place — as one fused program. What draws from the dynamics' generator (minibatch weights, label
noise, the Langevin noise term) stays eager and in the eager path's order, so a compiled run
draws the same numbers as an eager one and its checkpoint is the same kind of object.

`auto` compiles when the run's expected eager stepping time, from a fixed cost model of steps,
replicas and widths (never timed, so a run and its resumption decide alike), saves more than
MARGIN times the compile's cost. A compile failure (no C++ toolchain, an op the compiler does not
take) leaves the eager path with one warning: the step is redone eagerly from the same state and
the same draws.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..network import factor_gradients

log = logging.getLogger(__name__)

# The cost model of `auto`, measured on the 2-core CPU of docs/performance.md (float64, one
# thread; seed 2x2 at depth 3): an eager step costs STEP_SECONDS of launches (B = 1: 17 µs) plus
# MULTIPLY_ADD_SECONDS per multiply-add of its matmuls (planes, B = 4096: 318 µs); the compiled
# planes step is SPEEDUP times faster; compiling costs COMPILE_SECONDS (a cold cache; a warm
# one, a few seconds). The batch layout gains nothing worth a compile (inductor keeps bmm as
# an external kernel: 338 vs 354 µs at B = 4096), so `auto` compiles only the planes layout.
STEP_SECONDS = 20e-6
MULTIPLY_ADD_SECONDS = 1.5e-9
SPEEDUP = 2.0
COMPILE_SECONDS = 30.0
MARGIN = 4.0             # compile only when the time it saves is ≥ this many compiles


def multiply_adds(widths: Sequence[int]) -> int:
    """Multiply-adds of one replica's closed-form step: the prefix products W_p ⋯ W_1, and from
    the output side down the factor gradients and back-propagated ∇E (3(N − 1) matmuls)."""
    d0, shapes = widths[0], list(zip(widths[1:], widths[:-1]))
    prefix = sum(r * c * d0 for r, c in shapes[1:])
    return 3 * prefix


def eager_seconds(steps: int, replicas: int, widths: Sequence[int]) -> float:
    """The cost model's eager stepping time of a run."""
    return steps * (STEP_SECONDS + replicas * multiply_adds(widths) * MULTIPLY_ADD_SECONDS)


def decide(setting: str, steps: int, replicas: int, widths: Sequence[int], layout: str = "planes") -> bool:
    """run.compile: on, off, or auto — on for the planes layout when the saving (1 − 1/SPEEDUP)
    of the modelled eager stepping time is at least MARGIN × COMPILE_SECONDS (so nothing under
    4 minutes of modelled stepping compiles, let alone a 1-second run)."""
    if setting != "auto":
        return setting == "on"
    if layout != "planes":
        return False
    saved = eager_seconds(steps, replicas, widths) * (1 - 1 / SPEEDUP)
    return saved >= MARGIN * COMPILE_SECONDS


def drift_step(gradient: Callable[[Tensor, Tensor | None, Tensor | None], Tensor], mm: Callable,
               T: Callable, drift: Callable) -> Callable:
    """The function compiled: (state, weights, label noise, lr, weight decay) -> None, the state
    moved by one drift in place, given the task's ∇E on the layout (`gradient(W, weights, noise)`),
    the layout's matmul and transpose (out of place) and the rule's drift. The new values are
    computed out of place and copied in at the end: the compiler then fuses the whole step into
    one loop over the replicas (with the state's update done in place by `torch._foreach_add_`,
    torch 2.13 compiled a wrong step)."""
    def step(state: list[Tensor], weights: Tensor | None, noise: Tensor | None, lr: Tensor,
             weight_decay: float) -> None:
        grads = factor_gradients(state, lambda W: gradient(W, weights, noise), mm, T)
        for factor, moved in zip(state, drift(state, grads, lr, weight_decay)):
            factor.copy_(moved)
    return step


class CompiledStep:
    """torch.compile of `step` (a `drift_step`), with the eager fallback: `__call__` moves the
    state and returns True, or False once compiling has failed (the warning said so; run the
    eager step). `seconds`: the first call's wall time, the compile's cost."""

    def __init__(self, step: Callable):
        self.step, self.seconds, self.failed = step, None, False
        self.lr: Tensor | None = None    # the compiled program's lr input, refilled only when lr moves
        self.lr_value: float | None = None
        try:
            self.compiled = torch.compile(step, fullgraph=True, dynamic=False)
        except Exception as error:  # noqa: BLE001 — any failure: the eager path
            self.fail(error)

    def lr_tensor(self, lr: float, like: Tensor) -> Tensor:
        """lr as a 0-dim tensor, an input of the compiled program: a float is compiled in as a
        constant, so a schedule moving it every step recompiled every step until dynamo's
        recompile limit failed the run. One tensor, refilled when lr moves (a new one each step
        cost ~5 µs of a ~130 µs compiled step)."""
        if self.lr is None or self.lr.dtype != like.dtype or self.lr.device != like.device:
            self.lr = torch.tensor(lr, dtype=like.dtype, device=like.device)
        elif lr != self.lr_value:
            self.lr.fill_(lr)
        self.lr_value = lr
        return self.lr

    def fail(self, error: BaseException) -> None:
        warnings.warn(f"run.compile: torch.compile failed ({type(error).__name__}: {_first_line(error)}); "
                      "running eagerly", RuntimeWarning, stacklevel=3)
        self.failed, self.compiled = True, None

    def __call__(self, state: list[Tensor], weights: Tensor | None, noise: Tensor | None, lr: float,
                 weight_decay: float) -> bool:
        if self.failed:
            return False
        args = (weights, noise, self.lr_tensor(lr, state[0]), weight_decay)
        if self.seconds is not None:
            self.compiled(state, *args)
            return True
        started, before = time.perf_counter(), [s.clone() for s in state]
        try:                   # the first call compiles; a failure leaves the state as it was
            self.compiled(state, *args)
        except Exception as error:  # noqa: BLE001
            for s, saved in zip(state, before):
                s.copy_(saved)
            self.fail(error)
            return False
        self.seconds = time.perf_counter() - started
        log.info("run.compile: the step compiled in %.1f s", self.seconds)
        return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""

