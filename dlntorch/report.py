"""What a run reports: the summary.json schema (summarise), the environment, the headline metrics
of TensorBoard's HPARAMS tab, and the table printed at the end of a run."""
from __future__ import annotations

import math
import platform
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import budget, leaves
from .events import summarise_events
from .logger import aggregate


def summarise(cfg: DictConfig, state: Any, final: Mapping[str, np.ndarray], *, out: Path,
              seeds: dict[str, int], device: torch.device, widths: list[int], total_steps: int,
              counters: dict[str, Any], wall_time: float, dynamics_depth: Any = None,
              stochastic: bool = False) -> dict[str, Any]:
    """summary.json of a completed run: what ran (config, seeds, environment, shapes), how far
    (steps, t, gradient evaluations, the dynamics' counters, wall time, why it stopped), and the
    final row: per replica, aggregated over live replicas, and its events (first passages,
    rank jumps). `state` is the run's rundir.RunState, `final` its last logged row;
    `dynamics_depth` the N the dynamics integrates (downstairs: optim.depth, maybe inf);
    `stochastic`: Langevin-like dynamics, whose aggregates carry the 95 % band of the mean and
    whose converged level is temperature-aware (converged_level)."""
    s = state
    # the state (product, factors: analysis reads them from trajectory.npz) stays out of the JSON;
    # the per-replica values stay arrays (8 bytes a number, not a Python float's 32) until written
    per_replica = {k: v for k, v in final.items() if k not in ("step", "t") and v.ndim <= 2}
    per_replica["diverged"] = final["diverged"] != 0
    live = final["diverged"] == 0
    level = converged_level(cfg, (widths[-1], widths[0]), stochastic)
    converged = live & (final["energy"] < level)
    aggregates = {k: aggregate(np.where(live, v, np.nan), band=stochastic) for k, v in final.items()
                  if v.ndim == 1 and k not in ("step", "t", "diverged")}
    # first passage below the stop level (1e-8 when the run has none) and rank jumps
    events = trajectory_events(s.trajectory, cfg.run.stop_energy or 1e-8)
    aggregates["convergence_time"] = aggregate(np.where(live, events["convergence_time"], np.nan))
    return {
        "status": "completed" if live.any() else "diverged",
        "stopped_by": stopped_by(cfg, s, live, total_steps),
        "out_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seeds": seeds,
        "environment": environment(device),
        "widths": widths,
        "depth": len(widths) - 1,
        "dynamics_depth": depth_text(len(widths) - 1 if dynamics_depth is None else dynamics_depth),
        "replicas": cfg.replicas,
        "steps": s.step,
        "t": s.t,
        "gradient_evaluations": s.gradient_evaluations,
        **counters,
        "wall_time": wall_time,
        "diverged_count": int((~live).sum()),
        "converged_level": level,
        "converged": int(converged.sum()),
        "converged_fraction": float(converged.mean()),
        # near a rank-one minimiser: converged (a replica still at the origin has a small
        # effective rank too) and of effective rank below run.rank_one_tol
        "near_rank_one": int(((final["effective_rank"] < cfg.run.rank_one_tol) & converged).sum()),
        "aggregates": aggregates,
        "final": per_replica,
        "events": events,
    }


def converged_level(cfg: DictConfig, shape: tuple[int, int], stochastic: bool) -> float:
    """The final energy below which a replica counts as converged: run.converged_energy, plus, for
    stochastic dynamics at inverse temperature β, the thermal level m·n/β of an m x n product.
    Why: at equilibrium near a minimiser the law ∝ e^{−βL} is Gaussian in the at most m·n
    directions that change E, so βE is half a χ² with at most m·n degrees of freedom (mean m·n/2β,
    equipartition), and E < m·n/β for all but ≲ 10 % of the replicas (P(χ²_4 > 8) = 0.09 for a
    fully observed 2x2 task, less for larger m·n); E never reaches 1e-6 at β ≲ 1e6, and the plain
    rule would call every replica unconverged."""
    beta = cfg.optim.get("beta") if stochastic else None
    thermal = shape[0] * shape[1] / float(beta) if beta else 0.0
    return float(cfg.run.converged_energy) + thermal


EVENT_BLOCK = 1 << 16       # replicas whose time series summarise_events holds at once


EVENT_NUMBERS = ("convergence_time", "rank_jump_count")   # one number per replica: kept as arrays


def trajectory_events(trajectory: Any, energy_level: float) -> dict[str, Any]:
    """summarise_events over the whole trajectory, EVENT_BLOCK replicas at a time (read from the
    row file), so that its memory does not grow with T × B; the one-number-per-replica events
    as arrays (the rank jumps, a list per replica, as lists)."""
    names = [n for n in ("energy", "singular_values") if n in trajectory.columns]
    t, replicas = trajectory.array("t"), trajectory.last["energy"].shape[0]
    parts = [summarise_events({"t": t, **{n: trajectory.replicas(n, slice(b, b + EVENT_BLOCK)) for n in names}},
                              energy_level) for b in range(0, replicas, EVENT_BLOCK)]
    return {key: np.concatenate([np.asarray(part[key]) for part in parts]) if key in EVENT_NUMBERS
            else [x for part in parts for x in part[key]] for key in parts[0]}


def stopped_by(cfg: DictConfig, state: Any, live: np.ndarray, total_steps: int) -> str:
    """What ended the run: `diverged` (no live replica left), `stop_energy` (every live one below
    it), or the budget's key, `steps` or `time` (config.budget), once the loop reached it."""
    if not live.any():
        return "diverged"
    if state.stopped:
        return "stop_energy"
    return budget(cfg)[1] if state.step >= total_steps else "steps"


def environment(device: torch.device) -> dict[str, Any]:
    return {"dlntorch": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "host": socket.gethostname(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads()}


# what a single run shows in the HPARAMS tab; the keys its command line set are added to these
HPARAMS = ("experiment", "task.name", "model.depth", "model.widths", "init.name", "init.scale",
           "init.scale_of", "optim.name", "optim.lr", "replicas", "seed")
SWEEP_RECORD = "multirun.yaml"     # Hydra writes it in the sweep dir when the sweep starts


def _parse(lines: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create().parse_overrides([str(line) for line in lines])


def swept_keys(multirun: Mapping[str, Any]) -> list[str]:
    """The keys a sweep varies, from its multirun.yaml: the command line's overrides and the
    sweeper's params (hparams_search presets) whose value is a sweep (a,b / range / choice)."""
    hydra = multirun.get("hydra", {})
    lines = list(hydra.get("overrides", {}).get("task", []) or [])
    lines += [f"{k}={v}" for k, v in (hydra.get("sweeper", {}).get("params") or {}).items()]
    return list(dict.fromkeys(o.key_or_group for o in _parse(lines) if o.is_sweep_override()))


def sweep_of_this_job() -> list[str] | None:
    """The swept keys of the Hydra multirun this process runs a job of (None outside one)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    path = Path(HydraConfig.get().sweep.dir) / SWEEP_RECORD
    return swept_keys(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else None


def hparams(config: dict[str, Any], overrides: list[str] | None = None,
            swept: list[str] | None = None) -> dict[str, Any]:
    """The HPARAMS tab's columns and this run's values in them, as numbers, strings or bools.

    A job of a sweep: only the `swept` keys (what varies across the runs under the sweep dir;
    a constant column says nothing and pushes the metrics off a 1600 px screen); a group choice
    (`optim=gd,langevin`) reads the job's choice. A single run: the core keys and every key its
    command line set (Hydra's task overrides) — not all ~60 leaves of the config."""
    flat = leaves(config)
    if swept:
        chosen = {o.key_or_group: o.value() for o in _parse(overrides or []) if o.key_or_group in swept}
        chosen.update({k: flat[k] for k in swept if k in flat})
        chosen = {k: chosen[k] for k in swept if k in chosen}
    else:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides or []]
        # the inverse temperature, where the optimiser has one (only its own schema holds the key)
        beta = ("optim.beta",) if "optim.beta" in flat else ()
        chosen = {k: flat[k] for k in dict.fromkeys((*HPARAMS, *beta, *keys)) if k in flat}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in chosen.items()}


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """The final metrics shown in TensorBoard's HPARAMS tab (those the run has): the fractions of
    replicas converged (once the summary counts them: `converged`) and near rank one, the medians
    of energy, effective rank and balancedness, and the diverged count."""
    agg, replicas = summary["aggregates"], summary["replicas"]
    out = {}
    if "converged" in summary:
        out["converged_fraction"] = summary["converged"] / replicas
    out["near_rank_one_fraction"] = summary["near_rank_one"] / replicas
    for name in ("energy", "effective_rank", "balancedness"):
        if name in agg:
            out[f"{name}_median"] = agg[name]["median"]
    out["diverged"] = float(summary["diverged_count"])
    return out


def depth_text(depth: Any) -> Any:
    """N as JSON and people write it: an integer, or "inf"."""
    return "inf" if str(depth) == "inf" or (isinstance(depth, float) and math.isinf(depth)) else int(depth)


# a constant schedule has no warm-up or decay, and zero label noise none: their keys say nothing
SCHEDULE_KEYS = ("warmup_steps", "decay_every", "decay_factor")


def _idle(optim: Mapping[str, Any], key: str) -> bool:
    if key in SCHEDULE_KEYS:
        return optim.get("schedule") in (None, "constant")
    return (key == "schedule" and optim[key] == "constant") or (key == "label_noise" and not optim[key])


def header(config: Mapping[str, Any], widths: list[int], depth: Any, device: Any) -> str:
    """The run in one line: task and its shape, widths, the depth the dynamics integrates (the
    downstairs flow's optim.depth, not the model's), replicas, dynamics with its parameters,
    init, device and dtype. Printed at the start and heading the final table."""
    optim, init = config["optim"], config["init"]
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in optim.items()
                      if k != "name" and not _idle(optim, k))
    return (f"dlntorch: {config['task']['name']} {widths[-1]}x{widths[0]}, widths {list(widths)}, "
            f"depth {depth_text(depth)}, {config['replicas']} replicas, {optim['name']} {params}, "
            f"init {init['name']} scale={init['scale']:g}, {device} {config['dtype']}")


def table(summary: dict[str, Any]) -> str:
    """A short table of what happened, for the terminal."""
    cfg, agg = summary["config"], summary["aggregates"]
    lines = [
        header(cfg, summary["widths"], summary.get("dynamics_depth", summary["depth"]),
               summary["environment"]["device"]),
        f"stopped by {summary['stopped_by']} at step {summary['steps']} (t = {summary['t']:.4g}) "
        f"after {summary['wall_time']:.1f} s",
        f"outputs: {summary['out_dir']}",
        "",
        f"{'observable':<22}{'median':>12}{'min':>12}{'max':>12}",
    ]
    for key in ("energy", "effective_rank", "stable_rank", "balancedness", "balancedness_drift",
                "hyperbola_distance", "test_error"):
        if key in agg:
            a = agg[key]
            lines.append(f"{key:<22}{a['median']:>12.3e}{a['min']:>12.3e}{a['max']:>12.3e}")
    B, run = summary["replicas"], cfg["run"]
    near, converged = summary["near_rank_one"], summary["converged"]
    lines += ["",
              f"converged (E < {converged_energy_text(summary)}): {converged} / {B} ({100 * converged / B:.0f} %)",
              f"near rank one (converged, effective rank < {run['rank_one_tol']:g}): {near} / {B}"
              f" ({100 * near / B:.0f} %)",
              f"diverged: {summary['diverged_count']}"]
    advice = not_converged_advice(summary)
    return "\n".join(lines + ([advice] if advice else []))


def converged_energy_text(summary: dict[str, Any]) -> str:
    """The converged level as the table prints it: run.converged_energy, or, where the level is
    temperature-aware (converged_level), its value with the rule."""
    run = summary["config"]["run"]
    level = summary.get("converged_level", run["converged_energy"])
    if level == run["converged_energy"]:
        return f"{level:g}"
    return f"{level:.3g} = run.converged_energy + m·n/β"


def not_converged_advice(summary: dict[str, Any]) -> str | None:
    """A warning line when most replicas (more than half) did not converge, with the likely
    fixes: ten times the time (or steps), or a ten times larger start, which leaves the saddle
    at the origin sooner. None when most converged or when every replica diverged."""
    B, converged, live = summary["replicas"], summary["converged"], summary["replicas"] - summary["diverged_count"]
    if 2 * converged >= B or live == 0:
        return None
    cfg = summary["config"]
    return (f"warning: {B - converged} of {B} replicas did not converge (E ≥ {converged_energy_text(summary)} "
            f"at t = {summary['t']:.4g}): run longer: run.time={10 * summary['t']:.4g} / "
            f"run.steps={10 * summary['steps']}, or start larger: init.scale={10 * cfg['init']['scale']:g}")
