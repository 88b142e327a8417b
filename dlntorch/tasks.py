"""Energies E(W) → (B,) and their data.

Every task here is a squared error of a linear measurement of W:
    r = 𝒜(W) − y,   E(W) = c Σ_k r_k²,   ∇E(W) = 2c 𝒜*(r),
with c = ½ (half_sum), 1/M (mean) or 1/(2M) (half_mean) for M scalar residuals. So every task
has a closed-form gradient (the fast path and the downstairs flow use it) besides autograd.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .arrays import load_completion_file
from .errors import at_least, fail
from .geometry import haar_semi_orthogonal
from .registry import Registry

# name → Option(build = (cfg.task, generator) -> Task, check = check(cfg)); see build_task
TASKS = Registry("task.name")

LOSS_COEFFICIENTS = {"half_sum": lambda M: 0.5, "mean": lambda M: 1.0 / M, "half_mean": lambda M: 0.5 / M}


class Task:
    """E(W) = c Σ (𝒜(W) − y)²; subclasses give 𝒜, 𝒜* and the unit of a minibatch."""

    name = "task"
    device = torch.device("cpu")   # where the data lives (set by `to`)
    dtype = torch.float64

    def __init__(self, shape: tuple[int, int], loss: str, residuals: int, truth: Tensor | None):
        self.shape = shape
        self.loss = loss
        self.residuals = residuals        # M, the number of scalar residuals
        self.coefficient = LOSS_COEFFICIENTS[loss](residuals)
        self.truth = truth                # ground truth W*, (m, n), where one exists

    # -- the measurement and its adjoint -------------------------------------------
    def residual(self, W: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    # -- energy and gradient --------------------------------------------------------
    def energy(self, W: Tensor, weights: Tensor | None = None) -> Tensor:
        """E(W) per replica, (B,). `weights` (from `minibatch`) reweights residuals for SGD."""
        r = self.residual(W)
        sq = r * r if weights is None else weights * r * r
        return self.coefficient * sq.flatten(1).sum(1)

    def gradient(self, W: Tensor, weights: Tensor | None = None) -> Tensor:
        """∇E(W) = 2c 𝒜*(r), (B, m, n), in closed form."""
        r = self.residual(W)
        if weights is not None:
            r = weights * r
        return (2 * self.coefficient) * self.adjoint(r)

    # -- minibatches ------------------------------------------------------------------
    @property
    def units(self) -> int:
        """How many units (entries, measurements, samples) a minibatch draws from."""
        raise NotImplementedError

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        """(B, units) 0/1 choice → weights broadcastable against the residual."""
        raise NotImplementedError

    def minibatch(self, replicas: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """Independent per-replica draws of `batch_size` units without replacement, weighted
        units/batch_size so that the minibatch energy is an unbiased estimate of E."""
        k = min(batch_size, self.units)
        device = self.device
        keys = torch.rand(replicas, self.units, generator=generator, device=device)
        chosen = torch.zeros(replicas, self.units, dtype=self.dtype, device=device)
        chosen.scatter_(1, keys.topk(k, dim=1, largest=False).indices, self.units / k)
        return self._unit_weights(chosen)

    # -- what the run reports -----------------------------------------------------------
    def test_error(self, W: Tensor) -> Tensor | None:
        """Relative Frobenius error ‖W − W*‖/‖W*‖ where a ground truth exists."""
        if self.truth is None:
            return None
        return relative_error(W, self.truth)

    def observables(self, W: Tensor) -> dict[str, Tensor]:
        """Task-specific observables, each (B,)."""
        error = self.test_error(W)
        return {} if error is None else {"test_error": error}

    def to(self, device: torch.device, dtype: torch.dtype) -> "Task":
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, key, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype))
        self.device, self.dtype = device, dtype
        return self


def relative_error(W: Tensor, truth: Tensor, where: Tensor | None = None) -> Tensor:
    diff, ref = W - truth, truth.expand_as(W)
    if where is not None:
        diff, ref = diff * where, ref * where
    return diff.flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-300)


class Completion(Task):
    """Matrix completion: r = mask ∘ (W − Y) on the observed entries."""

    name = "completion"

    def __init__(self, mask: Tensor, values: Tensor, loss: str, truth: Tensor | None = None):
        mask = mask.to(torch.bool)
        super().__init__(tuple(mask.shape), loss, int(mask.sum()), truth)
        self.mask = mask.to(values.dtype)
        self.values = torch.where(mask, values, torch.zeros_like(values))
        self._observed = mask.flatten().nonzero().squeeze(1)   # flat indices of observed entries

    def residual(self, W: Tensor) -> Tensor:
        return self.mask * (W - self.values)

    def adjoint(self, r: Tensor) -> Tensor:
        return self.mask * r

    @property
    def units(self) -> int:
        return self.residuals

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        weights = torch.zeros(chosen.shape[0], self.shape[0] * self.shape[1], dtype=chosen.dtype, device=chosen.device)
        weights[:, self._observed.to(chosen.device)] = chosen
        return weights.view(-1, *self.shape)

    def test_error(self, W: Tensor) -> Tensor | None:
        """Relative error on the unobserved entries (all entries if every one is observed)."""
        if self.truth is None:
            return None
        hidden = 1 - self.mask
        return relative_error(W, self.truth, hidden if hidden.any() else None)

    def observables(self, W: Tensor) -> dict[str, Tensor]:
        out = super().observables(W)
        if self.truth is not None:
            out["relative_error"] = relative_error(W, self.truth)
        return out


class Seed2x2(Completion):
    """The seed problem: 2x2 completion observing W11 = W22 = 1.

    Zero set {[[1, a], [b, 1]]}; rank-one minimisers on the hyperbola ab = 1.
    """

    name = "seed2x2"

    def __init__(self, loss: str = "half_sum", dtype: torch.dtype = torch.float64):
        eye = torch.eye(2, dtype=dtype)
        super().__init__(eye.bool(), eye, loss)

    def observables(self, W: Tensor) -> dict[str, Tensor]:
        w12, w21 = W[:, 0, 1], W[:, 1, 0]
        return {"hyperbola_distance": (1 - w12 * w21).abs(), "w12": w12, "w21": w21}


class Sensing(Task):
    """Matrix sensing: r_k = ⟨A_k, W⟩ − y_k with Gaussian A_k (entries N(0, 1))."""

    name = "sensing"

    def __init__(self, sensors: Tensor, measurements: Tensor, loss: str, truth: Tensor | None):
        super().__init__(tuple(sensors.shape[1:]), loss, sensors.shape[0], truth)
        self.sensors = sensors            # (M, m, n)
        self.measurements = measurements  # (M,)

    def residual(self, W: Tensor) -> Tensor:
        return torch.einsum("kij,bij->bk", self.sensors, W) - self.measurements

    def adjoint(self, r: Tensor) -> Tensor:
        return torch.einsum("bk,kij->bij", r, self.sensors)

    @property
    def units(self) -> int:
        return self.residuals

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        return chosen


class Regression(Task):
    """Linear regression: r = W X − Y for inputs X (n, S) and targets Y (m, S)."""

    name = "regression"

    def __init__(self, inputs: Tensor, targets: Tensor, loss: str, truth: Tensor | None):
        super().__init__((targets.shape[0], inputs.shape[0]), loss, targets.numel(), truth)
        self.inputs, self.targets = inputs, targets

    def residual(self, W: Tensor) -> Tensor:
        return W @ self.inputs - self.targets

    def adjoint(self, r: Tensor) -> Tensor:
        return r @ self.inputs.mT

    @property
    def units(self) -> int:
        return self.inputs.shape[1]

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        return chosen.unsqueeze(1)   # one weight per sample (column of the residual)


# ------------------------------------------------------------------------------ builders

def low_rank_truth(m: int, n: int, rank: int, generator: torch.Generator) -> Tensor:
    """U V^T with Gaussian factors, scaled to spectral norm 1: the seed problem's scale (its
    target I has s = 1), so one learning rate suits every size (a truth with entries of unit
    size would have σ_1 ~ √(mn) and make GD unstable at the default lr for large matrices)."""
    U = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    V = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    truth = U @ V.T
    return truth / torch.linalg.matrix_norm(truth, ord=2)


def truth_with_spectrum(m: int, n: int, spectrum: list[float], generator: torch.Generator) -> Tensor:
    """U diag(spectrum) V^T with Haar-random orthonormal columns U, V: a ground truth whose singular
    values are prescribed (well-separated ones make incremental learning visible)."""
    r = len(spectrum)
    U = haar_semi_orthogonal(1, m, r, generator=generator, dtype=torch.float64)[0]
    V = haar_semi_orthogonal(1, n, r, generator=generator, dtype=torch.float64)[0]
    return U @ torch.diag(torch.tensor(list(spectrum), dtype=torch.float64)) @ V.T


def uniform_mask(m: int, n: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` entries drawn uniformly without replacement."""
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[torch.randperm(m * n, generator=generator)[:count]] = True
    return mask.view(m, n)


def task_shape(task: Any) -> tuple[int, int]:
    """(m, n) of the task's end-to-end matrix as the config states it (file tasks: from the file)."""
    if task.name == "seed2x2":
        return 2, 2
    if task.shape is not None:
        if len(task.shape) != 2 or any(int(s) < 1 for s in task.shape):
            fail("task.shape", list(task.shape), "it must be [m, n] with m, n ≥ 1")
        return int(task.shape[0]), int(task.shape[1])
    at_least("task.size", task.size, 1)
    return int(task.size), int(task.size)


def _truth(cfg: Any, generator: torch.Generator) -> Tensor:
    """The ground truth W*: rank cfg.rank (low_rank_truth) or singular values cfg.spectrum."""
    m, n = task_shape(cfg)
    return low_rank_truth(m, n, cfg.rank, generator) if cfg.spectrum is None else \
        truth_with_spectrum(m, n, cfg.spectrum, generator)


def _noise(cfg: Any, generator: torch.Generator, *shape: int) -> Tensor:
    return cfg.noise * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _check_truth(cfg: Any) -> None:
    """rank or spectrum of a drawn ground truth fits its m×n matrix."""
    task = cfg.task
    m, n = task_shape(task)
    if task.spectrum is not None:
        spectrum = list(task.spectrum)
        if not spectrum or len(spectrum) > min(m, n) or any(not (math.isfinite(x) and x > 0) for x in spectrum):
            fail("task.spectrum", spectrum, f"it must list between 1 and min(m, n) = {min(m, n)} "
                 "finite singular values > 0")
    else:
        at_least("task.rank", task.rank, 1)
        if task.rank > min(m, n):
            fail("task.rank", task.rank, f"it must be at most min(m, n) = {min(m, n)} for a {m}x{n} matrix")


def _check_completion(cfg: Any) -> None:
    task = cfg.task
    if task.file is not None:
        return
    _check_truth(cfg)
    m, n = task_shape(task)
    at_least("task.observations", task.observations, 1)
    if task.observations > m * n:
        fail("task.observations", task.observations, f"it must be between 1 and the {m * n} entries of a {m}x{n} matrix")


def _check_sensing(cfg: Any) -> None:
    _check_truth(cfg)
    at_least("task.observations", cfg.task.observations, 1)


def _check_regression(cfg: Any) -> None:
    _check_truth(cfg)
    at_least("task.samples", cfg.task.samples, 1)


@TASKS.register("seed2x2")
def _seed2x2(cfg: Any, generator: torch.Generator) -> Task:
    return Seed2x2(cfg.loss)


@TASKS.register("completion", check=_check_completion, reads_files=True)
def _completion(cfg: Any, generator: torch.Generator) -> Task:
    if cfg.file is not None:
        mask, values, truth = load_completion_file(cfg.file)
        return Completion(mask, values, cfg.loss, truth)
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    mask = uniform_mask(m, n, cfg.observations, generator)
    return Completion(mask, truth + _noise(cfg, generator, m, n), cfg.loss, truth)


@TASKS.register("sensing", check=_check_sensing)
def _sensing(cfg: Any, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    sensors = torch.randn(cfg.observations, m, n, generator=generator, dtype=torch.float64)
    measurements = torch.einsum("kij,ij->k", sensors, truth) + _noise(cfg, generator, cfg.observations)
    return Sensing(sensors, measurements, cfg.loss, truth)


@TASKS.register("regression", check=_check_regression)
def _regression(cfg: Any, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    inputs = torch.randn(n, cfg.samples, generator=generator, dtype=torch.float64)
    return Regression(inputs, truth @ inputs + _noise(cfg, generator, m, cfg.samples), cfg.loss, truth)


def build_task(cfg: Any, seed: int) -> Task:
    """The task of `cfg.task`, its data drawn with `seed` (CPU generator: same data on any device)."""
    return TASKS[cfg.name].build(cfg, torch.Generator().manual_seed(seed))
