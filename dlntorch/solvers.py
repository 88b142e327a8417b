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
A caller's predicate `done` (e.g. E < a threshold) is tested on each replica's state at every
output time it reaches (the first included): a replica it holds for stops there, keeps that state
at the later times and costs nothing more — a converged replica does not go on stepping, at the
step its stability allows, to the last time.

The right-hand side must act row by row — replica b's velocity depends only on replica b's state —
and accept any number of rows (it is called on subsets); a closed-form gradient such as
`lambda W: mask * (W − Y)` does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

State = tuple[Tensor, ...]
Velocity = Callable[[State], Sequence[Tensor]]
Done = Callable[[State], Tensor]

# Dormand–Prince 5(4): nodes c, stage matrix a (row i: the weights of k_1..k_i in stage i+1), the
# 5th-order weights b = the last row of a (the 7th stage is f(y₁): the next step's first, FSAL)
# and the error weights e = b₅ − b₄. The velocity is autonomous (the flows' ∇E does not depend on
# t), so the nodes c only document the tableau and count its stages.
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
STAGES = len(C)
ORDER = 5                      # the error estimate is O(h⁵): the controller's exponents are 1/5
NEW_STAGES = STAGES - 1        # evaluations per step after the first (FSAL)


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
    they last stepped successfully and are reported, never waited for; stopped_at — the index of
    the output time at which `done` stopped the replica (−1: it did not stop)."""

    states: State
    evaluations: int
    accepted: Tensor
    rejected: Tensor
    replica_evaluations: Tensor
    step: Tensor
    failed: Tensor
    stopped_at: Tensor

    def final(self) -> State:
        return tuple(x[-1] for x in self.states)


class _Layout:
    """The state's components laid side by side as one (B, D) matrix: a stage is then one
    combination of the stages before it (a single matmul) whatever the number of factors."""

    def __init__(self, state: State):
        self.shapes = [x.shape[1:] for x in state]
        self.sizes = [s.numel() for s in self.shapes]
        if len({x.dtype for x in state}) != 1:
            raise ValueError(f"every component of the state needs one dtype, got {[x.dtype for x in state]}")

    def flat(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([x.reshape(x.shape[0], -1) for x in parts], 1)

    def split(self, y: Tensor) -> State:
        """Views of y's columns as the components, for any number of leading axes."""
        lead = y.shape[:-1]
        return tuple(part.view(*lead, *shape) for part, shape in zip(y.split(self.sizes, -1), self.shapes))


def _rms(x: Tensor) -> Tensor:
    """Per replica (row): the RMS over its entries."""
    return x.pow(2).mean(1).sqrt()


def _row(h: Tensor) -> Tensor:
    return h.unsqueeze(1)


class _Replicas:
    """Per-replica solver state as a flat list of tensors with the replica axis first, so that a
    subset can be gathered into a working batch and written back by index in one pass."""

    FIELDS = ("y", "k1", "t", "h", "err_prev", "after_reject", "failed", "next_output", "accepted", "rejected",
              "evals", "stopped_at")

    def __init__(self, **fields: Tensor):
        for name in self.FIELDS:
            setattr(self, name, fields[name])

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f) for f in self.FIELDS]

    def gather(self, index: Tensor) -> _Replicas:
        return _Replicas(**{f: x.index_select(0, index) for f, x in zip(self.FIELDS, self.tensors())})

    def scatter(self, index: Tensor, part: _Replicas) -> None:
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
    done: Done | None = None,
) -> Solution:
    """Integrate dy/dt = velocity(y) from `state` at times[0] through every time in `times`
    (strictly increasing), each replica with its own adaptive step.

    first_step: None (selected per replica, Hairer's rule, one extra evaluation), a float, or a
    (B,) tensor such as a previous Solution.step. frozen: (B,) bool; those replicas keep their
    state at every output time and cost nothing. compact=False keeps the working batch whole
    (for a velocity that needs all B rows). rtol/atol are per entry, as in the error norm above.
    done: a row-wise predicate on the state ((B',) bool for any B' rows), tested at output times;
    a replica stops at the first output time where it holds (see the module's docstring).
    """
    state = tuple(x.detach() for x in state)
    if not state:
        raise ValueError("state must hold at least one tensor")
    B, device = state[0].shape[0], state[0].device
    if any(x.shape[0] != B for x in state):
        raise ValueError(f"every component of the state needs the same leading replica axis, got "
                         f"{[tuple(x.shape) for x in state]}")
    layout = _Layout(state)
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

    def f(y: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return layout.flat(velocity(layout.split(y)))

    y0 = layout.flat(state)
    full = lambda value, dtype: torch.full((B,), value, dtype=dtype, device=device)  # noqa: E731
    home = _Replicas(y=y0.clone(), k1=torch.zeros_like(y0), t=full(float(times[0]), torch.float64),
                     h=full(0.0, torch.float64) if h0 is None else h0, err_prev=full(1e-4, torch.float64),
                     after_reject=full(False, torch.bool), failed=full(False, torch.bool),
                     next_output=full(1, torch.long), accepted=full(0, torch.long), rejected=full(0, torch.long),
                     evals=full(0, torch.long), stopped_at=full(-1, torch.long))
    # every output time starts as the initial state: right for frozen replicas; the others'
    # rows are all overwritten as they land (a failed replica's by its last state, below)
    outputs = y0.unsqueeze(0).repeat(len(times), 1, 1)
    if done is not None:      # done at the start: stopped at output 0, never moves
        at_start = ~frozen & done(state).to(device, torch.bool)
        home.stopped_at[at_start] = 0
        home.next_output[at_start] = len(times)
    live = (~frozen & (home.stopped_at < 0)).nonzero().flatten()
    if live.numel():
        work = home.gather(live)
        work.k1 = f(work.y)    # the first stage; afterwards each step's last stage is the next's first
        work.evals += 1
        if h0 is None:
            work.h = _initial_step(f, work, rtol, atol, float(times[1] - times[0]))
            work.evals += 1
        _integrate(f, home, live, work, times, outputs, rtol, atol, controller, compact, max_iterations,
                   None if done is None else lambda y: done(layout.split(y)).to(torch.bool))
    for b in home.failed.nonzero().flatten().tolist():
        outputs[int(home.next_output[b]):, b] = home.y[b]
    # a stopped replica keeps its state at every output time after the one it stopped at
    after = torch.arange(len(times), device=device).view(-1, 1) > home.stopped_at.view(1, -1)
    after &= (home.stopped_at >= 0).view(1, -1)
    outputs = torch.where(after.unsqueeze(-1), home.y.unsqueeze(0), outputs)
    states = tuple(x.contiguous() for x in layout.split(outputs))
    return Solution(states, evaluations, home.accepted, home.rejected, home.evals, home.h, home.failed,
                    home.stopped_at)


def _initial_step(f, work: _Replicas, rtol: float, atol: float, span: float) -> Tensor:
    """Hairer, Nørsett & Wanner's starting step, per replica: h with ‖h f‖ ≈ 1 % of ‖y‖, then
    h such that the local error of an order-5 step with the observed ‖f'‖ would be ≈ 0.01."""
    y0, f0 = work.y, work.k1
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.clamp_max(span)
    f1 = f(torch.addcmul(y0, _row(h0), f0))
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / dmax.clamp_min(1e-300)) ** (1 / ORDER))
    h = torch.minimum(100 * h0, h1)
    return torch.where(torch.isfinite(h) & (h > 0), h, torch.full_like(h, 1e-6))


def _integrate(f, home: _Replicas, index: Tensor, work: _Replicas, times: Tensor, outputs: Tensor, rtol: float,
               atol: float, controller: Controller, compact: bool, budget: int, done=None) -> None:
    """Step the replicas `index` of `home` (gathered as `work`) through all output times."""
    last = len(times) - 1
    tableau = torch.tensor([list(row) + [0.0] * (STAGES - len(row)) for row in A] + [list(E)],
                           dtype=work.y.dtype, device=work.y.device)
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
        landed = _step(f, work, moving, times[slot], rtol, atol, controller, tableau)
        outputs[slot, index] = torch.where(_row(landed), work.y, outputs[slot, index])
        if done is not None and bool(landed.any()):
            stops = landed & done(work.y)
            work.stopped_at = torch.where(stops, slot, work.stopped_at)
            work.next_output = torch.where(stops, last, work.next_output)   # past the last, below
        work.next_output += landed
    home.scatter(index, work)


def _step(f, r: _Replicas, moving: Tensor, target: Tensor, rtol: float, atol: float, controller: Controller,
          tableau: Tensor) -> Tensor:
    """One Dormand–Prince step of every moving replica with its own h towards its own target
    time (in place on r); returns which replicas landed on their target."""
    # land on the output time: take the remainder when the step reaches it, or nearly does
    # (Hairer's 1.01: no sliver of a step left over); t is then set to target exactly
    lands = r.t + 1.01 * r.h >= target
    h = torch.where(moving, torch.where(lands, target - r.t, r.h), torch.zeros_like(r.h))
    hv = _row(h.to(r.y.dtype))
    k = r.y.new_empty((STAGES, *r.y.shape))
    k[0] = r.k1
    flat = k.view(STAGES, -1)

    def combine(weights: Tensor, stages: int) -> Tensor:
        # Σ_j w_j k_j over the first `stages` stages as one (1 x stages)(stages x nD) product
        return (weights[:stages] @ flat[:stages]).view_as(r.y)

    for i in range(1, STAGES):
        k[i] = f(torch.addcmul(r.y, hv, combine(tableau[i], i)))
    y1 = torch.addcmul(r.y, hv, combine(tableau[STAGES - 1], STAGES - 1))
    error = hv * combine(tableau[STAGES], STAGES)
    ratio = _rms(error / (atol + rtol * torch.maximum(r.y.abs(), y1.abs())))
    # |y1| = inf can still give a finite ratio
    finite = torch.isfinite(ratio) & torch.isfinite(y1).all(1)
    accept = moving & finite & (ratio <= 1.0)
    reject = moving & ~accept
    grow, shrink = controller.factors(torch.where(finite, ratio, torch.full_like(ratio, 1e10)), r.err_prev,
                                      r.after_reject)
    h_next = torch.where(accept, h * grow, torch.where(reject, h * shrink, r.h))
    landed = accept & lands
    # a step cut short to land keeps the longer step it was cut from for what follows
    h_next = torch.where(landed, torch.maximum(h_next, r.h), h_next)
    r.y = torch.where(_row(accept), y1, r.y)
    r.k1 = torch.where(_row(accept), k[STAGES - 1], r.k1)
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
