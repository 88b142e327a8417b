"""The configuration schema: structured dataclasses registered in Hydra's ConfigStore, derived
from the options' registries.

Hydra checks key names and types against these classes (a typo or a wrong type fails at
start-up with Hydra's own message). Each optimiser has a schema of its own (registered with it,
stored as `optim/<name>_schema`, the first default of its yaml), so a key that does not belong
to it (`optim=gd optim.beta=5`) is refused. `validate` checks the values, before any compute,
and raises `ConfigError` with one sentence naming the key, the value and what is allowed: the
checks common to every run here, each option's own check (registered next to it) through its
registry.

This module imports the option modules (and so torch) only inside `register`, `as_config` and
`validate`: the run dir's names and the helpers below stay light for collect and analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .budget import DEFAULT_STEPS, budget, total_steps  # noqa: F401 — the run's length, re-exported
from .errors import (  # noqa: F401
    ConfigError,
    at_least,
    fail,
    non_negative_finite,
    one_of,
    parse_depth,
    positive_finite,
    resolve_depth,
)

LOSSES = ("half_sum", "mean", "half_mean")
DTYPES = ("float64", "float32")
DEVICES = ("auto", "cpu", "cuda")


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
    file: Optional[str] = None          # completion: .npz/.pt with `mask`, `values`; sensing: `sensors`, `values`
    seed: Optional[int] = None          # data seed; None derives it from the top-level seed
    # [{at: step, observations: count}, …]: nested observed sets switched at those steps
    schedule: Optional[list[dict[str, int]]] = None
    # completion: the observed entries as [[i, j, value], …] (0-based; no ground truth), in place of a draw
    entries: Optional[list[Any]] = None
    normalise: str = "spectral"         # a drawn U V^T truth scaled to spectral | frobenius norm `scale`
    scale: float = 1.0


@dataclass
class ModelConfig:
    depth: Optional[int] = None         # N; None means len(widths) − 1, or 3
    widths: Optional[list[int]] = None  # [d_0, …, d_N]; None: hidden widths max(d_0, d_N)


@dataclass
class InitConfig:
    name: str = "gaussian"
    scale: float = 1e-2
    scale_of: str = "layer"             # layer: per-layer std; product: typical product entry; fan_in (gaussian)
    imbalance: float = 1.0              # unbalanced: the requested ‖G‖ (total Frobenius norm)
    file: Optional[str] = None          # file: factors or products from a .pt/.npz (see init.from_file)
    det_sign: str = "any"               # any | positive | negative: det W0's sign (init.with_det_sign)
    seed: Optional[int] = None          # None derives it from the top-level seed
    # grid: one replica per point of a slice W0(a, b) = a·P + b·Q + ε·R of the products (init.grid_products)
    plane: str = "diagonal"             # diagonal (P, Q = E_11, E_22) | symmetric (I, J) | random (seeded)
    a_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])   # [low, high] of a
    b_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])   # [low, high] of b
    points: int = 16                    # grid points per side: replicas must be points² (256, the default)
    epsilon: float = 1e-3               # ε of the fixed tilt ε·R (R Gaussian, seeded) off the plane


@dataclass
class RunConfig:
    steps: Optional[int] = None         # step budget; None: DEFAULT_STEPS, or as many as run.time needs
    time: Optional[float] = None        # stop at t = lr·step ≥ time (with run.steps: whichever comes first)
    # a replica has converged when its final E is below this: well below the O(1) energies the
    # tasks start from (seed2x2: E(0) ≈ 1), well above float64 round-off (~1e-16 relative);
    # stochastic runs add their thermal level m·n/β (report.converged_level)
    converged_energy: float = 1e-6
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
    compile: str = "auto"               # torch.compile of gd/sgd/langevin's fast step: auto | on | off
    progress: bool = True               # tqdm bar on runs longer than a few seconds
    out_dir: Optional[str] = None       # None: Hydra's run dir (or ./outputs/<time> from Python)
    # what a researcher reads afterwards (TensorBoard's tags, the state in trajectory.npz)
    tb_tags: str = "headline"           # headline (what the custom-scalars charts need) | all
    sigma_k: int = 8                    # singular values logged as sigma_1..sigma_k (capped at min(m, n))
    histogram_points: int = 32          # logged times with distribution/<name> histograms (0: none)
    save_product: Any = "auto"          # product W in trajectory.npz: auto (m·n ≤ 64) | true | false
    save_factors: bool = False          # factors W_p in trajectory.npz (T, B, d_p, d_{p-1})
    log_entries: list[list[int]] = field(default_factory=list)   # [[i, j], …] 1-based: w_ij = W[i-1, j-1]
    # k > 0: the observable `sharpness`, λ_max of the Hessian of L by k Lanczos steps (k Hessian-vector
    # products per logged time); 0: off. Any, not int: a non-integer is refused by validate in one sentence
    sharpness_iterations: Any = 0


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: Any = MISSING                # the schema of the chosen optimiser (optim/<name>_schema)
    run: RunConfig = field(default_factory=RunConfig)
    replicas: int = 256
    seed: int = 0
    dtype: str = "float64"
    device: str = "auto"
    resume: bool = False
    threads: Optional[int] = None       # torch threads; None: torch's default (launchers set it)
    experiment: Optional[str] = None    # name of the preset, for the record
    tags: dict[str, Any] = field(default_factory=dict)


def registries() -> dict[str, Any]:
    """The registries of every kind of option, with every option module imported (so registered)."""
    from . import dynamics  # noqa: F401 — the flows register as optimisers
    from .init import INITS
    from .noise import NOISES
    from .optim import OPTIMISERS
    from .tasks import TASKS
    return {"task": TASKS, "init": INITS, "optim": OPTIMISERS, "noise": NOISES}


def register() -> None:
    """The top-level schema types the whole tree, so every group's yaml merges into it; each
    optimiser's schema is `optim/<name>_schema`, which its yaml names first in its defaults."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, option in registries()["optim"].options.items():
        store.store(group="optim", name=f"{name}_schema", node=option.schema)


def optim_schema(name: Any) -> type:
    """The structured config of optimiser `name` (ConfigError naming optim.name if unknown)."""
    return registries()["optim"][name].schema


FREE_FORM = ("tags",)     # keys whose contents the schema does not type


def unknown_key(given: Any, schema: Any, prefix: str = "") -> tuple[str, list[str]] | None:
    """The first key of `given` that `schema` does not have, with the keys it has there; None
    if every key is known. Both are plain nested dicts; FREE_FORM keys are not looked into."""
    for key, value in given.items():
        if key not in schema:
            return f"{prefix}{key}", sorted(schema)
        if isinstance(value, dict) and isinstance(schema[key], dict) and f"{prefix}{key}" not in FREE_FORM:
            found = unknown_key(value, schema[key], f"{prefix}{key}.")
            if found is not None:
                return found
    return None


def refuse_unknown_keys(given: DictConfig, schema: DictConfig) -> None:
    """Every key the schema does not know is refused by name (`+model.dept=4`, which Hydra's own
    hint for `model.dept=4` suggests, would otherwise run depth 3), with the nearest known key."""
    import difflib
    plain = [OmegaConf.to_container(c, resolve=False) if isinstance(c, DictConfig) else c for c in (given, schema)]
    found = unknown_key(plain[0], plain[1])
    if found is None:
        return
    key, known = found
    parent, _, leaf = key.rpartition(".")
    near = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
    where = f"the keys of {parent} are" if parent else "the top-level keys are"
    raise ConfigError(f"{key} is not a key of the config{hint}; {where} {', '.join(known)}.")


def as_config(cfg: Any) -> DictConfig:
    """Any of Config, dict or DictConfig → a DictConfig typed by the schema and by the chosen
    optimiser's own schema (typos and keys of other optimisers fail here)."""
    given = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg) if isinstance(cfg, Config) \
        else OmegaConf.create(cfg)
    # as plain values: a node typed by another optimiser's schema (`optim.name=langevin` on the
    # gd yaml) then merges by its keys, and a key the chosen schema lacks is refused by name
    given = OmegaConf.create(OmegaConf.to_container(given, resolve=False))
    name = OmegaConf.select(given, "optim.name", default=None)
    schema = OmegaConf.structured(Config)
    schema.optim = OmegaConf.structured(optim_schema("gd" if name is None else name))
    refuse_unknown_keys(OmegaConf.masked_copy(given, [k for k in given if k != "hydra"]), schema)
    return OmegaConf.merge(schema, given)


def derive_seeds(cfg: DictConfig) -> dict[str, int]:
    """Independent seeds for the task data, the initial condition and the dynamics' noise, all
    derived from `seed` (task.seed / init.seed override theirs, e.g. to fix the data of a sweep)."""
    task, init, dynamics = np.random.SeedSequence(cfg.seed).generate_state(3, dtype=np.uint32).tolist()
    return {"seed": cfg.seed,
            "task": task if cfg.task.seed is None else cfg.task.seed,
            "init": init if cfg.init.seed is None else cfg.init.seed,
            "dynamics": dynamics}


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
TRAJECTORY_ROWS = "trajectory"      # the row file of a run that logs (dlntorch.trajectory), until it completes
# the statuses of a summary.json whose run reached its end (a diverged one: every replica diverged)
FINISHED = ("completed", "diverged")


def run_dir(cfg: Any) -> Path | None:
    """Where the run writes: run.out_dir, else Hydra's run dir, else None (called from Python)."""
    if cfg.run.out_dir is not None:
        return Path(cfg.run.out_dir)
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def check_sharpness_iterations(value: Any) -> None:
    """run.sharpness_iterations: an integer ≥ 0 (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail("run.sharpness_iterations", value, "it must be an integer ≥ 0 (0: no sharpness; k ≥ 1: "
             "k Lanczos steps, k Hessian-vector products per logged time)")


def validate(cfg: Any) -> None:
    """Every value check that can be made before compute. Raises ConfigError."""
    at_least("replicas", cfg.replicas, 1)
    one_of("dtype", cfg.dtype, DTYPES)
    one_of("device", cfg.device, DEVICES)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        fail("seed", cfg.seed, "it must be an integer ≥ 0")
    if cfg.threads is not None:
        at_least("threads", cfg.threads, 1)
    kinds = registries()
    from .tasks import task_shape

    task = cfg.task
    task_option = kinds["task"][task.name]
    one_of("task.loss", task.loss, LOSSES)
    non_negative_finite("task.noise", task.noise)
    if task.file is not None and not task_option.extra.get("reads_files"):
        readers = [name for name, option in kinds["task"].options.items() if option.extra.get("reads_files")]
        fail("task.file", task.file, "a data file is read only by " + " or ".join(f"task={r}" for r in readers))
    if task.file is None:
        task_shape(task)
    if task_option.check is not None:
        task_option.check(cfg)

    model = cfg.model
    if model.depth is not None:
        at_least("model.depth", model.depth, 1)
    if model.widths is not None:
        widths = list(model.widths)
        if len(widths) < 2:
            fail("model.widths", widths, "it must list [d_0, …, d_N] with at least two widths")
        if any(not isinstance(w, int) or w <= 0 for w in widths):
            fail("model.widths", widths, "every width must be an integer ≥ 1")
        if task.file is None:
            m, n = task_shape(task)
            if widths[0] != n or widths[-1] != m:
                fail("model.widths", widths,
                     f"its ends must match the task's {m}x{n} matrix: d_0 = {n} and d_N = {m}")
    resolve_depth(model)

    init = cfg.init
    init_option = kinds["init"][init.name]
    positive_finite("init.scale", init.scale)
    one_of("init.scale_of", init.scale_of, ("layer", "product", "fan_in"))
    if init_option.check is not None:
        init_option.check(cfg)

    optim = cfg.optim
    optim_option = kinds["optim"][optim.name]
    positive_finite("optim.lr", optim.lr)        # every dynamics runs on the grid t = lr·step
    if optim_option.check is not None:
        optim_option.check(cfg)

    run = cfg.run
    if run.steps is not None:
        at_least("run.steps", run.steps, 1)
    if run.time is not None:
        positive_finite("run.time", run.time)
    non_negative_finite("run.stop_energy", run.stop_energy)
    positive_finite("run.converged_energy", run.converged_energy)
    at_least("run.log_points", run.log_points, 2)
    at_least("run.log_replicas", run.log_replicas, 0)
    at_least("run.stop_check_every", run.stop_check_every, 1)
    at_least("run.checkpoint_every", run.checkpoint_every, 0)
    one_of("run.gradient", run.gradient, ("auto", "closed_form", "autograd"))
    one_of("run.compile", run.compile, ("auto", "on", "off"))
    one_of("run.on_divergence", run.on_divergence, ("freeze", "error"))
    positive_finite("run.rank_tol", run.rank_tol)
    positive_finite("run.checkpoint_minutes", run.checkpoint_minutes)
    one_of("run.tb_tags", run.tb_tags, ("headline", "all"))
    at_least("run.sigma_k", run.sigma_k, 0)
    at_least("run.histogram_points", run.histogram_points, 0)
    check_sharpness_iterations(run.sharpness_iterations)
    if run.save_product not in ("auto", True, False):
        fail("run.save_product", run.save_product, "choose auto or a boolean, true or false")
    if task.file is None:        # a data file's shape is known once it is read: checked then
        from .metrics import check_entries
        check_entries(run.log_entries, task_shape(task))
