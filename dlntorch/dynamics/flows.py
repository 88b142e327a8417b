"""Exact dynamics: the upstairs gradient flow of the factors and the downstairs flows of the product.

Upstairs: dW_p/dt = −∂L/∂W_p, L = E ∘ φ. Downstairs: dW/dt = −A_N(∇E(W)), the Riemannian gradient
flow of E for g^N, which the product of a balanced upstairs flow follows exactly (Riemannian
submersion). At depth N = inf only rescaled time τ = N t makes sense: dW/dτ = −A_∞(∇E(W)).

Both integrators are pure functions of an initial state and a grid of times, batched over the
replica axis (all replicas share the solver's steps), and return the states at those times with
the number of ∇E evaluations. A training loop integrates piecewise: call again from the last
state with times = [t_k, t_{k+1}]. grad_fn(W) -> ∇E(W) of shape (B, d_N, d_0) is the closed-form
gradient, e.g. mask ∘ (W − Y) for E = ½‖mask ∘ (W − Y)‖².
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import fail, non_negative_finite, one_of, parse_depth, positive_finite
from ..geometry import Depth, as_depth, is_infinite_depth, metric_operator
from ..network import DeepLinearNetwork, chain, factor_gradients, fast_chain
from ..optim import OPTIMISERS
from ..tasks import Task
from ..tiny import planes_mm, planes_pay, planes_T, to_planes
from .base import Dynamics

GradFn = Callable[[Tensor], Tensor]

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP = ("rk4", "euler", "midpoint", "heun3")


def upstairs_velocity(factors: Sequence[Tensor], grad_fn: GradFn, weight_decay: float = 0.0) -> list[Tensor]:
    """[−∂L/∂W_p]_p = [−(W_N ⋯ W_{p+1})^T ∇E(W) (W_{p−1} ⋯ W_1)^T]_p, one ∇E evaluation; with
    weight decay λ, the flow of L + (λ/2) Σ_p ‖W_p‖²: [−∂L/∂W_p − λ W_p]_p, under which the
    balancedness decays exactly, dG_p/dt = −2λ G_p (the L part conserves it)."""
    gradients = factor_gradients(factors, grad_fn)
    if not weight_decay:
        return [-g for g in gradients]
    return [-g - weight_decay * W for g, W in zip(gradients, factors)]


def upstairs_velocity_planes(factors: Sequence[Tensor], grad_fn: GradFn, weight_decay: float = 0.0) -> list[Tensor]:
    """upstairs_velocity with the chain rule run on replica-last planes (d_p, d_{p−1}, B),
    elementwise over the replicas — faster than B tiny batched matmuls for small widths and many
    replicas (tiny.planes_pay) — taking and returning replica-first factors as it does."""
    planes = [to_planes(f) for f in factors]
    gradients = factor_gradients(planes, lambda W: grad_fn(W.permute(2, 0, 1)).permute(1, 2, 0),
                                 mm=planes_mm, T=planes_T)
    velocity = [-g if not weight_decay else -g - weight_decay * W for g, W in zip(gradients, planes)]
    return [v.permute(2, 0, 1) for v in velocity]


def downstairs_velocity(W: Tensor, grad_fn: GradFn, N: Depth) -> Tensor:
    """−A_N(∇E(W)) (N = math.inf: −A_∞(∇E(W)), the velocity in τ = N t)."""
    return -metric_operator(W, grad_fn(W), N)


class _Counted:
    """An ODE right-hand side that counts its calls: each call is one ∇E evaluation."""

    def __init__(self, velocity: Callable):
        self.velocity, self.calls = velocity, 0

    def __call__(self, t, state):
        self.calls += 1
        return self.velocity(state)


def _uniform_grid(t: Tensor, steps: int) -> Tensor:
    """steps equal steps from t[0] to t[-1], the ends exactly those of t (torchdiffeq checks)."""
    grid = torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype, device=t.device)
    grid[0], grid[-1] = t[0], t[-1]
    return grid


def _replica_norm(state) -> Tensor:
    """The worst replica's RMS: every replica, not just their average, meets rtol/atol.
    (torchdiffeq's default RMS over the whole batch would let a few replicas err a lot.)"""
    parts = state if isinstance(state, tuple) else (state,)
    return torch.stack([x.pow(2).flatten(1).mean(1).sqrt().max() for x in parts]).max()


def _solve(rhs: _Counted, state, times: Tensor, method: str, rtol: float, atol: float, step_size,
           first_step: float | None = None):
    """odeint over `times`, returning the states at every time (stacked along a new axis 0).

    Adaptive methods run once over the whole grid (dense output between the times). Fixed-step
    methods run interval by interval with uniform steps of at most step_size (one step per
    interval if None), so every requested time is a step end and never an interpolation.
    """
    from torchdiffeq import odeint  # imported only when a flow runs
    if method in ADAPTIVE:
        return odeint(rhs, state, times, method=method, rtol=rtol, atol=atol,
                      options=dict(norm=_replica_norm, first_step=first_step))
    if method not in FIXED_STEP:
        raise ValueError(f"method={method!r} must be one of {ADAPTIVE + FIXED_STEP}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size={step_size!r} must be positive")
    outputs = [state]
    for t0, t1 in zip(times[:-1], times[1:]):
        span = float(t1 - t0)
        # 1e-9 slack keeps a span that is a whole number of steps up to rounding from adding a step
        steps = 1 if step_size is None else max(1, math.ceil(abs(span) / step_size - 1e-9))
        path = odeint(
            rhs, outputs[-1], torch.stack([t0, t1]), method=method,
            options=dict(grid_constructor=lambda f, y0, t, steps=steps: _uniform_grid(t, steps)),
        )
        outputs.append(tuple(x[-1] for x in path) if isinstance(path, tuple) else path[-1])
    if isinstance(state, tuple):
        return tuple(torch.stack([out[i] for out in outputs]) for i in range(len(state)))
    return torch.stack(outputs)


def _time_grid(times, like: Tensor) -> Tensor:
    # float64 times even for float32 states: t accumulates over many steps
    times = torch.as_tensor(times, dtype=torch.float64, device=like.device).reshape(-1)
    if times.numel() < 2:
        raise ValueError("times must hold at least a start and an end time")
    return times


@torch.no_grad()
def integrate_upstairs(
    factors: Sequence[Tensor],
    grad_fn: GradFn,
    times,
    method: str = "dopri5",
    rtol: float = 1e-10,
    atol: float = 1e-12,
    step_size: float | None = None,
    first_step: float | None = None,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], int]:
    """The gradient flow dW_p/dt = −∂L/∂W_p (− λ W_p with weight_decay λ) from `factors` at t = times[0].

    Returns (trajectory, evaluations): trajectory[p] has shape (T, B, d_{p+1}, d_p) and holds
    factor W_{p+1} at each of the T times, so [w[-1] for w in trajectory] is the final state;
    evaluations counts ∇E evaluations (solver stages, step-size selection and rejected steps
    included). method: 'dopri5' (adaptive, tolerances rtol/atol on the RMS error of the worst
    replica) or 'rk4' (fixed steps of at most step_size). No autograd graph is recorded.
    """
    factors = tuple(factor.detach() for factor in factors)
    times = _time_grid(times, factors[0])
    rhs = _Counted(lambda state: tuple(upstairs_velocity(list(state), grad_fn, weight_decay)))
    trajectory = _solve(rhs, factors, times, method, rtol, atol, step_size, first_step)
    return list(trajectory), rhs.calls


@torch.no_grad()
def integrate_downstairs(
    W0: Tensor,
    grad_fn: GradFn,
    times,
    N: Depth,
    time_scale: str = "raw",
    method: str = "dopri5",
    rtol: float = 1e-10,
    atol: float = 1e-12,
    step_size: float | None = None,
    first_step: float | None = None,
) -> tuple[Tensor, int]:
    """The Riemannian gradient flow of E for g^N on the product, from W0 at times[0].

    time_scale 'raw': `times` are t and dW/dt = −A_N(∇E(W)). 'per_depth': `times` are τ = N t and
    dW/dτ = −A_N(∇E(W))/N, the scaling under which depths converge; N = math.inf (A_∞) is only
    meaningful there. Returns (trajectory (T, B, d_N, d_0), ∇E evaluations); other arguments as
    in `integrate_upstairs`.
    """
    scale = clock_scale(N, time_scale)
    W0 = W0.detach()
    times = _time_grid(times, W0)
    rhs = _Counted(lambda W: scale * downstairs_velocity(W, grad_fn, N))
    return _solve(rhs, W0, times, method, rtol, atol, step_size, first_step), rhs.calls


def clock_scale(N: Depth, time_scale: str) -> float:
    """The factor of −A_N(∇E) in the clock: 1 in raw time t, 1/N in τ = N t (1 at N = inf, where
    A_∞ is already the limit of A_N/N and only τ is meaningful)."""
    if time_scale not in ("raw", "per_depth"):
        raise ValueError(f"time_scale={time_scale!r} must be 'raw' or 'per_depth'")
    if is_infinite_depth(N):
        if time_scale == "raw":
            raise ValueError("depth N=inf needs time_scale='per_depth' (A_N grows like N in raw time)")
        return 1.0
    return 1.0 if time_scale == "raw" else 1.0 / as_depth(N)


# ------------------------------------------------------------------ the run loop's adapters

WINDOW = 32   # logged times per solver call


class _FlowDynamics(Dynamics):
    """Shared by the flows: t = lr × step on the same grid as the step-based dynamics, pausing
    only at logged times (an ODE solver needs no stop checks in between).

    Step control (optim.step_control): `per_replica` (the default for dopri5) gives each replica
    its own t, step size and error control (dlntorch.solvers), so the hardest replica no longer
    sets the step for all; `shared` is one torchdiffeq step for all replicas, whose error norm is
    the worst replica's. One solver call spans many pauses and the states at those times are kept,
    so the adaptive solver does not restart (a fresh step selection, a ramp-up and an overshot
    last step) at every logged time; it also starts each call with the step size(s) it last used. Frozen
    (diverged) replicas get zero velocity and a zero state, so they cannot spoil the solver's
    error norm; they report NaN. A resumed flow continues from its checkpointed state with fresh
    windows: the same trajectory to the solver's tolerance, not bit for bit.

    optim.hold_converged (per-replica control only): each replica stops at the first pause where
    its E < run.stop_energy and is held there, instead of stepping on — at the step size its
    stability allows near the minimiser, often thousands of steps — until every replica is below
    it. Its reported state is then the one at that pause (E below the run's stop test already),
    not the one at the run's end; the others are untouched."""

    step_based = False
    PER_REPLICA_BYTES = 1 << 28     # states kept ahead by one per-replica call (T · B · D · 8 bytes)

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task, state: tuple[Tensor, ...]):
        super().__init__(cfg.optim.lr)
        self.task, self.step, self.state = task, 0, state
        self.solver = dict(method=cfg.optim.method, rtol=cfg.optim.rtol, atol=cfg.optim.atol,
                           step_size=cfg.optim.lr if cfg.optim.method in FIXED_STEP else None)
        self.adaptive = cfg.optim.method in ADAPTIVE
        self.per_replica = step_control(cfg.optim) == "per_replica"
        self.hold_below = cfg.run.stop_energy if holds_converged(cfg.optim) else None
        self.first_step: float | Tensor | None = None    # a (B,) tensor under per-replica control
        self.dead = torch.zeros(net.replicas, dtype=torch.bool, device=net.factors[0].device)
        self.pauses: list[int] = []
        self.ahead: dict[int, tuple[Tensor, ...]] = {}   # states already integrated, by step

    # -- what a flow defines -----------------------------------------------------------------
    def integrate(self, state: tuple[Tensor, ...], times: list[float], options: dict) -> list[tuple[Tensor, ...]]:
        """The states at times[1:], counting gradient evaluations (one step for all replicas)."""
        raise NotImplementedError

    def velocity(self, state: tuple[Tensor, ...]) -> list[Tensor]:
        """d(state)/dt for any subset of the replicas' rows (per-replica step control)."""
        raise NotImplementedError

    def product_of(self, state: tuple[Tensor, ...]) -> Tensor:
        """The end-to-end matrix W of any subset of the replicas' rows."""
        raise NotImplementedError

    def converged(self, state: tuple[Tensor, ...]) -> Tensor:
        """optim.hold_converged's test, row by row: E(W) < run.stop_energy."""
        return self.task.energy(self.product_of(state)) < self.hold_below

    def integrate_per_replica(self, state: tuple[Tensor, ...], times: list[float]) -> list[tuple[Tensor, ...]]:
        """Each replica with its own t, step and error control (dlntorch.solvers.dopri5); frozen
        replicas cost nothing, and one whose step collapses is handed to the loop as diverged."""
        from ..solvers import dopri5
        solution = dopri5(self.velocity, state, times, rtol=self.solver["rtol"], atol=self.solver["atol"],
                          first_step=self.first_step, frozen=self.dead,
                          done=None if self.hold_below is None else self.converged)
        self.gradient_evaluations += solution.evaluations
        self.first_step = solution.step
        failed = solution.failed.view(1, -1, *[1] * (state[0].ndim - 1))
        states = [torch.where(failed, torch.nan, x) for x in solution.states]
        return [tuple(x[k] for x in states) for k in range(1, len(times))]

    def window(self) -> list[int]:
        """The pauses one solver call integrates through: WINDOW of them under a shared step; under
        per-replica control as many as fit in PER_REPLICA_BYTES, since every window end makes all
        replicas wait for the hardest one."""
        ahead = [p for p in self.pauses if p > self.step]
        if not self.per_replica:
            return ahead[:WINDOW]
        size = sum(x.numel() for x in self.state) * self.state[0].element_size()
        return ahead[:max(WINDOW, self.PER_REPLICA_BYTES // max(size, 1))]

    # -- the loop's interface ----------------------------------------------------------------
    def plan(self, pauses) -> None:
        self.pauses = sorted(int(p) for p in pauses)

    def advance(self, steps: int) -> None:
        target = self.step + steps
        if target not in self.ahead:
            window = self.window()
            if target not in window:         # a pause the plan did not announce
                window = [target]
            times = [self.time(self.step)] + [self.time(p) for p in window]
            if self.per_replica:
                self.ahead = dict(zip(window, self.integrate_per_replica(self.state, times)))
            else:
                calls = self.gradient_evaluations
                self.ahead = dict(zip(window, self.integrate(self.state, times, self.options())))
                self.carry_step(times, self.gradient_evaluations - calls)
        self.state = self.ahead.pop(target)
        self.ahead = {p: s for p, s in self.ahead.items() if p > target}
        self.step = target

    def options(self) -> dict[str, Any]:
        return {**self.solver, "first_step": self.first_step} if self.adaptive else self.solver

    def carry_step(self, times: list[float], calls: int) -> None:
        # ≈ 6 new evaluations per dopri5 step; a window done in one step may have been shorter
        # than the step the solver could take, so it does not shrink the estimate
        steps = calls / 6
        if self.adaptive and steps > 1.5:
            self.first_step = (times[-1] - times[0]) / steps

    def gradient(self, W: Tensor) -> Tensor:
        return torch.where(self.dead.view(-1, 1, 1), 0.0, self.task.gradient(W))

    def freeze(self, diverged: Tensor) -> None:
        if bool((diverged != self.dead).any()):
            self.dead = diverged.clone()
            self.state = tuple(torch.where(self.dead.view(-1, 1, 1), 0.0, x) for x in self.state)
            self.ahead.clear()                # integrated with the old velocities

    def _report(self, x: Tensor) -> Tensor:
        return torch.where(self.dead.view(-1, *[1] * (x.ndim - 1)), torch.nan, x)

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(fast_chain(self.factors()))

    def state_dict(self) -> dict[str, Any]:
        return {"state": [x.cpu() for x in self.state], "step": self.step, "dead": self.dead.cpu(),
                "first_step": self.first_step, "gradient_evaluations": self.gradient_evaluations}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        device = self.dead.device
        self.state = tuple(x.to(device) for x in saved["state"])
        self.step, self.dead = saved["step"], saved["dead"].to(device)
        self.first_step, self.gradient_evaluations = saved["first_step"], saved["gradient_evaluations"]
        self.ahead.clear()


class UpstairsFlow(_FlowDynamics):
    """optim=flow: dW_p/dt = −∂L/∂W_p by an ODE solver to tolerance (with optim.weight_decay λ, the
    flow of L + (λ/2)Σ‖W_p‖²: G_p(t) = e^{−2λt} G_p(0)); with compare_downstairs the downstairs
    g^N flow of the product runs alongside from the same (balanced) start. The state is
    (W_1, …, W_N[, W_downstairs])."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        factors = tuple(f.detach().clone() for f in net.factors)
        compare = cfg.optim.compare_downstairs
        super().__init__(cfg, net, task, factors + ((chain(factors).clone(),) if compare else ()))
        self.net, self.compare, self.N = net, compare, len(factors)
        self.weight_decay = cfg.optim.weight_decay
        self.downstairs_evaluations = 0
        # per-replica steps evaluate the velocity on the moving rows only, one batched call each
        self.rows_velocity = upstairs_velocity_planes if planes_pay(net.widths, net.replicas) else upstairs_velocity

    def integrate(self, state, times, options):
        factors = state[:self.N]
        path, calls = integrate_upstairs(factors, self.gradient, times, weight_decay=self.weight_decay, **options)
        self.gradient_evaluations += calls
        columns = list(path)
        if self.compare:
            down, calls = integrate_downstairs(state[self.N], self.gradient, times, self.N, **options)
            self.downstairs_evaluations += calls
            columns.append(down)
        return [tuple(x[k] for x in columns) for k in range(1, len(times))]

    def product_of(self, state):
        return chain(state[:self.N])

    def velocity(self, state):
        v = self.rows_velocity(list(state[:self.N]), self.task.gradient, self.weight_decay)
        if self.compare:      # one step sequence per replica for both flows
            self.downstairs_evaluations += 1
            v.append(downstairs_velocity(state[self.N], self.task.gradient, self.N))
        return v

    def advance(self, steps: int) -> None:
        super().advance(steps)
        self.net.set_factors(self.state[:self.N])

    def factors(self) -> list[Tensor]:
        return [self._report(f) for f in self.state[:self.N]]

    def observables(self) -> dict[str, Tensor]:
        if not self.compare:
            return {}
        gap = (chain(self.state[:self.N]) - self.state[self.N]).flatten(1).norm(dim=1)
        return {"downstairs_distance": self._report(gap)}

    def counters(self) -> dict[str, int]:
        return {"downstairs_gradient_evaluations": self.downstairs_evaluations} if self.compare else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "downstairs_evaluations": self.downstairs_evaluations}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        super().load_state_dict(saved)
        self.downstairs_evaluations = saved["downstairs_evaluations"]
        self.net.set_factors(self.state[:self.N])


class DownstairsFlow(_FlowDynamics):
    """optim=downstairs: dW/dt = −A_N(∇E(W)) on the product itself, N = optim.depth (an int or
    inf; default the model's depth), in t (raw) or τ = N t (per_depth; required for N = inf)."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        super().__init__(cfg, net, task, (net.product().detach().clone(),))
        self.N = net.depth if cfg.optim.depth is None else parse_depth(cfg.optim.depth)
        # auto: raw time at finite N (comparable with the upstairs dynamics), τ = N t at N = inf
        # (the only clock in which the infinite-depth flow is defined)
        self.time_scale = cfg.optim.time_scale if cfg.optim.time_scale != "auto" else \
            ("per_depth" if is_infinite_depth(self.N) else "raw")

    @property
    def depth(self) -> Depth:
        return self.N

    def product_of(self, state):
        return state[0]

    def velocity(self, state):
        return [clock_scale(self.N, self.time_scale) * downstairs_velocity(state[0], self.task.gradient, self.N)]

    def integrate(self, state, times, options):
        path, calls = integrate_downstairs(state[0], self.gradient, times, self.N,
                                           time_scale=self.time_scale, **options)
        self.gradient_evaluations += calls
        return [(W,) for W in path[1:]]

    def factors(self) -> list[Tensor]:
        return [self._report(self.state[0])]


# ------------------------------------------------------------------ registered as optimisers

@dataclass
class FlowConfig:
    """optim=flow. lr only sets the time grid t = lr·step shared with the step-based dynamics."""
    name: str = "flow"
    lr: float = 0.05
    method: str = "dopri5"              # dopri5 (adaptive) | rk4 (fixed step = lr)
    rtol: float = 1e-10
    atol: float = 1e-12
    step_control: Optional[str] = None  # dopri5: per_replica (default) | shared (one step for all replicas)
    compare_downstairs: bool = False    # integrate the downstairs flow alongside
    hold_converged: bool = False        # per_replica: each replica stops once E < run.stop_energy
    weight_decay: float = 0.0           # λ: the flow of L + (λ/2) Σ_p ‖W_p‖²


@dataclass
class DownstairsConfig:
    name: str = "downstairs"
    lr: float = 0.05
    method: str = "dopri5"
    rtol: float = 1e-10
    atol: float = 1e-12
    step_control: Optional[str] = None  # dopri5: per_replica (default) | shared (one step for all replicas)
    depth: Optional[str] = None         # N as an int or "inf"; None = model depth
    hold_converged: bool = False        # per_replica: each replica stops once E < run.stop_energy
    time_scale: str = "auto"            # raw (t) | per_depth (τ = N t) | auto (per_depth at N = inf)


def step_control(optim: Any) -> str:
    """per_replica for the adaptive method unless `shared` is asked; rk4's fixed steps are shared."""
    if optim.step_control is not None:
        return optim.step_control
    return "per_replica" if optim.method in ADAPTIVE else "shared"


def holds_converged(optim: Any) -> bool:
    """optim.hold_converged, where the optimiser has it (flow, downstairs; not free_energy, whose
    flow does not go to E = 0)."""
    return bool(optim.get("hold_converged", False))


def _check_solver(cfg: Any) -> None:
    one_of("optim.method", cfg.optim.method, ("dopri5", "rk4"))
    positive_finite("optim.rtol", cfg.optim.rtol)
    positive_finite("optim.atol", cfg.optim.atol)
    if cfg.optim.step_control is not None:
        one_of("optim.step_control", cfg.optim.step_control, ("per_replica", "shared"))
        if cfg.optim.step_control == "per_replica" and cfg.optim.method not in ADAPTIVE:
            fail("optim.step_control", "per_replica", f"it needs the adaptive method dopri5, not "
                 f"optim.method={cfg.optim.method}, whose fixed steps are one grid for all replicas")
    if holds_converged(cfg.optim) and step_control(cfg.optim) != "per_replica":
        fail("optim.hold_converged", True, "it needs per-replica step control (optim.method=dopri5 with "
             f"optim.step_control=per_replica or null), not {step_control(cfg.optim)} steps, which "
             "cannot stop one replica alone")
    if holds_converged(cfg.optim) and not cfg.run.stop_energy:
        fail("optim.hold_converged", True, "it needs a positive run.stop_energy, the energy below "
             "which a replica is held")


def _check_flow(cfg: Any) -> None:
    _check_solver(cfg)
    non_negative_finite("optim.weight_decay", cfg.optim.weight_decay)
    if cfg.optim.compare_downstairs and cfg.optim.weight_decay:
        fail("optim.compare_downstairs", True, "it needs optim.weight_decay=0, since the downstairs flow "
             "carries no weight decay")
    init = cfg.init
    if cfg.optim.compare_downstairs and not (init.name == "balanced"
                                             or (init.name == "unbalanced" and init.imbalance == 0)):
        fail("optim.compare_downstairs", True,
             f"it needs a balanced start (init=balanced), not init={init.name}, since only balanced "
             "products follow the downstairs flow")


def _check_downstairs(cfg: Any) -> None:
    _check_solver(cfg)
    optim = cfg.optim
    one_of("optim.time_scale", optim.time_scale, ("auto", "raw", "per_depth"))
    if optim.depth is not None and parse_depth(optim.depth) == math.inf and optim.time_scale == "raw":
        fail("optim.time_scale", optim.time_scale,
             "optim.depth=inf needs per_depth (rescaled time τ = N t; A_N grows like N)")


def _not_an_optimizer(cfg: Any, params: Any, generator: Any) -> None:
    raise ValueError(f"optim.name={cfg.name!r} is not a step-based optimizer")


OPTIMISERS.register("flow", schema=FlowConfig, check=_check_flow, dynamics=UpstairsFlow)(_not_an_optimizer)
OPTIMISERS.register("downstairs", schema=DownstairsConfig, check=_check_downstairs,
                    dynamics=DownstairsFlow)(_not_an_optimizer)
