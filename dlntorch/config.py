"""The configuration schema: structured dataclasses registered in Hydra's ConfigStore.

Hydra checks key names and types against these classes (a typo or a wrong type fails at
start-up with Hydra's own message). `validate` checks the values, before any compute, and
raises `ConfigError` with one sentence naming the key, the value and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

TASKS = ("seed2x2", "completion", "sensing", "regression")
INITS = ("gaussian", "balanced", "orthogonal", "identity", "unbalanced", "file")
OPTIMS = ("gd", "sgd", "momentum", "adam", "langevin", "flow", "downstairs")
LOSSES = ("half_sum", "mean", "half_mean")
DTYPES = ("float64", "float32")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value outside what is allowed; the message is one sentence."""


@dataclass
class TaskConfig:
    name: str = "seed2x2"
    size: int = 2                       # square ground truth size×size …
    shape: Optional[list[int]] = None   # … or [m, n] (overrides size)
    rank: int = 1                       # rank of the ground truth
    spectrum: Optional[list[float]] = None  # its singular values (overrides rank and the scaling)
    observations: int = 2               # observed entries (completion) / measurements (sensing)
    samples: int = 100                  # regression: number of input samples
    noise: float = 0.0                  # std of additive noise on observed values
    loss: str = "half_sum"              # half_sum: ½Σr², mean: Σr²/M, half_mean: Σr²/(2M)
    file: Optional[str] = None          # completion from a .npz/.pt with `mask` and `values`
    seed: Optional[int] = None          # data seed; None derives it from the top-level seed


@dataclass
class ModelConfig:
    depth: Optional[int] = None         # N; None means len(widths) − 1, or 3
    widths: Optional[list[int]] = None  # [d_0, …, d_N]; None: hidden widths max(d_0, d_N)


@dataclass
class InitConfig:
    name: str = "gaussian"
    scale: float = 1e-2
    scale_of: str = "layer"             # layer: per-layer std; product: typical product entry
    imbalance: float = 1.0              # unbalanced: the requested ‖G‖ (total Frobenius norm)
    file: Optional[str] = None          # file: factors or products from a .pt/.npz (see init.from_file)
    seed: Optional[int] = None          # None derives it from the top-level seed


@dataclass
class OptimConfig:
    name: str = "gd"
    lr: float = 0.05
    weight_decay: float = 0.0
    beta: float = 1e4                   # langevin: inverse temperature
    noise: str = "isotropic"            # langevin: isotropic (every entry) | fibre (along the fibres only)
    momentum: float = 0.9               # momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    batch_size: int = 1                 # sgd: observed entries / measurements / samples per step
    # exact flows (optim=flow | downstairs)
    method: str = "dopri5"              # dopri5 (adaptive) | rk4 (fixed step = lr)
    rtol: float = 1e-10
    atol: float = 1e-12
    depth: Optional[str] = None         # downstairs: N as an int or "inf"; None = model depth
    time_scale: str = "auto"            # downstairs: raw (t) | per_depth (τ = N t) | auto (per_depth at N = inf)
    compare_downstairs: bool = False    # flow: integrate the downstairs flow alongside


@dataclass
class RunConfig:
    steps: int = 20000
    time: Optional[float] = None        # stop at t = lr·step ≥ time
    stop_energy: float = 1e-10          # stop once every live replica has E below this
    stop_check_every: int = 100         # steps between stop tests (a host sync each)
    log_points: int = 200               # most logged times (half evenly, half log-spaced)
    log_replicas: int = 4               # replicas logged individually to TensorBoard
    gradient: str = "auto"              # auto | closed_form | autograd
    rank_tol: float = 1e-6              # numerical rank: s_i > rank_tol · s_1
    rank_one_tol: float = 1.2           # "near rank one": effective rank below this
    checkpoint_every: int = 0           # steps between checkpoints (0: only at the end)
    checkpoint_minutes: float = 10.0    # wall-time between checkpoints
    on_divergence: str = "freeze"       # freeze (count it) | error
    cuda_graphs: bool = False           # plain gd on CUDA: replay captured steps (launch-bound tiny matrices)
    progress: bool = True               # tqdm bar on runs longer than a few seconds
    out_dir: Optional[str] = None       # None: Hydra's run dir (or ./outputs/<time> from Python)
    # what a researcher reads afterwards (TensorBoard's tags, the state in trajectory.npz)
    tb_tags: str = "headline"           # headline (what the custom-scalars charts need) | all
    sigma_k: int = 8                    # singular values logged as sigma_1..sigma_k (capped at min(m, n))
    histogram_points: int = 32          # logged times with distribution/<name> histograms (0: none)
    save_product: Any = "auto"          # product W in trajectory.npz: auto (m·n ≤ 64) | true | false
    save_factors: bool = False          # factors W_p in trajectory.npz (T, B, d_p, d_{p-1})
    log_entries: list[list[int]] = field(default_factory=list)   # [[i, j], …] 1-based: w_ij = W[i-1, j-1]


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    replicas: int = 256
    seed: int = 0
    dtype: str = "float64"
    device: str = "auto"
    resume: bool = False
    threads: Optional[int] = None       # torch threads; None: torch's default (launchers set it)
    experiment: Optional[str] = None    # name of the preset, for the record
    tags: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """The top-level schema types the whole tree, so every group's yaml merges into it."""
    ConfigStore.instance().store(name="schema", node=Config)


register()


# --------------------------------------------------------------------------- values

def _show(value: Any) -> str:
    """A value as the user typed it: 0 not 0.0, 'text' quoted, lists plain."""
    if isinstance(value, float):
        return f"{value:g}"
    if not isinstance(value, str) and hasattr(value, "__iter__"):   # lists, ListConfig
        return str(list(value))
    return repr(value)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={_show(value)} is not allowed: {allowed}.")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, "choose one of " + ", ".join(choices))


def _positive_finite(key: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        _fail(key, value, "it must be a finite number > 0")


def _at_least(key: str, value: Any, low: int) -> None:
    if not (isinstance(value, int) and value >= low):
        _fail(key, value, f"it must be an integer ≥ {low}")


def task_shape(task: Any) -> tuple[int, int]:
    """(m, n) of the task's end-to-end matrix as the config states it (file tasks: from the file)."""
    if task.name == "seed2x2":
        return 2, 2
    if task.shape is not None:
        if len(task.shape) != 2 or any(int(s) < 1 for s in task.shape):
            _fail("task.shape", list(task.shape), "it must be [m, n] with m, n ≥ 1")
        return int(task.shape[0]), int(task.shape[1])
    _at_least("task.size", task.size, 1)
    return int(task.size), int(task.size)


def resolve_depth(model: Any) -> int:
    if model.widths is not None:
        depth = len(model.widths) - 1
        if model.depth is not None and model.depth != depth:
            _fail("model.depth", model.depth,
                  f"it must match model.widths={list(model.widths)} (depth {depth}) or be left unset")
        return depth
    return 3 if model.depth is None else int(model.depth)


def parse_depth(value: Any) -> float:
    """optim.depth: an integer ≥ 1 or 'inf'."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        depth = int(value)
    except (TypeError, ValueError):
        depth = 0
    if depth < 1 or str(value).strip() not in (str(depth), f"{depth}.0"):
        _fail("optim.depth", value, "it must be an integer ≥ 1 or inf")
    return depth


def as_config(cfg: Any) -> DictConfig:
    """Any of Config, dict or DictConfig → a DictConfig typed by the schema (typos fail here)."""
    schema = OmegaConf.structured(Config)
    return OmegaConf.merge(schema, cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
                           if not isinstance(cfg, Config) else OmegaConf.structured(cfg))


def derive_seeds(cfg: DictConfig) -> dict[str, int]:
    """Independent seeds for the task data, the initial condition and the dynamics' noise, all
    derived from `seed` (task.seed / init.seed override theirs, e.g. to fix the data of a sweep)."""
    task, init, dynamics = np.random.SeedSequence(cfg.seed).generate_state(3, dtype=np.uint32).tolist()
    return {"seed": cfg.seed,
            "task": task if cfg.task.seed is None else cfg.task.seed,
            "init": init if cfg.init.seed is None else cfg.init.seed,
            "dynamics": dynamics}


def total_steps(cfg: DictConfig) -> int:
    """run.steps, or fewer when run.time = lr·step comes first."""
    steps = cfg.run.steps
    if cfg.run.time is not None:
        steps = min(steps, max(1, math.ceil(cfg.run.time / cfg.optim.lr - 1e-9)))
    return int(steps)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (dicts) as {"dotted.key": value} for its leaves."""
    out: dict[str, Any] = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# what a run dir holds (see README, "Outputs of a run")
CHECKPOINT, SUMMARY, TRAJECTORY, EVENTS = "checkpoint.pt", "summary.json", "trajectory.npz", "tb"


def run_dir(cfg: Any) -> Path | None:
    """Where the run writes: run.out_dir, else Hydra's run dir, else None (called from Python)."""
    if cfg.run.out_dir is not None:
        return Path(cfg.run.out_dir)
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def validate(cfg: Any) -> None:
    """Every value check that can be made before compute. Raises ConfigError."""
    _at_least("replicas", cfg.replicas, 1)
    _one_of("dtype", cfg.dtype, DTYPES)
    _one_of("device", cfg.device, DEVICES)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        _fail("seed", cfg.seed, "it must be an integer ≥ 0")
    if cfg.threads is not None:
        _at_least("threads", cfg.threads, 1)

    task = cfg.task
    _one_of("task.name", task.name, TASKS)
    _one_of("task.loss", task.loss, LOSSES)
    if task.noise < 0 or not math.isfinite(task.noise):
        _fail("task.noise", task.noise, "it must be a finite number ≥ 0")
    if task.file is None:
        m, n = task_shape(task)
        if task.name in ("completion", "sensing", "regression") and task.spectrum is not None:
            spectrum = list(task.spectrum)
            if not spectrum or len(spectrum) > min(m, n) or any(not (math.isfinite(x) and x > 0) for x in spectrum):
                _fail("task.spectrum", spectrum, f"it must list between 1 and min(m, n) = {min(m, n)} "
                      "finite singular values > 0")
        elif task.name in ("completion", "sensing", "regression"):
            _at_least("task.rank", task.rank, 1)
            if task.rank > min(m, n):
                _fail("task.rank", task.rank, f"it must be at most min(m, n) = {min(m, n)} for a {m}x{n} matrix")
        if task.name == "completion":
            _at_least("task.observations", task.observations, 1)
            if task.observations > m * n:
                _fail("task.observations", task.observations,
                      f"it must be between 1 and the {m * n} entries of a {m}x{n} matrix")
        if task.name == "sensing":
            _at_least("task.observations", task.observations, 1)
        if task.name == "regression":
            _at_least("task.samples", task.samples, 1)
    elif task.name != "completion":
        _fail("task.file", task.file, "a data file is read only by task=completion")

    model = cfg.model
    if model.depth is not None:
        _at_least("model.depth", model.depth, 1)
    if model.widths is not None:
        widths = list(model.widths)
        if len(widths) < 2:
            _fail("model.widths", widths, "it must list [d_0, …, d_N] with at least two widths")
        if any(not isinstance(w, int) or w <= 0 for w in widths):
            _fail("model.widths", widths, "every width must be an integer ≥ 1")
        if task.file is None:
            m, n = task_shape(task)
            if widths[0] != n or widths[-1] != m:
                _fail("model.widths", widths,
                      f"its ends must match the task's {m}x{n} matrix: d_0 = {n} and d_N = {m}")
    resolve_depth(model)

    init = cfg.init
    _one_of("init.name", init.name, INITS)
    _positive_finite("init.scale", init.scale)
    _one_of("init.scale_of", init.scale_of, ("layer", "product"))
    if init.name == "file" and init.file is None:
        _fail("init.file", None, "init=file needs the path of a .pt or .npz holding the factors or the products")
    if init.name == "unbalanced":
        if not (math.isfinite(init.imbalance) and init.imbalance >= 0):
            _fail("init.imbalance", init.imbalance, "it must be a finite number ≥ 0")
        if resolve_depth(model) < 2 and init.imbalance > 0:
            _fail("init.imbalance", init.imbalance, "depth 1 has no balancedness, so it must be 0")

    optim = cfg.optim
    _one_of("optim.name", optim.name, OPTIMS)
    _positive_finite("optim.lr", optim.lr)
    if not (math.isfinite(optim.weight_decay) and optim.weight_decay >= 0):
        _fail("optim.weight_decay", optim.weight_decay, "it must be a finite number ≥ 0")
    if optim.name == "langevin":
        _positive_finite("optim.beta", optim.beta)
        _one_of("optim.noise", optim.noise, ("isotropic", "fibre"))
        if optim.noise == "fibre" and resolve_depth(model) < 2:
            _fail("optim.noise", optim.noise, "depth 1 has no fibre to move along; use depth ≥ 2 or isotropic")
    if optim.name == "momentum" and not (0 <= optim.momentum < 1):
        _fail("optim.momentum", optim.momentum, "it must be in [0, 1)")
    if optim.name == "adam" and not (len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas)):
        _fail("optim.betas", list(optim.betas), "it must be two numbers in [0, 1)")
    if optim.name == "sgd":
        _at_least("optim.batch_size", optim.batch_size, 1)
    if optim.name in ("flow", "downstairs"):
        _one_of("optim.method", optim.method, ("dopri5", "rk4"))
        _positive_finite("optim.rtol", optim.rtol)
        _positive_finite("optim.atol", optim.atol)
        _one_of("optim.time_scale", optim.time_scale, ("auto", "raw", "per_depth"))
        if optim.depth is not None and parse_depth(optim.depth) == math.inf and optim.time_scale == "raw":
            _fail("optim.time_scale", optim.time_scale,
                  "optim.depth=inf needs per_depth (rescaled time τ = N t; A_N grows like N)")
        if optim.compare_downstairs and not (init.name == "balanced"
                                             or (init.name == "unbalanced" and init.imbalance == 0)):
            _fail("optim.compare_downstairs", True,
                  f"it needs a balanced start (init=balanced), not init={init.name}, since only balanced "
                  "products follow the downstairs flow")

    run = cfg.run
    _at_least("run.steps", run.steps, 1)
    if run.time is not None:
        _positive_finite("run.time", run.time)
    if not (math.isfinite(run.stop_energy) and run.stop_energy >= 0):
        _fail("run.stop_energy", run.stop_energy, "it must be a finite number ≥ 0")
    _at_least("run.log_points", run.log_points, 2)
    _at_least("run.log_replicas", run.log_replicas, 0)
    _at_least("run.stop_check_every", run.stop_check_every, 1)
    _at_least("run.checkpoint_every", run.checkpoint_every, 0)
    _one_of("run.gradient", run.gradient, ("auto", "closed_form", "autograd"))
    _one_of("run.on_divergence", run.on_divergence, ("freeze", "error"))
    _positive_finite("run.rank_tol", run.rank_tol)
    _positive_finite("run.checkpoint_minutes", run.checkpoint_minutes)
    _one_of("run.tb_tags", run.tb_tags, ("headline", "all"))
    _at_least("run.sigma_k", run.sigma_k, 0)
    _at_least("run.histogram_points", run.histogram_points, 0)
    if run.save_product not in ("auto", True, False):
        _fail("run.save_product", run.save_product, "choose auto or a boolean, true or false")
    if task.file is None:        # a data file's shape is known once it is read: checked then
        from .metrics import check_entries
        check_entries(run.log_entries, task_shape(task))
