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

from .arrays import load_completion_file, load_sensing_file
from .errors import at_least, fail
from .geometry import haar_semi_orthogonal
from .registry import Registry
from .tiny import axis_sum

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
        self.count(residuals)
        self.truth = truth                # ground truth W*, (m, n), where one exists
        self.schedule: Schedule | None = None   # task.schedule: the observed set changes at given steps

    def count(self, residuals: int) -> None:
        """M, the number of scalar residuals, and the loss coefficient c that depends on it."""
        self.residuals = residuals
        self.coefficient = LOSS_COEFFICIENTS[self.loss](residuals)

    # -- a schedule of observed sets (task.schedule) ------------------------------------
    def follow_schedule(self, step: int) -> bool:
        """Observe the set the schedule names for `step` (the latest entry with at ≤ step);
        True when that changed the task. The phase is a function of the step alone, so a
        resumed run restores it from its step."""
        if self.schedule is None or self.schedule.count_at(step) == self.residuals:
            return False
        self.observe_first(self.schedule.count_at(step))
        return True

    def observe_first(self, count: int) -> None:
        """Observe the first `count` units of the task's one random order (nested prefixes)."""
        raise NotImplementedError(f"task.name={self.name!r} has no schedule of observed sets")

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
        return self.coefficient * axis_sum(sq.flatten(1))

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
        out = {} if error is None else {"test_error": error}
        if self.schedule is not None:      # the observed set's size, so the switch shows in every record
            out["observations"] = torch.full(W.shape[:1], float(self.residuals), dtype=W.dtype, device=W.device)
        return out

    def to(self, device: torch.device, dtype: torch.dtype) -> Task:
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

    def scheduled(self, schedule: Schedule, order: Tensor, values: Tensor) -> Completion:
        """Follow `schedule`: its sets are the prefixes of `order` (a permutation of the flat
        entries), the values of every entry `values` (m, n)."""
        self.schedule, self._order, self._all_values = schedule, order, values
        return self

    def observe_first(self, count: int) -> None:
        # in place: anything holding the mask or the values (a captured CUDA graph) sees the switch
        mask = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.mask.device)
        mask[self._order[:count].to(mask.device)] = True
        mask = mask.view(self.shape)
        self.mask.copy_(mask)
        self.values.copy_(torch.where(mask, self._all_values, torch.zeros_like(self._all_values)))
        self._observed = mask.flatten().nonzero().squeeze(1)
        self.count(count)

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
        elif bool((self.mask == 0).any()):   # no truth to compare with: how large the unobserved part grew
            out["hidden_norm"] = ((1 - self.mask) * W).flatten(1).norm(dim=1)
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
        self.active: Tensor | None = None  # scheduled: 1 on the measurements used so far, else 0

    def scheduled(self, schedule: Schedule) -> Sensing:
        """Follow `schedule`: its sets are the first k of the measurements (drawn i.i.d., so
        their order is already random)."""
        self.schedule = schedule
        self.active = torch.ones_like(self.measurements)
        self.follow_schedule(0)
        return self

    def observe_first(self, count: int) -> None:
        self.active.copy_((torch.arange(self.active.shape[0], device=self.active.device) < count).to(self.active.dtype))
        self.count(count)

    def residual(self, W: Tensor) -> Tensor:
        r = torch.einsum("kij,bij->bk", self.sensors, W) - self.measurements
        return r if self.active is None else self.active * r

    def adjoint(self, r: Tensor) -> Tensor:
        return torch.einsum("bk,kij->bij", r, self.sensors)

    @property
    def targets_shape(self) -> tuple[int, ...]:
        return (self.residuals,)

    @property
    def units(self) -> int:
        return self.residuals

    def _unit_weights(self, chosen: Tensor) -> Tensor:
        # scheduled: the units are the first `residuals` measurements, the rest weigh 0
        return chosen if chosen.shape[1] == self.sensors.shape[0] else \
            torch.nn.functional.pad(chosen, (0, self.sensors.shape[0] - chosen.shape[1]))


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

def low_rank_truth(m: int, n: int, rank: int, generator: torch.Generator, normalise: str = "spectral",
                   scale: float = 1.0) -> Tensor:
    """U V^T with Gaussian factors, scaled to spectral norm `scale` (default 1: the seed problem's
    scale, its target I has s = 1, so one learning rate suits every size; a truth with entries of
    unit size would have σ_1 ~ √(mn) and make GD unstable at the default lr for large matrices),
    or to Frobenius norm `scale` (normalise="frobenius": Arora et al. 2019's convention, scale 100)."""
    U = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    V = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    truth = U @ V.T
    return scale * truth / torch.linalg.matrix_norm(truth, ord=2 if normalise == "spectral" else "fro")


def truth_with_spectrum(m: int, n: int, spectrum: list[float], generator: torch.Generator) -> Tensor:
    """U diag(spectrum) V^T with Haar-random orthonormal columns U, V: a ground truth whose singular
    values are prescribed (well-separated ones make incremental learning visible)."""
    r = len(spectrum)
    U = haar_semi_orthogonal(1, m, r, generator=generator, dtype=torch.float64)[0]
    V = haar_semi_orthogonal(1, n, r, generator=generator, dtype=torch.float64)[0]
    return U @ torch.diag(torch.tensor(list(spectrum), dtype=torch.float64)) @ V.T


def uniform_mask(m: int, n: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` entries drawn uniformly without replacement (the first `count` of `entry_order`)."""
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[entry_order(m, n, generator)[:count]] = True
    return mask.view(m, n)


def entry_order(m: int, n: int, generator: torch.Generator) -> Tensor:
    """One uniformly random order of the m·n flat entries: its prefixes are nested observed sets."""
    return torch.randperm(m * n, generator=generator)


# ------------------------------------------------------------------------------ schedules

class Schedule:
    """task.schedule = [{at: 0, observations: k_0}, {at: s_1, observations: k_1}, …]: from step
    s_i on the task observes k_i units (entries, measurements), the first k_i of one random order,
    so each set contains the ones before it. The switch at s_i happens once the step count reaches
    s_i, before the stop test and the logged row of that step: the energy logged at s_i is already
    the larger set's."""

    def __init__(self, steps: list[int], counts: list[int]):
        self.steps, self.counts = steps, counts

    @classmethod
    def of(cls, entries: Any) -> Schedule | None:
        if entries is None:
            return None
        return cls([int(e["at"]) for e in entries], [int(e["observations"]) for e in entries])

    @property
    def switches(self) -> list[int]:
        """The steps at which the observed set changes (the first entry's at = 0 is the start)."""
        return self.steps[1:]

    @property
    def largest(self) -> int:
        return self.counts[-1]

    def count_at(self, step: int) -> int:
        return self.counts[max(i for i, at in enumerate(self.steps) if at <= step)]

    def record(self, time) -> list[dict[str, Any]]:
        """The switches as summary.json records them: step, t = time(step) and the count."""
        return [{"at": at, "t": time(at), "observations": k} for at, k in zip(self.steps, self.counts)]


def _check_schedule(cfg: Any, units: int | None, unit: str) -> None:
    """task.schedule: entries {at, observations}, at starting at 0 and increasing, the counts
    nested (non-decreasing) and at most `units` (None: no bound)."""
    schedule, key = cfg.task.schedule, "task.schedule"
    if schedule is None:
        return
    if cfg.task.file is not None:
        fail(key, schedule, "a schedule draws its nested sets from generated data, not from task.file")
    entries = list(schedule)
    if not entries or any(not hasattr(e, "keys") or set(e.keys()) != {"at", "observations"} for e in entries):
        fail(key, schedule, "it must be a non-empty list of {at: step, observations: count} entries")
    steps, counts = [e["at"] for e in entries], [e["observations"] for e in entries]
    if any(not isinstance(v, int) or isinstance(v, bool) for v in steps + counts):
        fail(key, schedule, "every at and observations must be an integer")
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        fail(key, schedule, f"its times at={steps} must start at 0 and increase strictly")
    if counts[0] < 1 or any(b < a for a, b in zip(counts, counts[1:])):
        fail(key, schedule, f"its sets must be nested, each containing the one before, so the counts "
             f"observations={counts} must be ≥ 1 and never decrease")
    if units is not None and counts[-1] > units:
        fail(key, schedule, f"its largest set ({counts[-1]} {unit}) exceeds the {units} {unit} of the matrix")


def _no_schedule(cfg: Any) -> None:
    if cfg.task.schedule is not None:
        scheduled = [name for name, option in TASKS.options.items() if option.extra.get("schedules")]
        fail("task.schedule", cfg.task.schedule, f"task={cfg.task.name} has no schedule of observed sets; "
             "only " + " and ".join(f"task={name}" for name in scheduled) + " have")


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
    return low_rank_truth(m, n, cfg.rank, generator, cfg.normalise, cfg.scale) if cfg.spectrum is None else \
        truth_with_spectrum(m, n, cfg.spectrum, generator)


def _noise(cfg: Any, generator: torch.Generator, *shape: int) -> Tensor:
    return cfg.noise * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _check_truth(cfg: Any) -> None:
    """rank or spectrum of a drawn ground truth fits its m×n matrix; its normalisation."""
    task = cfg.task
    m, n = task_shape(task)
    if task.normalise not in ("spectral", "frobenius"):
        fail("task.normalise", task.normalise, "choose one of spectral, frobenius")
    if not (math.isfinite(task.scale) and task.scale > 0):
        fail("task.scale", task.scale, "it must be a finite number > 0")
    if task.spectrum is not None:
        spectrum = list(task.spectrum)
        if not spectrum or len(spectrum) > min(m, n) or any(not (math.isfinite(x) and x > 0) for x in spectrum):
            fail("task.spectrum", spectrum, f"it must list between 1 and min(m, n) = {min(m, n)} "
                 "finite singular values > 0")
    else:
        at_least("task.rank", task.rank, 1)
        if task.rank > min(m, n):
            fail("task.rank", task.rank, f"it must be at most min(m, n) = {min(m, n)} for a {m}x{n} matrix")


def listed_entries(task: Any) -> tuple[Tensor, Tensor]:
    """task.entries [[i, j, value], …] → (flat indices in the listed order, values)."""
    m, n = task_shape(task)
    rows = [list(e) for e in task.entries]
    bad = [e for e in rows if len(e) != 3 or not all(float(x).is_integer() for x in e[:2])
           or not (0 <= e[0] < m and 0 <= e[1] < n) or not math.isfinite(e[2])]
    if not rows or bad:
        fail("task.entries", task.entries, f"it must list [i, j, value] with 0 ≤ i < {m}, 0 ≤ j < {n} and a "
             f"finite value (the first bad one: {bad[0] if bad else None})")
    flat = torch.tensor([int(i) * n + int(j) for i, j, _ in rows])
    if flat.unique().numel() != flat.numel():
        fail("task.entries", task.entries, "it must list every entry at most once")
    return flat, torch.tensor([float(v) for _, _, v in rows], dtype=torch.float64)


def _check_completion(cfg: Any) -> None:
    task = cfg.task
    if task.entries is not None:
        if task.file is not None:
            fail("task.entries", task.entries, "give the observed entries either here or in task.file, not both")
        _check_schedule(cfg, len(listed_entries(task)[0]), "listed entries")
        return
    _check_schedule(cfg, None if task.file is not None else math.prod(task_shape(task)), "entries")
    if task.file is not None:
        return
    _check_truth(cfg)
    m, n = task_shape(task)
    if task.schedule is not None:
        return          # the schedule's counts replace task.observations
    at_least("task.observations", task.observations, 1)
    if task.observations > m * n:
        fail("task.observations", task.observations,
             f"it must be between 1 and the {m * n} entries of a {m}x{n} matrix")


def _check_sensing(cfg: Any) -> None:
    _check_schedule(cfg, None, "measurements")
    if cfg.task.file is not None:
        return          # its shapes are checked when it is read (arrays.load_sensing_file)
    _check_truth(cfg)
    if cfg.task.schedule is None:
        at_least("task.observations", cfg.task.observations, 1)


def _check_regression(cfg: Any) -> None:
    _no_schedule(cfg)
    _check_truth(cfg)
    at_least("task.samples", cfg.task.samples, 1)


def minibatch_units(task: Any) -> int | None:
    """How many units a minibatch of `cfg.task` draws from, as the config states it (the task's
    registered `units`), or None where that is known only from the data (a file, a task without it)."""
    units = TASKS[task.name].extra.get("units")
    return None if units is None else units(task)


@TASKS.register("seed2x2", check=_no_schedule, units=lambda task: 2)
def _seed2x2(cfg: Any, generator: torch.Generator) -> Task:
    return Seed2x2(cfg.loss)


@TASKS.register("completion", check=_check_completion, reads_files=True, schedules=True,
                units=lambda task: None if task.file is not None else task.observations)
def _completion(cfg: Any, generator: torch.Generator) -> Task:
    if cfg.file is not None:
        mask, values, truth = load_completion_file(cfg.file)
        return Completion(mask, values, cfg.loss, truth)
    m, n = task_shape(cfg)
    schedule = Schedule.of(cfg.schedule)
    if cfg.entries is not None:      # listed: a schedule's sets are prefixes of the list
        order, listed = listed_entries(cfg)
        values = torch.zeros(m * n, dtype=torch.float64)
        values[order] = listed
        mask = torch.zeros(m * n, dtype=torch.bool)
        mask[order[:len(order) if schedule is None else schedule.counts[0]]] = True
        task = Completion(mask.view(m, n), values.view(m, n), cfg.loss)
        return task if schedule is None else task.scheduled(schedule, order, values.view(m, n))
    truth = _truth(cfg, generator)
    # the same draws as without a schedule: its first set is the mask of observations = k_0
    order = entry_order(m, n, generator)
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[order[:cfg.observations if schedule is None else schedule.counts[0]]] = True
    values = truth + _noise(cfg, generator, m, n)
    task = Completion(mask.view(m, n), values, cfg.loss, truth)
    return task if schedule is None else task.scheduled(schedule, order, values)


@TASKS.register("sensing", check=_check_sensing, reads_files=True, schedules=True,
                units=lambda task: None if task.file is not None else task.observations)
def _sensing(cfg: Any, generator: torch.Generator) -> Task:
    schedule = Schedule.of(cfg.schedule)
    if cfg.file is not None:
        sensors, measurements, truth = load_sensing_file(cfg.file)
        return Sensing(sensors, measurements, cfg.loss, truth)
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    K = cfg.observations if schedule is None else schedule.largest
    sensors = torch.randn(K, m, n, generator=generator, dtype=torch.float64)
    measurements = torch.einsum("kij,ij->k", sensors, truth) + _noise(cfg, generator, K)
    task = Sensing(sensors, measurements, cfg.loss, truth)
    return task if schedule is None else task.scheduled(schedule)


@TASKS.register("regression", check=_check_regression, units=lambda task: task.samples)
def _regression(cfg: Any, generator: torch.Generator) -> Task:
    m, n = task_shape(cfg)
    truth = _truth(cfg, generator)
    inputs = torch.randn(n, cfg.samples, generator=generator, dtype=torch.float64)
    return Regression(inputs, truth @ inputs + _noise(cfg, generator, m, cfg.samples), cfg.loss, truth)


def build_task(cfg: Any, seed: int) -> Task:
    """The task of `cfg.task`, its data drawn with `seed` (CPU generator: same data on any device)."""
    return TASKS[cfg.name].build(cfg, torch.Generator().manual_seed(seed))
