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
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchdiffeq import odeint

from .config import parse_depth
from .dynamics import Dynamics
from .geometry import Depth, as_depth, is_infinite_depth, metric_operator
from .network import DeepLinearNetwork, chain, factor_gradients
from .tasks import Task

GradFn = Callable[[Tensor], Tensor]

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP = ("rk4", "euler", "midpoint", "heun3")


def upstairs_velocity(factors: Sequence[Tensor], grad_fn: GradFn) -> list[Tensor]:
    """[−∂L/∂W_p]_p = [−(W_N ⋯ W_{p+1})^T ∇E(W) (W_{p−1} ⋯ W_1)^T]_p, one ∇E evaluation."""
    grads = factor_gradients(factors, grad_fn(chain(factors)))
    return [-g for g in grads]


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


def _solve(rhs: _Counted, state, times: Tensor, method: str, rtol: float, atol: float, step_size):
    """odeint over `times`, returning the states at every time (stacked along a new axis 0).

    Adaptive methods run once over the whole grid (dense output between the times). Fixed-step
    methods run interval by interval with uniform steps of at most step_size (one step per
    interval if None), so every requested time is a step end and never an interpolation.
    """
    if method in ADAPTIVE:
        return odeint(rhs, state, times, method=method, rtol=rtol, atol=atol,
                      options=dict(norm=_replica_norm))
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
) -> tuple[list[Tensor], int]:
    """The gradient flow dW_p/dt = −∂L/∂W_p from `factors` at t = times[0].

    Returns (trajectory, evaluations): trajectory[p] has shape (T, B, d_{p+1}, d_p) and holds
    factor W_{p+1} at each of the T times, so [w[-1] for w in trajectory] is the final state;
    evaluations counts ∇E evaluations (solver stages, step-size selection and rejected steps
    included). method: 'dopri5' (adaptive, tolerances rtol/atol on the RMS error of the worst
    replica) or 'rk4' (fixed steps of at most step_size). No autograd graph is recorded.
    """
    factors = tuple(factor.detach() for factor in factors)
    times = _time_grid(times, factors[0])
    rhs = _Counted(lambda state: tuple(upstairs_velocity(list(state), grad_fn)))
    trajectory = _solve(rhs, factors, times, method, rtol, atol, step_size)
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
) -> tuple[Tensor, int]:
    """The Riemannian gradient flow of E for g^N on the product, from W0 at times[0].

    time_scale 'raw': `times` are t and dW/dt = −A_N(∇E(W)). 'per_depth': `times` are τ = N t and
    dW/dτ = −A_N(∇E(W))/N, the scaling under which depths converge; N = math.inf (A_∞) is only
    meaningful there. Returns (trajectory (T, B, d_N, d_0), ∇E evaluations); other arguments as
    in `integrate_upstairs`.
    """
    if time_scale not in ("raw", "per_depth"):
        raise ValueError(f"time_scale={time_scale!r} must be 'raw' or 'per_depth'")
    if is_infinite_depth(N):
        if time_scale == "raw":
            raise ValueError("depth N=inf needs time_scale='per_depth' (A_N grows like N in raw time)")
        scale = 1.0
    else:
        N = as_depth(N)
        scale = 1.0 if time_scale == "raw" else 1.0 / N
    W0 = W0.detach()
    times = _time_grid(times, W0)
    rhs = _Counted(lambda W: scale * downstairs_velocity(W, grad_fn, N))
    return _solve(rhs, W0, times, method, rtol, atol, step_size), rhs.calls


# ------------------------------------------------------------------ the run loop's adapters

class _FlowDynamics(Dynamics):
    """Shared by the flows: integrate from one pause of the run loop to the next (logged times
    only: an ODE solver needs no stop checks in between), t = lr × step on the same grid as the
    step-based dynamics. Frozen (diverged) replicas get zero velocity and a zero state, so they
    cannot spoil the solver's error norm; they report NaN."""

    step_based = False

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        super().__init__(cfg.optim.lr)
        self.task, self.step = task, 0
        self.solver = dict(method=cfg.optim.method, rtol=cfg.optim.rtol, atol=cfg.optim.atol,
                           step_size=cfg.optim.lr if cfg.optim.method in FIXED_STEP else None)
        self.dead = torch.zeros(net.replicas, dtype=torch.bool, device=net.factors[0].device)

    def gradient(self, W: Tensor) -> Tensor:
        return torch.where(self.dead.view(-1, 1, 1), 0.0, self.task.gradient(W))

    def interval(self, steps: int) -> list[float]:
        t0, self.step = self.time(self.step), self.step + steps
        return [t0, self.time(self.step)]

    def _report(self, x: Tensor) -> Tensor:
        return torch.where(self.dead.view(-1, *[1] * (x.ndim - 1)), torch.nan, x)

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(chain(self.factors()))


class UpstairsFlow(_FlowDynamics):
    """optim=flow: dW_p/dt = −∂L/∂W_p by an ODE solver to tolerance; with compare_downstairs the
    downstairs g^N flow of the product runs alongside from the same (balanced) start."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        super().__init__(cfg, net, task)
        self.net = net
        self.state = [f.detach().clone() for f in net.factors]
        self.downstairs = chain(self.state).clone() if cfg.optim.compare_downstairs else None
        self.downstairs_evaluations = 0

    def advance(self, steps: int) -> None:
        times = self.interval(steps)
        path, calls = integrate_upstairs(self.state, self.gradient, times, **self.solver)
        self.state = [w[-1] for w in path]
        self.net.set_factors(self.state)
        self.gradient_evaluations += calls
        if self.downstairs is not None:
            path, calls = integrate_downstairs(self.downstairs, self.gradient, times, len(self.state),
                                               **self.solver)
            self.downstairs = path[-1]
            self.downstairs_evaluations += calls

    def factors(self) -> list[Tensor]:
        return [self._report(f) for f in self.state]

    def observables(self) -> dict[str, Tensor]:
        if self.downstairs is None:
            return {}
        gap = (chain(self.state) - self.downstairs).flatten(1).norm(dim=1)
        return {"downstairs_distance": self._report(gap)}

    def freeze(self, diverged: Tensor) -> None:
        self.dead = diverged.clone()
        keep = lambda x: torch.where(self.dead.view(-1, 1, 1), 0.0, x)  # noqa: E731
        self.state = [keep(f) for f in self.state]
        if self.downstairs is not None:
            self.downstairs = keep(self.downstairs)

    def state_dict(self) -> dict[str, Any]:
        return {"factors": [f.cpu() for f in self.state], "step": self.step, "dead": self.dead.cpu(),
                "downstairs": None if self.downstairs is None else self.downstairs.cpu(),
                "gradient_evaluations": self.gradient_evaluations,
                "downstairs_evaluations": self.downstairs_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.dead.device
        self.state = [f.to(device) for f in state["factors"]]
        self.net.set_factors(self.state)
        self.step, self.dead = state["step"], state["dead"].to(device)
        self.downstairs = None if state["downstairs"] is None else state["downstairs"].to(device)
        self.gradient_evaluations = state["gradient_evaluations"]
        self.downstairs_evaluations = state["downstairs_evaluations"]


class DownstairsFlow(_FlowDynamics):
    """optim=downstairs: dW/dt = −A_N(∇E(W)) on the product itself, N = optim.depth (an int or
    inf; default the model's depth), in t (raw) or τ = N t (per_depth; required for N = inf)."""

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task):
        super().__init__(cfg, net, task)
        self.N = net.depth if cfg.optim.depth is None else parse_depth(cfg.optim.depth)
        self.time_scale = cfg.optim.time_scale
        self.W = net.product().detach().clone()

    @property
    def depth(self) -> Depth:
        return self.N

    def advance(self, steps: int) -> None:
        path, calls = integrate_downstairs(self.W, self.gradient, self.interval(steps), self.N,
                                           time_scale=self.time_scale, **self.solver)
        self.W = path[-1]
        self.gradient_evaluations += calls

    def factors(self) -> list[Tensor]:
        return [self._report(self.W)]

    def freeze(self, diverged: Tensor) -> None:
        self.dead = diverged.clone()
        self.W = torch.where(self.dead.view(-1, 1, 1), 0.0, self.W)

    def state_dict(self) -> dict[str, Any]:
        return {"W": self.W.cpu(), "step": self.step, "dead": self.dead.cpu(),
                "gradient_evaluations": self.gradient_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.dead.device
        self.W, self.step, self.dead = state["W"].to(device), state["step"], state["dead"].to(device)
        self.gradient_evaluations = state["gradient_evaluations"]


def build_flow_dynamics(cfg: Any, net: DeepLinearNetwork, task: Task) -> _FlowDynamics:
    return UpstairsFlow(cfg, net, task) if cfg.optim.name == "flow" else DownstairsFlow(cfg, net, task)
