"""Update rules: each written once, as a functional kernel over lists of tensors, and registered
by name (`optim.name`) with its own structured config and its value checks.

A kernel works in place on any layout of the factors — the parameters (B, d_p, d_{p−1}) or the
fast path's replica-last planes (d_p, d_{p−1}, B) — since it only adds and scales tensors of one
shape. The Optimizer's `step()` (the torch.optim / geoopt contract) and the fast path
(`dynamics.step.StepDynamics`) call the same kernel, so the fast path is "the same rule on
another layout". gd and sgd are torch.optim.SGD's own rule (its Optimizer is torch's; the
kernel repeats its ops exactly); momentum, nesterov, adam, adamw and rmsprop are torch.optim's
and have no kernel here; group_rmsprop is ours (one second moment per replica).

Replicas never interact: every rule is elementwise or (group_rmsprop) reduces within one replica,
so what an optimiser keeps is per replica — its docstring says which state. Step-based dynamics
approximate gradient flow in time t = lr × step, or t = Σ_k lr_k under a learning-rate schedule
(`optim.schedule`, built here from torch.optim.lr_scheduler).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer, lr_scheduler

from . import compat
from .errors import at_least, fail, non_negative_finite, positive_finite
from .noise import NOISES, NoiseTerm, View, noise_term, same
from .registry import Registry
from .tasks import minibatch_units

# name → Option(build = (cfg.optim, params, generator) -> Optimizer, check, schema, extra):
# extra["kernel"] = (optimizer, state, grads, draws, view) -> None, the rule for the fast path;
# extra["drift"] = (params, grads, lr, weight_decay) -> new params, its deterministic part out of
# place (run.compile traces it), and extra["noise"] = (optimizer, state, draws, view) -> None the
# rest, added eagerly after the drift (kernel = drift, then noise).
# The exact flows register here too (dynamics/flows.py), with extra["dynamics"].
OPTIMISERS = Registry("optim.name")


# ------------------------------------------------------------------------------ kernels

def sgd_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """torch.optim.SGD without momentum, op for op: g ← g + λW, then W ← W − lr·g, by
    `torch._foreach_add_` (the call SGD makes: foreach on CUDA, on the CPU its per-tensor
    `add_`, the same kernel), so the result is bit-identical given the same gradient."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(params, grads, alpha=-lr)


def langevin_update_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, beta: float,
                     weight_decay: float, noise: NoiseTerm, generator: torch.Generator | None,
                     draws: Sequence[Tensor] | None = None, view: View | None = None,
                     state: dict | None = None) -> None:
    """Unadjusted Langevin: W ← (1 − lr λ) W − lr ∂L/∂W, then the noise term adds
    sqrt(2 lr/β) × its noise (see dlntorch.noise); a `whole_step` term (balanced on d×d factors)
    takes the whole step from the gradients in its own coordinates, keeping `state` (its counts)."""
    if noise.whole_step:
        noise.step_(params, grads, lr, beta, generator, {} if state is None else state)
        return
    for p, g in zip(params, grads):
        if weight_decay:   # W − lr(g + λW) = (1 − lr λ) W − lr g
            p.mul_(1 - lr * weight_decay)
        p.add_(g, alpha=-lr)
    noise.add_(params, math.sqrt(2 * lr / beta), generator, draws, same if view is None else view)


def sgd_drift(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float) -> list[Tensor]:
    """`sgd_update_` out of place, the same ops (g + λW, then W − lr·g): what torch.compile traces
    (dynamics/compiled.py). Traced in place (`torch._foreach_add_` on the compiled function's
    inputs), torch 2.13 compiled a wrong step (a relative error of 1e-3 after one step on the
    planes layout); out of place it matches the eager kernel to rounding. `lr` may be a 0-dim
    tensor (the compiled step's: a float would be a constant compiled in)."""
    if weight_decay:
        grads = [torch.add(g, p, alpha=weight_decay) for p, g in zip(params, grads)]
    return [p - lr * g for p, g in zip(params, grads)]


def langevin_drift(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float) -> list[Tensor]:
    """The drift of `langevin_update_` out of place, the same ops ((1 − lr λ) W − lr ∂L/∂W);
    the noise term is added after it, eagerly (it draws from a generator). See `sgd_drift`."""
    if weight_decay:
        params = [p * (1 - lr * weight_decay) for p in params]
    return [p - lr * g for p, g in zip(params, grads)]


def group_rmsprop_update_(params: Sequence[Tensor], grads: Sequence[Tensor], second_moment: Tensor, lr: float,
                          alpha: float, eps: float, weight_decay: float, replica_axis: int = 0) -> None:
    """RMSprop with one second-moment estimate per replica, shared by all its parameters
    (Arora, Cohen, Hu & Luo 2019): with g_p ← ∂L/∂W_p + λ W_p and P the number of parameters of
    one replica (Σ_p d_p d_{p−1}),

        v_b ← α v_b + (1 − α) Σ_p ‖g_{p,b}‖² / P,      W_{p,b} ← W_{p,b} − lr g_{p,b} / (√v_b + ε).

    `second_moment` is v, shape (B,); the sums run over every axis but `replica_axis`, so one
    replica's step reads only its own gradients (never a reduction across the batch)."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    others = lambda g: [d for d in range(g.ndim) if d != replica_axis]   # noqa: E731
    square = sum(g.pow(2).sum(dim=others(g)) for g in grads)
    per_replica = sum(g.numel() // g.shape[replica_axis] for g in grads)
    second_moment.mul_(alpha).add_(square / per_replica, alpha=1 - alpha)
    scale = second_moment.sqrt().add_(eps)
    for p, g in zip(params, grads):
        shape = [1] * g.ndim
        shape[replica_axis] = -1
        p.addcdiv_(g, scale.view(shape), value=-lr)


# ------------------------------------------------------------------------------ Optimizers

class KernelOptimizer(Optimizer):
    """A torch.optim.Optimizer whose step is one of the kernels above, applied group by group to the
    parameters that have a gradient (the closure protocol of torch.optim, written once here)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.step_group(group, params)
        return loss

    def step_group(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError


class Langevin(KernelOptimizer):
    """Unadjusted Langevin (`langevin_update_`) as a torch.optim.Optimizer.

    noise: a registered noise model (dlntorch.noise, NOISES: each one's SDE is in its docstring):
    "isotropic" — ξ ~ N(0, I) in every factor, stationary law ∝ e^{−βL} — or one that moves along
    the fibres (gl_walk, tangential, fibre_brownian, balanced), for which the parameters must be
    the chain [W_1, …, W_N] in order. `generator` makes the noise reproducible and checkpointable.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, beta: float, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None, noise: str = "isotropic",
                 kappa: float | None = None, singular_threshold: float = 1e-6):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr} must be finite and > 0")
        if not (beta > 0):
            raise ValueError(f"beta={beta} must be > 0")
        if noise not in NOISES:
            raise ValueError(f"noise={noise!r} must be one of {NOISES.names()}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.generator, self.noise = generator, noise
        self.term: NoiseTerm = noise_term(noise, kappa, singular_threshold)
        self.term.check_start([p for group in self.param_groups for p in group["params"]])

    def step_group(self, group: dict, params: list[Tensor]) -> None:
        self.update_(params, [p.grad for p in params], group)

    def update_(self, params, grads, group=None, draws=None, view=None) -> None:
        """The kernel with this optimizer's hyper-parameters and noise (the fast path calls it too)."""
        group = self.param_groups[0] if group is None else group
        langevin_update_(params, grads, group["lr"], group["beta"], group["weight_decay"], self.term,
                         self.generator, draws, view, self.state[params[0]] if self.term.whole_step else None)


class GroupRMSprop(KernelOptimizer):
    """`group_rmsprop_update_` as a torch.optim.Optimizer. Each param group is one network's
    factors with the replica axis first, (B, d_p, d_{p−1}); the state kept is one second moment
    v per replica (B,) for the whole group — not per entry as in RMSprop, never across replicas."""

    def __init__(self, params: Iterable[Tensor], lr: float, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr} must be finite and > 0")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay))

    def step_group(self, group: dict, params: list[Tensor]) -> None:
        state = self.state[group["params"][0]]     # the group's one v, kept with its first factor
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros(params[0].shape[0], dtype=params[0].dtype,
                                                 device=params[0].device)
        group_rmsprop_update_(params, [p.grad for p in params], state["second_moment"], group["lr"],
                              group["alpha"], group["eps"], group["weight_decay"])


# ------------------------------------------------------------------------------ schedules

# name → build(cfg.optim, optimizer, steps) -> LRScheduler | None; stepped once per optimiser step
# over a run of `steps` steps. extra["elapsed"](cfg.optim, S, T) = Σ_{k<S} lr_k in closed form, the
# clock t after S steps of a run of T steps: run.time sets the step budget by it (config.budget)
SCHEDULES = Registry("optim.schedule")


def _constant_elapsed(cfg: Any, S: int, T: int) -> float:
    return cfg.lr * S


def _cosine_elapsed(cfg: Any, S: int, T: int) -> float:
    """(lr/2) Σ_{k<S} (1 + cos(πk/T)), by Σ_{k<S} cos(kθ) = sin(Sθ/2) cos((S−1)θ/2) / sin(θ/2)."""
    theta = math.pi / T
    return cfg.lr / 2 * (S + math.sin(S * theta / 2) * math.cos((S - 1) * theta / 2) / math.sin(theta / 2))


def _step_elapsed(cfg: Any, S: int, T: int) -> float:
    """lr Σ_{k<S} γ^⌊k/s⌋: q whole blocks of s steps, then r steps at γ^q."""
    s, gamma = cfg.decay_every, cfg.decay_factor
    q, r = divmod(S, s)
    blocks = q if gamma == 1 else (1 - gamma ** q) / (1 - gamma)
    return cfg.lr * (s * blocks + r * gamma ** q)


def _warmup_elapsed(cfg: Any, S: int, T: int) -> float:
    """lr Σ_{k<S} min(1, (k + 1)/W)."""
    W = cfg.warmup_steps
    ramp = min(S, W)
    return cfg.lr * (ramp * (ramp + 1) / (2 * W) + max(S - W, 0))


@SCHEDULES.register("constant", elapsed=_constant_elapsed)
def _constant(cfg: Any, optimizer: Optimizer, steps: int) -> None:
    return None                      # lr throughout: t = lr × step, the fast path untouched


@SCHEDULES.register("cosine", elapsed=_cosine_elapsed)
def _cosine(cfg: Any, optimizer: Optimizer, steps: int) -> lr_scheduler.LRScheduler:
    """lr_k = lr (1 + cos(π k / T)) / 2 from optim.lr to 0 over the run's T steps."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)


@SCHEDULES.register("step", elapsed=_step_elapsed)
def _step(cfg: Any, optimizer: Optimizer, steps: int) -> lr_scheduler.LRScheduler:
    """lr_k = lr · decay_factor^⌊k / decay_every⌋."""
    return lr_scheduler.StepLR(optimizer, step_size=cfg.decay_every, gamma=cfg.decay_factor)


@SCHEDULES.register("warmup", elapsed=_warmup_elapsed)
def _warmup(cfg: Any, optimizer: Optimizer, steps: int) -> lr_scheduler.LRScheduler:
    """Linear warm-up, then constant: lr_k = lr · min(1, (k + 1) / warmup_steps)."""
    W = cfg.warmup_steps
    return lr_scheduler.LinearLR(optimizer, start_factor=1 / W, end_factor=1.0, total_iters=max(W - 1, 1))


def steps_to_reach(cfg: Any, time: float) -> int | None:
    """The fewest steps S with Σ_{k<S} lr_k ≥ time under cfg.schedule in a run of S steps (cosine
    spans the run's steps, so t = lr (S + 1)/2 there), or None if the schedule never gets there:
    a decaying step schedule sums to less than lr·s/(1 − γ). The 1e-9·lr keeps the clock's float
    sum from missing `time` by one step (as at constant lr)."""
    elapsed = SCHEDULES[cfg.schedule].extra["elapsed"]
    goal = time - 1e-9 * cfg.lr
    if cfg.schedule == "step" and cfg.decay_factor < 1 and \
            goal >= (1 - 1e-12) * cfg.lr * cfg.decay_every / (1 - cfg.decay_factor):
        return None
    high = 1
    while elapsed(cfg, high, high) < goal:       # t(S) grows with S: doubling, then bisection
        high *= 2
    low = high // 2                              # t(low) < goal ≤ t(high) (or high = 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if elapsed(cfg, middle, middle) < goal else (low, middle)
    return high


def build_schedule(cfg: Any, optimizer: Optimizer, steps: int) -> lr_scheduler.LRScheduler | None:
    """The scheduler of `cfg.optim.schedule` over a run of `steps` steps (None: constant lr)."""
    return SCHEDULES[cfg.get("schedule", "constant")].build(cfg, optimizer, steps)


def schedule_step(scheduler: lr_scheduler.LRScheduler) -> None:
    """One step of the schedule, after one step of the rule. The fast path runs the rule without
    calling optimizer.step(), which torch's first scheduler step would warn about; nothing is
    skipped here (the lr of step k is the one the schedule gives for k)."""
    if scheduler._step_count == 1:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*optimizer.step", category=UserWarning)
            scheduler.step()
    else:
        scheduler.step()


# ------------------------------------------------------------------------------ registered

@dataclass
class StepRule:
    """The keys of every step-based optimiser: its lr, weight decay (g ← g + λW, or decoupled in
    adamw), the learning-rate schedule and label noise."""
    name: str = ""
    lr: float = 0.05
    weight_decay: float = 0.0
    schedule: str = "constant"          # constant | cosine | step | warmup (t = Σ_k lr_k)
    warmup_steps: int = 100             # warmup: lr_k = lr · min(1, (k + 1)/warmup_steps)
    decay_every: int = 1000             # step: lr × decay_factor every decay_every steps
    decay_factor: float = 0.1
    label_noise: float = 0.0            # σ: targets y + σξ, ξ ~ N(0, 1) fresh each step, per replica


@dataclass
class Minibatched(StepRule):
    """… and minibatches: batch_size observed entries / measurements / samples per replica per
    step (None: the full batch), drawn independently each step (replacement=true) or walking a
    fresh permutation per replica per epoch (false)."""
    batch_size: Optional[int] = None
    replacement: bool = True


@dataclass
class GdConfig(StepRule):
    """optim=gd: plain full-batch gradient descent."""
    name: str = "gd"


@dataclass
class SgdConfig(Minibatched):
    """optim=sgd: minibatch SGD."""
    name: str = "sgd"
    batch_size: Optional[int] = 1


@dataclass
class MomentumConfig(Minibatched):
    name: str = "momentum"
    lr: float = 0.01
    momentum: float = 0.9


@dataclass
class NesterovConfig(Minibatched):
    name: str = "nesterov"
    lr: float = 0.01
    momentum: float = 0.9


@dataclass
class AdamConfig(Minibatched):
    name: str = "adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class AdamWConfig(Minibatched):
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2          # decoupled: W ← (1 − lr λ) W before the Adam step
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class RMSpropConfig(Minibatched):
    name: str = "rmsprop"
    lr: float = 1e-3
    alpha: float = 0.99                 # the second moment's smoothing constant
    eps: float = 1e-8


@dataclass
class GroupRMSpropConfig(Minibatched):
    name: str = "group_rmsprop"
    lr: float = 1e-3
    alpha: float = 0.99                 # ρ: v_b ← ρ v_b + (1 − ρ) mean_p ‖g_{p,b}‖²
    eps: float = 1e-8


@dataclass
class LangevinConfig(StepRule):
    name: str = "langevin"
    beta: float = 1e4                   # inverse temperature
    noise: str = "isotropic"            # a registered noise model (dlntorch.noise)
    kappa: Optional[float] = None       # tangential: weight of the normal noise, in [0, 1] (None: 0)
    singular_threshold: float = 1e-6    # balanced (d×d): σ_min(W) below this counts a singular hit


def _check_rule(cfg: Any) -> None:
    """The keys of StepRule (and of Minibatched where the optimiser has them)."""
    optim = cfg.optim
    non_negative_finite("optim.weight_decay", optim.weight_decay)
    non_negative_finite("optim.label_noise", optim.label_noise)
    schedule = SCHEDULES[optim.schedule].name       # unknown: one sentence listing the schedules
    if schedule == "warmup":
        at_least("optim.warmup_steps", optim.warmup_steps, 1)
    if schedule == "step":
        at_least("optim.decay_every", optim.decay_every, 1)
        if not (isinstance(optim.decay_factor, (int, float)) and 0 < optim.decay_factor <= 1):
            fail("optim.decay_factor", optim.decay_factor, "it must be in (0, 1]")
    if schedule != "constant" and cfg.run.time is not None and cfg.run.steps is None and \
            steps_to_reach(optim, cfg.run.time) is None:
        limit = optim.lr * optim.decay_every / (1 - optim.decay_factor)
        fail("run.time", cfg.run.time, f"with optim.schedule=step it must be at most Σ_k lr_k = lr·decay_every/"
             f"(1 − decay_factor) = {limit:g}, all the time that schedule ever takes (or set run.steps)")
    if optim.get("batch_size") is not None:
        at_least("optim.batch_size", optim.batch_size, 1)
        check_batch_size(optim.batch_size, minibatch_units(cfg.task), cfg.task.name)


def check_batch_size(batch_size: int, units: int | None, task: str) -> None:
    """A minibatch draws from the observed units; `units` None: not known before the data is read."""
    if units is not None and batch_size > units:
        fail("optim.batch_size", batch_size, f"it must be at most the {units} observed entries, measurements "
             f"or samples of task={task}")


def _fraction(key: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        fail(key, value, "it must be in [0, 1)")


def _check_momentum(cfg: Any) -> None:
    _check_rule(cfg)
    _fraction("optim.momentum", cfg.optim.momentum)


def _check_nesterov(cfg: Any) -> None:
    _check_rule(cfg)
    if not (isinstance(cfg.optim.momentum, (int, float)) and 0 < cfg.optim.momentum < 1):
        fail("optim.momentum", cfg.optim.momentum, "it must be in (0, 1) for Nesterov momentum")


def _check_adam(cfg: Any) -> None:
    _check_rule(cfg)
    betas = list(cfg.optim.betas)
    if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        fail("optim.betas", betas, "it must be two numbers in [0, 1)")
    if "eps" in cfg.optim:
        positive_finite("optim.eps", cfg.optim.eps)


def _check_rmsprop(cfg: Any) -> None:
    _check_rule(cfg)
    _fraction("optim.alpha", cfg.optim.alpha)
    positive_finite("optim.eps", cfg.optim.eps)


def _check_langevin(cfg: Any) -> None:
    _check_rule(cfg)
    positive_finite("optim.beta", cfg.optim.beta)
    noise = NOISES[cfg.optim.noise]
    non_negative_finite("optim.singular_threshold", cfg.optim.singular_threshold)
    if cfg.optim.kappa is not None and cfg.optim.noise != "tangential":
        fail("optim.kappa", cfg.optim.kappa, "it mixes normal noise into optim.noise=tangential only")
    if noise.check is not None:
        noise.check(cfg)


def _sgd_kernel(optimizer: Optimizer, state, grads, draws=None, view=None) -> None:
    group = optimizer.param_groups[0]
    sgd_update_(state, grads, group["lr"], group["weight_decay"])


def _langevin_kernel(optimizer: Langevin, state, grads, draws=None, view=None) -> None:
    optimizer.update_(state, grads, draws=draws, view=view)


def _langevin_noise(optimizer: Langevin, state, draws=None, view=None) -> None:
    """What `_langevin_kernel` adds after its drift: the noise term's sqrt(2 lr/β) × its noise."""
    group = optimizer.param_groups[0]
    optimizer.term.add_(state, math.sqrt(2 * group["lr"] / group["beta"]), optimizer.generator, draws,
                        same if view is None else view)


@OPTIMISERS.register("gd", schema=GdConfig, check=_check_rule, kernel=_sgd_kernel, drift=sgd_drift)
def _gd(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """State: none."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)


OPTIMISERS.register("sgd", schema=SgdConfig, check=_check_rule, kernel=_sgd_kernel, drift=sgd_drift)(_gd)


@OPTIMISERS.register("momentum", schema=MomentumConfig, check=_check_momentum)
def _momentum(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """State: a momentum buffer per entry (so per replica)."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMISERS.register("nesterov", schema=NesterovConfig, check=_check_nesterov)
def _nesterov(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """torch.optim.SGD(nesterov=True): b ← μ b + g, W ← W − lr (g + μ b). State: the buffer b per
    entry (so per replica)."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, nesterov=True,
                           weight_decay=cfg.weight_decay)


@OPTIMISERS.register("adam", schema=AdamConfig, check=_check_adam)
def _adam(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """State: first and second moments per entry (so per replica); the step count is shared, as
    all replicas step together."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@OPTIMISERS.register("adamw", schema=AdamWConfig, check=_check_adam)
def _adamw(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """torch.optim.AdamW, decoupled weight decay W ← (1 − lr λ) W. State: as adam's."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMISERS.register("rmsprop", schema=RMSpropConfig, check=_check_rmsprop)
def _rmsprop(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """torch.optim.RMSprop: v ← α v + (1 − α) g², W ← W − lr g/(√v + ε), entry by entry. State: v
    per entry (so per replica)."""
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMISERS.register("group_rmsprop", schema=GroupRMSpropConfig, check=_check_rmsprop)
def _group_rmsprop(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """GroupRMSprop: one v per replica, shared by all its factors (see group_rmsprop_update_)."""
    return GroupRMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMISERS.register("langevin", schema=LangevinConfig, check=_check_langevin, kernel=_langevin_kernel,
                     drift=langevin_drift, noise=_langevin_noise)
def _langevin(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """State: none but the generator (checkpointed by the dynamics)."""
    return Langevin(params, lr=cfg.lr, beta=cfg.beta, weight_decay=cfg.weight_decay, generator=generator,
                    noise=cfg.noise, kappa=cfg.kappa, singular_threshold=cfg.singular_threshold)


def build_optimizer(cfg: Any, params: list[Tensor], generator: torch.Generator | None) -> Optimizer:
    """The Optimizer of `cfg.optim` (step-based dynamics only)."""
    option = OPTIMISERS[cfg.name]
    compat.defer_dynamo_import()     # building torch.optim's Optimizer imports torch._dynamo otherwise
    if "dynamics" in option.extra:
        raise ValueError(f"optim.name={cfg.name!r} is not a step-based optimizer")
    return option.build(cfg, params, generator)


def fast_kernel(optimizer: Optimizer, name: str) -> Callable | None:
    """The registered kernel the fast path may call for this optimizer, or None (torch.optim's
    own step): only where the kernel runs on any layout (a fibre noise term does not)."""
    kernel = OPTIMISERS[name].extra.get("kernel")
    if kernel is None or not getattr(getattr(optimizer, "term", None), "any_layout", True):
        return None
    return kernel
