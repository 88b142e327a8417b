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
    def energy(self, W: Tensor, weights: Tensor | None = None, label_noise: Tensor | None = None) -> Tensor:
        """E(W) per replica, (B,). `weights` (from `minibatch`) reweights residuals for SGD;
        `label_noise` ε (from `label_noise`) shifts the targets y → y + ε."""
        r = self.residual(W) if label_noise is None else self.residual(W) - label_noise
        sq = r * r if weights is None else weights * r * r
        return self.coefficient * sq.flatten(1).sum(1)

    def gradient(self, W: Tensor, weights: Tensor | None = None, label_noise: Tensor | None = None) -> Tensor:
        """∇E(W) = 2c 𝒜*(r), (B, m, n), in closed form (weights and label noise as in `energy`)."""
        r = self.residual(W)
        if label_noise is not None:
            r = r - label_noise
        if weights is not None:
            r = weights * r
        return (2 * self.coefficient) * self.adjoint(r)

    # -- label noise --------------------------------------------------------------------
    @property
    def targets_shape(self) -> tuple[int, ...]:
        """The shape of one replica's residual (one entry per target)."""
        raise NotImplementedError

    def label_noise(self, replicas: int, sigma: float, generator: torch.Generator) -> Tensor:
        """ε = σξ, ξ ~ N(0, 1) independent per replica and target: a fresh draw of noisy labels."""
        return sigma * torch.randn(replicas, *self.targets_shape, generator=generator, device=self.device,
                                   dtype=self.dtype)

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
        keys = torch.rand(replicas, self.units, generator=generator, device=self.device)
        return self.weights_of(keys.topk(k, dim=1, largest=False).indices)

    def weights_of(self, chosen: Tensor) -> Tensor:
        """(B, k) indices of the units in each replica's minibatch → the residuals' weights:
        units/k on the chosen ones, so that each minibatch energy is unbiased for E."""
        replicas, k = chosen.shape
        weights = torch.zeros(replicas, self.units, dtype=self.dtype, device=self.device)
        weights.scatter_(1, chosen, self.units / k)
        return self._unit_weights(weights)

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


class Reshuffled:
    """Minibatches without replacement, by epochs: each replica walks a permutation of the units of
    its own, drawn afresh at the start of every epoch, batch_size units per step (an epoch's last
    batch takes what is left, weighted by its own size). The permutations are argsorts of uniform
    keys, (B, units) in one call: no loop over replicas."""

    def __init__(self, task: Task, replicas: int, batch_size: int):
        self.task, self.replicas, self.batch_size = task, replicas, batch_size
        self.order: Tensor | None = None       # (B, units), this epoch's permutations
        self.position = 0                       # units of this epoch already drawn
        self.epochs = 0                         # epochs begun

    def draw(self, generator: torch.Generator) -> Tensor:
        units = self.task.units
        if self.position == 0:
            keys = torch.rand(self.replicas, units, generator=generator, device=self.task.device)
            self.order = keys.argsort(dim=1)
            self.epochs += 1
        chosen = self.order[:, self.position:self.position + self.batch_size]
        self.position = (self.position + chosen.shape[1]) % units
        return self.task.weights_of(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"order": None if self.order is None else self.order.cpu(), "position": self.position,
                "epochs": self.epochs}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        order = saved["order"]
        self.order = None if order is None else order.to(self.task.device)
        self.position, self.epochs = saved["position"], saved["epochs"]


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
    def targets_shape(self) -> tuple[int, ...]:
        return self.shape

    def label_noise(self, replicas: int, sigma: float, generator: torch.Generator) -> Tensor:
        return self.mask * super().label_noise(replicas, sigma, generator)   # only observed entries are targets

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
    def targets_shape(self) -> tuple[int, ...]:
        return (self.residuals,)

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
    def targets_shape(self) -> tuple[int, ...]:
        return tuple(self.targets.shape)

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


def minibatch_units(task: Any) -> int | None:
    """How many units a minibatch of `cfg.task` draws from, as the config states it (the task's
    registered `units`), or None where that is known only from the data (a file, a task without it)."""
    units = TASKS[task.name].extra.get("units")
    return None if units is None else units(task)


@TASKS.register("seed2x2", units=lambda task: 2)
def _seed2x2(cfg: Any, generator: torch.Generator) -> Task:
    return Seed2x2(cfg.loss)


@TASKS.register("completion", check=_check_completion, reads_files=True,
                units=lambda task: None if task.file is not None else task.observations)
def _completion(cfg: Any, generator: torch.Generator) -> Task:
    if cfg.file is not None:
        mask, values, truth = load_completion_file(cfg.file)
        return Completion(mask, values, cfg.loss, truth)
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    mask = uniform_mask(m, n, cfg.observations, generator)
    return Completion(mask, truth + _noise(cfg, generator, m, n), cfg.loss, truth)


@TASKS.register("sensing", check=_check_sensing, units=lambda task: task.observations)
def _sensing(cfg: Any, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    sensors = torch.randn(cfg.observations, m, n, generator=generator, dtype=torch.float64)
    measurements = torch.einsum("kij,ij->k", sensors, truth) + _noise(cfg, generator, cfg.observations)
    return Sensing(sensors, measurements, cfg.loss, truth)


@TASKS.register("regression", check=_check_regression, units=lambda task: task.samples)
def _regression(cfg: Any, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    inputs = torch.randn(n, cfg.samples, generator=generator, dtype=torch.float64)
    return Regression(inputs, truth @ inputs + _noise(cfg, generator, m, cfg.samples), cfg.loss, truth)


def build_task(cfg: Any, seed: int) -> Task:
    """The task of `cfg.task`, its data drawn with `seed` (CPU generator: same data on any device)."""
    return TASKS[cfg.name].build(cfg, torch.Generator().manual_seed(seed))
