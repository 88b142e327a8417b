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
from typing import Callable, Sequence

import torch
from torch import Tensor
from torchdiffeq import odeint

from .geometry import Depth, as_depth, is_infinite_depth, metric_operator
from .network import chain, factor_gradients

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


def _solve(rhs: _Counted, state, times: Tensor, method: str, rtol: float, atol: float, step_size):
    """odeint over `times`, returning the states at every time (stacked along a new axis 0).

    Adaptive methods run once over the whole grid (dense output between the times). Fixed-step
    methods run interval by interval with uniform steps of at most step_size (one step per
    interval if None), so every requested time is a step end and never an interpolation.
    """
    if method in ADAPTIVE:
        return odeint(rhs, state, times, method=method, rtol=rtol, atol=atol)
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
    included). method: 'dopri5' (adaptive, tolerances rtol/atol on the mixed RMS error over all
    replicas) or 'rk4' (fixed steps of at most step_size). No autograd graph is recorded.
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
