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

Gradient descent without draws (gd, or sgd on the full batch, at a constant lr, planes layout)
runs a second program where the shapes allow: `STEPS_PER_CALL` steps per call, written on the
state's scalar entries (each a row of B replicas) with ∇E as the affine map it is
(`AffineGradient`), so that inductor makes the K steps one loop over the replicas holding each
replica's whole state in registers. A compiled call costs ~30 µs of its own whatever B (dynamo's
guards, the wrapper), and the planes program is a loop per output plane, each re-reading and
recomputing what it needs: measured at B = 4096 (seed 2x2, depth 3, docs/performance.md), the
planes program is 1.7x the eager step and the 8-step entries program ~7x.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..network import factor_gradients

Entries = list[list[Tensor]]     # a matrix as rows of scalar entries, each a (B,) tensor

log = logging.getLogger(__name__)

# The cost model of `auto`, measured on the 2-core CPU of docs/performance.md (float64, one
# thread; seed 2x2 at depth 3): an eager step costs STEP_SECONDS of launches (B = 1: 17 µs) plus
# MULTIPLY_ADD_SECONDS per multiply-add of its matmuls (planes, B = 4096: 318 µs); the compiled
# planes step is SPEEDUP times faster (the planes program's ~1.7x: the entries program's ~7x is
# not counted on, as it applies to fewer runs); compiling costs COMPILE_SECONDS (a cold cache;
# a warm one, a few seconds). The batch layout gains nothing worth a compile (inductor keeps bmm as
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


STEPS_PER_CALL = 8       # steps of one entries program (more: longer compiles, little gained)
OPS_PER_CALL = 2000      # its unrolled scalar ops at most: beyond, the planes program (compile time)


class AffineGradient:
    """∇E as the affine map it is of the product's entries, ∇E(W)_q = Σ_k H_qk W_k + g_q (every
    task's E = c Σ (𝒜(W) − y)² is quadratic): probed from the task's own gradient at 0 and at
    the unit matrices, kept sparse (exact zeros dropped), and checked against the task's gradient
    at the run's own products before it is trusted (`probe`)."""

    def __init__(self, slope: list[list[tuple[int, float]]], offset: list[float], shape: tuple[int, int]):
        self.slope, self.offset, self.shape = slope, offset, shape

    @property
    def terms(self) -> int:
        return sum(len(row) for row in self.slope)

    def __call__(self, W: Entries) -> Entries:
        m, n = self.shape
        w = [x for row in W for x in row]
        out = [_affine(self.slope[q], self.offset[q], w) for q in range(m * n)]
        return [out[i * n:(i + 1) * n] for i in range(m)]

    @classmethod
    def probe(cls, gradient: Callable[[Tensor], Tensor], products: Tensor) -> AffineGradient | None:
        """The affine map of `gradient` ((B, m, n) -> (B, m, n)), or None where it is not one
        to rounding at `products` (a task whose gradient depends on the replica, say)."""
        m, n = products.shape[1:]
        products = products[torch.isfinite(products).flatten(1).all(1)]   # a diverged replica checks nothing
        units = torch.zeros(1 + m * n, m * n, dtype=products.dtype, device=products.device)
        units[1:] = torch.eye(m * n, dtype=products.dtype, device=products.device)
        try:
            at = gradient(units.view(-1, m, n)).reshape(1 + m * n, m * n)
            slope = (at[1:] - at[0]).T                 # H_qk = ∇E(e_k)_q − ∇E(0)_q
            model = products.reshape(-1, m * n) @ slope.T + at[0]
            want = gradient(products).reshape(-1, m * n)
        except RuntimeError:                           # shapes that do not broadcast: not one map
            return None
        # the model's rounding: a few ulps of the largest term in a sum
        size = products.abs().max().item() if products.numel() else 0.0
        scale = slope.abs().max().item() * size + at[0].abs().max().item()
        if not torch.allclose(model, want, rtol=0.0, atol=1e-12 * max(scale, 1e-300)):
            return None
        rows = [[(k, float(h)) for k, h in enumerate(row.tolist()) if h != 0.0] for row in slope]
        return cls(rows, at[0].tolist(), (m, n))


def _affine(terms: list[tuple[int, float]], offset: float, w: list[Tensor]) -> Tensor:
    """Σ_k h_k w_k + offset, leaving out what is exactly zero (a fused loop then has no such op)."""
    total = None
    for k, h in terms:
        total = h * w[k] if total is None else total + h * w[k]
    if total is None:
        return torch.full_like(w[0], offset)
    return total + offset if offset != 0.0 else total


def entries_of(rows: Sequence[Tensor], shapes: Sequence[tuple[int, int]]) -> list[Entries]:
    """The factors as matrices of entries, from the state's rows (factor by factor, row-major)."""
    out, at = [], 0
    for r, c in shapes:
        out.append([list(rows[at + i * c:at + (i + 1) * c]) for i in range(r)])
        at += r * c
    return out


def entries_mm(a: Entries, b: Entries, out: None = None) -> Entries:
    """C = A B on entries, C_ij = Σ_k A_ik B_kj in the order of tiny.planes_mm."""
    C = []
    for row in a:
        C.append([])
        for j in range(len(b[0])):
            total = row[0] * b[0][j]
            for k in range(1, len(b)):
                total = total + row[k] * b[k][j]
            C[-1].append(total)
    return C


def entries_T(x: Entries) -> Entries:
    return [list(column) for column in zip(*x)]


def entry_steps(shapes: Sequence[tuple[int, int]], gradient: AffineGradient, drift: Callable,
                weight_decay: float, steps: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The function compiled: (state's rows (P, B), lrs (steps,)) -> the rows after `steps`
    drifts, out of place (the caller copies them in)."""
    def program(state: Tensor, lrs: Tensor) -> Tensor:
        rows = list(state.unbind(0))
        for k in range(steps):
            factors = entries_of(rows, shapes)
            grads = factor_gradients(factors, gradient, entries_mm, entries_T)
            rows = drift([x for W in factors for row in W for x in row],
                         [x for g in grads for row in g for x in row], lrs[k], weight_decay)
        return torch.stack(rows)
    return program


def steps_per_call(widths: Sequence[int], gradient: AffineGradient) -> int:
    """K of the entries program: STEPS_PER_CALL, fewer where its unrolled ops would pass
    OPS_PER_CALL; 0 where one step already does (the planes program then)."""
    parameters = sum(r * c for r, c in zip(widths[1:], widths[:-1]))
    per_step = multiply_adds(widths) + gradient.terms + 2 * parameters
    return min(STEPS_PER_CALL, OPS_PER_CALL // per_step)


class CompiledSteps:
    """The entries programs of K steps and of one (for what is left of a stretch), compiled on
    first use. `__call__(state, lr, steps)` moves the (P, B) rows by up to `steps` steps at lr
    and returns how many it took: all of them, or fewer once compiling failed (the warning said
    so; the rows hold the steps done). `seconds`: the first calls' wall time, the compiles'."""

    def __init__(self, make: Callable[[int], Callable], steps: int):
        self.make, self.K = make, steps
        self.programs: dict[int, Callable] = {}
        self.lrs = {k: LrInput((k,)) for k in {1, steps}}
        self.seconds: float | None = None
        self.failed = False

    def __call__(self, state: Tensor, lr: float, steps: int) -> int:
        done = 0
        while not self.failed and done < steps:
            k = self.K if steps - done >= self.K else 1
            moved = self._run(k, state, lr)
            if moved is None:
                break
            state.copy_(moved)
            done += k
        return done

    def _run(self, k: int, state: Tensor, lr: float) -> Tensor | None:
        args = (state, self.lrs[k](lr, state))
        if k in self.programs:
            return self.programs[k](*args)
        try:
            self.programs[k] = torch.compile(self.make(k), fullgraph=True, dynamic=False)
        except Exception as error:  # noqa: BLE001 — any failure: the eager path
            warn_fallback(error)
            self.failed = True
            return None
        moved, seconds = first_call(self.programs[k], args, [state], f"the {k}-step program")
        if seconds is None:
            self.failed = True
            return None
        self.seconds = (self.seconds or 0.0) + seconds
        return moved


class LrInput:
    """lr as a tensor input of a compiled program, of `shape` (() for one step, (k,) for one per
    step): a float is compiled in as a constant, so a schedule moving it every step recompiled
    every step until dynamo's recompile limit failed the run. One tensor, refilled only when lr
    moves (a new one each step cost ~5 µs of a ~130 µs compiled step)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.shape, self.tensor, self.value = shape, None, None

    def __call__(self, lr: float, like: Tensor) -> Tensor:
        if self.tensor is None or self.tensor.dtype != like.dtype or self.tensor.device != like.device:
            self.tensor = torch.full(self.shape, lr, dtype=like.dtype, device=like.device)
        elif lr != self.value:
            self.tensor.fill_(lr)
        self.value = lr
        return self.tensor


def first_call(program: Callable, args: tuple, state: Sequence[Tensor], what: str) -> tuple[Any, float | None]:
    """A compiled program's first call (it compiles then): its result and wall time, or
    (None, None) after a failure, which put `state` back as it was and warned once."""
    started, before = time.perf_counter(), [s.clone() for s in state]
    try:
        result = program(*args)
    except Exception as error:  # noqa: BLE001 — any failure: the eager path, from the state as it was
        for s, saved in zip(state, before):
            s.copy_(saved)
        warn_fallback(error)
        return None, None
    seconds = time.perf_counter() - started
    log.info("run.compile: %s compiled in %.1f s", what, seconds)
    return result, seconds


class CompiledStep:
    """torch.compile of `step` (a `drift_step`), with the eager fallback: `__call__` moves the
    state and returns True, or False once compiling has failed (the warning said so; run the
    eager step). `seconds`: the first call's wall time, the compile's cost."""

    def __init__(self, step: Callable):
        self.step, self.seconds, self.failed = step, None, False
        self.lr = LrInput()
        try:
            self.compiled = torch.compile(step, fullgraph=True, dynamic=False)
        except Exception as error:  # noqa: BLE001 — any failure: the eager path
            self.fail(error)

    def fail(self, error: BaseException | None = None) -> None:
        if error is not None:
            warn_fallback(error)
        self.failed, self.compiled = True, None

    def __call__(self, state: list[Tensor], weights: Tensor | None, noise: Tensor | None, lr: float,
                 weight_decay: float) -> bool:
        if self.failed:
            return False
        args = (state, weights, noise, self.lr(lr, state[0]), weight_decay)
        if self.seconds is not None:
            self.compiled(*args)
            return True
        _, self.seconds = first_call(self.compiled, args, state, "the step")   # a failure leaves the state as it was
        if self.seconds is None:
            self.fail()
            return False
        return True


def warn_fallback(error: BaseException) -> None:
    warnings.warn(f"run.compile: torch.compile failed ({type(error).__name__}: {_first_line(error)}); "
                  "running eagerly", RuntimeWarning, stacklevel=4)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""

