"""A batched Dormand–Prince 5(4) integrator with a step size per replica.

The state is a tuple of tensors with a leading replica axis B (the factors W_1, …, W_N of B
networks, or the product W). Every replica keeps its own time, step size and error control — its
error norm is the RMS over its own entries of err / (atol + rtol·max(|y₀|, |y₁|)) — so each one
takes the steps it would take if integrated alone, while all of them advance as one batched
program: every stage is ONE right-hand-side evaluation for all replicas still moving.

Output times are common: each replica clips its step to land exactly on its next output time (no
dense-output interpolation), records its state there and goes on towards the following one. It
does not wait for the others at every output time — a replica that is hard early and one that is
hard late would otherwise both set the pace everywhere, and the batch would pay the sum over the
intervals of the hardest replica in each — so one call costs about what its hardest replica
needs alone. Replicas that have reached the last time, and frozen ones (a caller's mask, e.g.
diverged replicas), neither move nor count; once at most half of the working batch still moves it
is compacted to the movers, so a few hard replicas run as a small batch instead of a large one.

The right-hand side must act row by row — replica b's velocity depends only on replica b's state —
and accept any number of rows (it is called on subsets); a closed-form gradient such as
`lambda W: mask * (W − Y)` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

State = tuple[Tensor, ...]
Velocity = Callable[[State], Sequence[Tensor]]

# Dormand–Prince 5(4): nodes c, stage matrix a, 5th-order weights b (= the last row of a: the
# last stage is the next step's first, FSAL) and the error weights e = b₅ − b₄.
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
ORDER = 5                      # the error estimate is O(h⁵): the controller's exponents are 1/5
NEW_STAGES = len(C) - 1        # evaluations per step after the first (FSAL)


@dataclass
class Controller:
    """The step-size rule of Hairer, Nørsett & Wanner (DOPRI5): on acceptance
    h ← h · clamp(safety · err^(−(1/5 − 0.75β)) · err_prev^β, min_factor, max_factor), on
    rejection h ← h · max(min_factor, safety · err^(−(1/5 − 0.75β))). β = 0 is the plain
    I controller; β = 0.04 (their default) is the PI controller, which damps step-size
    oscillations where stability rather than accuracy limits the step. After a rejection the
    next accepted step may not grow (it would likely be rejected again)."""

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta: float = 0.04

    def __post_init__(self):
        if not (0 < self.safety <= 1 and 0 < self.min_factor < 1 < self.max_factor and 0 <= self.beta < 0.2):
            raise ValueError(f"controller {self} must have 0 < safety ≤ 1, 0 < min_factor < 1 < max_factor "
                             f"and 0 ≤ beta < 0.2")

    def factors(self, err: Tensor, err_prev: Tensor, after_reject: Tensor) -> tuple[Tensor, Tensor]:
        """(factor if accepted, factor if rejected), per replica."""
        base = self.safety * err.clamp_min(1e-10).pow(-(1 / ORDER - 0.75 * self.beta))
        accepted = (base * err_prev.pow(self.beta)).clamp(self.min_factor, self.max_factor)
        accepted = torch.where(after_reject, accepted.clamp_max(1.0), accepted)
        rejected = base.clamp(self.min_factor, 1.0)
        return accepted, rejected


@dataclass
class Solution:
    """states[i]: (T, B, …), component i of the state at each of the T output times (the start
    included). evaluations: batched right-hand-side calls, whatever the batch's size at the call.
    Per replica (B,): accepted and rejected steps, evaluations it took part in, the step size it
    would take next (pass it back as first_step to resume without a fresh step selection), and
    failed — replicas whose step collapsed (a non-finite or unreachable error): they stop where
    they last stepped successfully and are reported, never waited for."""

    states: State
    evaluations: int
    accepted: Tensor
    rejected: Tensor
    replica_evaluations: Tensor
    step: Tensor
    failed: Tensor

    def final(self) -> State:
        return tuple(x[-1] for x in self.states)


def _rms(parts: Sequence[Tensor]) -> Tensor:
    """Per replica: the RMS over all of its entries, across the components."""
    squares = sum(p.pow(2).flatten(1).sum(1) for p in parts)
    return (squares / sum(p[0].numel() for p in parts)).sqrt()


def _axpy(y: Sequence[Tensor], h: Tensor, weights: Sequence[float], ks: Sequence[Sequence[Tensor]]) -> State:
    """y + h Σ_j weights_j k_j, with a step h per replica."""
    out = []
    for i, yi in enumerate(y):
        acc = None
        for w, k in zip(weights, ks):
            if w != 0.0:
                acc = w * k[i] if acc is None else acc.add(k[i], alpha=w)
        hv = h.view(-1, *[1] * (yi.ndim - 1)).to(yi.dtype)
        out.append(yi if acc is None else yi + hv * acc)
    return tuple(out)


def _where(mask: Tensor, a: Sequence[Tensor], b: Sequence[Tensor]) -> State:
    return tuple(torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b))


class _Replicas:
    """Per-replica solver state as a flat list of (B, …) tensors, so that a subset can be
    gathered into a working batch and written back by index in one pass."""

    FIELDS = ("t", "h", "err_prev", "after_reject", "failed", "next_output", "accepted", "rejected", "evals")

    def __init__(self, y: State, k1: State, **fields: Tensor):
        self.n = len(y)
        self.y, self.k1 = tuple(y), tuple(k1)
        for name in self.FIELDS:
            setattr(self, name, fields[name])

    def tensors(self) -> list[Tensor]:
        return [*self.y, *self.k1, *(getattr(self, f) for f in self.FIELDS)]

    @classmethod
    def of(cls, n: int, tensors: list[Tensor]) -> "_Replicas":
        return cls(tuple(tensors[:n]), tuple(tensors[n:2 * n]), **dict(zip(cls.FIELDS, tensors[2 * n:])))

    def gather(self, index: Tensor) -> "_Replicas":
        return self.of(self.n, [x.index_select(0, index) for x in self.tensors()])

    def scatter(self, index: Tensor, part: "_Replicas") -> None:
        for home, x in zip(self.tensors(), part.tensors()):
            home.index_copy_(0, index, x)


def _as_replica_tensor(value, B: int, name: str, device) -> Tensor | None:
    if value is None:
        return None
    out = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1).expand(B).clone()
    if not bool(((out > 0) & torch.isfinite(out)).all()):
        raise ValueError(f"{name} must be positive and finite for every replica")
    return out


@torch.no_grad()
def dopri5(
    velocity: Velocity,
    state: Sequence[Tensor],
    times,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    first_step: float | Tensor | None = None,
    frozen: Tensor | None = None,
    controller: Controller | None = None,
    compact: bool = True,
    max_iterations: int = 10_000_000,
) -> Solution:
    """Integrate dy/dt = velocity(y) from `state` at times[0] through every time in `times`
    (strictly increasing), each replica with its own adaptive step.

    first_step: None (selected per replica, Hairer's rule, one extra evaluation), a float, or a
    (B,) tensor such as a previous Solution.step. frozen: (B,) bool; those replicas keep their
    state at every output time and cost nothing. compact=False keeps the working batch whole
    (for a velocity that needs all B rows). rtol/atol are per entry, as in the error norm above.
    """
    state = tuple(x.detach() for x in state)
    if not state:
        raise ValueError("state must hold at least one tensor")
    B, device = state[0].shape[0], state[0].device
    if any(x.shape[0] != B for x in state):
        raise ValueError(f"every component of the state needs the same leading replica axis, got "
                         f"{[tuple(x.shape) for x in state]}")
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).to(device)
    if times.numel() < 2 or not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"times={times.tolist()} must hold at least two strictly increasing times")
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
        raise ValueError(f"rtol={rtol}, atol={atol} must be non-negative and not both zero")
    controller = controller or Controller()
    frozen = torch.zeros(B, dtype=torch.bool, device=device) if frozen is None else frozen.to(device, torch.bool)
    if frozen.shape != (B,):
        raise ValueError(f"frozen has shape {tuple(frozen.shape)}, expected ({B},)")
    h0 = _as_replica_tensor(first_step, B, "first_step", device)
    evaluations = 0

    def f(y: State) -> State:
        nonlocal evaluations
        evaluations += 1
        return tuple(velocity(y))

    full = lambda value, dtype: torch.full((B,), value, dtype=dtype, device=device)  # noqa: E731
    home = _Replicas(tuple(x.clone() for x in state), tuple(torch.zeros_like(x) for x in state),
                     t=full(float(times[0]), torch.float64), h=full(0.0, torch.float64) if h0 is None else h0,
                     err_prev=full(1e-4, torch.float64), after_reject=full(False, torch.bool),
                     failed=full(False, torch.bool), next_output=full(1, torch.long),
                     accepted=full(0, torch.long), rejected=full(0, torch.long), evals=full(0, torch.long))
    # every output time starts as the initial state: right for frozen replicas; the others'
    # rows are all overwritten as they land (a failed replica's by its last state, below)
    outputs = tuple(x.unsqueeze(0).repeat(len(times), *[1] * x.ndim) for x in state)
    live = (~frozen).nonzero().flatten()
    if live.numel():
        work = home.gather(live)
        work.k1 = f(work.y)    # the first stage; afterwards each step's last stage is the next's first
        work.evals += 1
        if h0 is None:
            work.h = _initial_step(f, work, rtol, atol, float(times[1] - times[0]))
            work.evals += 1
        _integrate(f, home, live, work, times, outputs, rtol, atol, controller, compact, max_iterations)
    for b in home.failed.nonzero().flatten().tolist():
        for x, out in zip(home.y, outputs):
            out[int(home.next_output[b]):, b] = x[b]
    return Solution(outputs, evaluations, home.accepted, home.rejected, home.evals, home.h, home.failed)


def _initial_step(f, work: _Replicas, rtol: float, atol: float, span: float) -> Tensor:
    """Hairer, Nørsett & Wanner's starting step, per replica: h with ‖h f‖ ≈ 1 % of ‖y‖, then
    h such that the local error of an order-5 step with the observed ‖f'‖ would be ≈ 0.01."""
    y0, f0 = work.y, work.k1
    scale = [atol + rtol * y.abs() for y in y0]
    d0 = _rms([y / s for y, s in zip(y0, scale)])
    d1 = _rms([k / s for k, s in zip(f0, scale)])
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.clamp_max(span)
    f1 = f(_axpy(y0, h0, [1.0], [f0]))
    d2 = _rms([(a - b) / s for a, b, s in zip(f1, f0, scale)]) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / dmax.clamp_min(1e-300)) ** (1 / ORDER))
    h = torch.minimum(100 * h0, h1)
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))


def _integrate(f, home: _Replicas, index: Tensor, work: _Replicas, times: Tensor, outputs: State, rtol: float,
               atol: float, controller: Controller, compact: bool, budget: int) -> None:
    """Step the replicas `index` of `home` (gathered as `work`) through all output times."""
    last = len(times) - 1
    iterations = 0
    while True:
        moving = (work.next_output <= last) & ~work.failed
        count = int(moving.sum())            # the loop's one host sync per step
        if count == 0:
            break
        if compact and count <= index.numel() // 2:
            home.scatter(index, work)
            keep = moving.nonzero().flatten()
            index, work = index[keep], work.gather(keep)
            moving = torch.ones(count, dtype=torch.bool, device=moving.device)
        iterations += 1
        if iterations > budget:
            raise RuntimeError(f"dopri5 took more than {budget} steps: raise max_iterations or loosen rtol/atol")
        slot = work.next_output.clamp_max(last)
        landed = _step(f, work, moving, times[slot], rtol, atol, controller)
        for x, out in zip(work.y, outputs):
            out[slot, index] = torch.where(landed.view(-1, *[1] * (x.ndim - 1)), x, out[slot, index])
        work.next_output += landed
    home.scatter(index, work)


def _step(f, r: _Replicas, moving: Tensor, target: Tensor, rtol: float, atol: float,
          controller: Controller) -> Tensor:
    """One Dormand–Prince step of every moving replica with its own h towards its own target
    time (in place on r); returns which replicas landed on their target."""
    # land on the output time: take the remainder when the step reaches it, or nearly does
    # (Hairer's 1.01: no sliver of a step left over); t is then set to target exactly
    lands = r.t + 1.01 * r.h >= target
    h = torch.where(moving, torch.where(lands, target - r.t, r.h), torch.zeros_like(r.h))
    ks = [r.k1]
    for i in range(1, len(C)):
        ks.append(f(_axpy(r.y, h, A[i], ks)))
    y1 = _axpy(r.y, h, A[-1], ks[:-1])       # b = last row of A; the 7th stage is f(y1)
    error = _axpy([torch.zeros_like(x) for x in r.y], h, E, ks)
    ratio = _rms([e / (atol + rtol * torch.maximum(a.abs(), b.abs())) for e, a, b in zip(error, r.y, y1)])
    finite = torch.isfinite(ratio)
    for x in y1:                              # |y1| = inf can still give a finite ratio
        finite &= torch.isfinite(x).flatten(1).all(1)
    accept = moving & finite & (ratio <= 1.0)
    reject = moving & ~accept
    grow, shrink = controller.factors(torch.where(finite, ratio, torch.full_like(ratio, 1e10)), r.err_prev,
                                      r.after_reject)
    h_next = torch.where(accept, h * grow, torch.where(reject, h * shrink, r.h))
    landed = accept & lands
    # a step cut short to land keeps the longer step it was cut from for what follows
    h_next = torch.where(landed, torch.maximum(h_next, r.h), h_next)
    r.y = _where(accept, y1, r.y)
    r.k1 = _where(accept, ks[-1], r.k1)
    r.t = torch.where(landed, target, torch.where(accept, r.t + h, r.t))
    r.err_prev = torch.where(accept, ratio.clamp_min(1e-4), r.err_prev)
    r.after_reject = torch.where(moving, reject, r.after_reject)
    # a step that no longer changes t (or a non-finite one) can never finish: stop that replica
    r.failed = r.failed | (reject & ((r.t + h_next == r.t) | ~torch.isfinite(h_next)))
    r.h = h_next
    r.accepted += accept
    r.rejected += reject
    r.evals += NEW_STAGES * moving
    return landed
