"""The run loop: `run(cfg) -> summary`, usable from Python and from the CLI.

config → validate → task → network + initial condition → dynamics → loop over chunks of steps;
at logged times: observables → TensorBoard + trajectory; at the end: summary.json, hparams,
checkpoint. Everything batched over the replica axis; the loop never syncs with the device
except at logged times and stop checks.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .config import (CHECKPOINT, EVENTS, SUMMARY, TRAJECTORY, ConfigError, as_config, derive_seeds,
                     leaves, resolve_depth, run_dir, total_steps, validate)
from .dynamics import Dynamics, build_dynamics
from .events import summarise_events
from .init import initial_factors
from .logger import (TensorBoardLog, Trajectory, aggregate, atomic_write_bytes, log_steps, to_numpy,
                     write_json)
from .network import DeepLinearNetwork, default_widths
from .tasks import Task, build_task
from .metrics import observe
from .report import environment, headline, hparams

FLUSH_SECONDS = 10.0          # TensorBoard lags the run by at most this much wall time
FLUSH_ELEMENTS = 1 << 22      # pending snapshot entries (×8 bytes) before observing them


class DivergenceError(RuntimeError):
    """A replica diverged and run.on_divergence=error."""


# ------------------------------------------------------------------------ configuration

def hydra_overrides() -> list[str]:
    """The command line's overrides of this job (a sweep's swept values), [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def output_dir(cfg: DictConfig) -> Path:
    """The run dir (see config.run_dir), created; outside Hydra without run.out_dir,
    ./outputs/<date>/<time>."""
    out = run_dir(cfg) or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: this machine has no CUDA device; use device=cpu or device=auto.")
    return torch.device(name)


def resolve_widths(model: Any, shape: tuple[int, int]) -> list[int]:
    """[d_0, …, d_N]; the ends must match the task's (m, n)."""
    m, n = shape
    if model.widths is None:
        return default_widths(resolve_depth(model), m, n)
    widths = [int(w) for w in model.widths]
    if widths[0] != n or widths[-1] != m:
        raise ConfigError(f"model.widths={widths} is not allowed: its ends must match the task's "
                          f"{m}x{n} matrix: d_0 = {n} and d_N = {m}.")
    return widths


# ------------------------------------------------------------------------ the run's state

@dataclass
class RunState:
    """Everything that changes during a run and is needed to resume it."""
    step: int = 0
    t: float = 0.0
    gradient_evaluations: int = 0
    diverged: Tensor | None = None         # (B,) bool
    G0: list[Tensor] = field(default_factory=list)
    trajectory: Trajectory = field(default_factory=Trajectory)
    elapsed: float = 0.0                   # wall seconds before this process (resumed runs)


# ------------------------------------------------------------------------ the loop

class Lab:
    """One run: its config, task, network, dynamics, outputs and state."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.seeds = derive_seeds(cfg)
        self.task: Task = build_task(cfg.task, self.seeds["task"]).to(self.device, self.dtype)
        self.widths = resolve_widths(cfg.model, self.task.shape)
        start = initial_factors(cfg.init, self.widths, cfg.replicas, self.seeds["init"])
        self.out = output_dir(cfg)       # only once every input has been read and checked
        self.total_steps = total_steps(cfg)
        self.grid = log_steps(self.total_steps, cfg.run.log_points)
        self.net = DeepLinearNetwork(self.widths, cfg.replicas, self.dtype, self.device)
        self.net.set_factors([f.to(self.device, self.dtype) for f in start])
        self.dynamics: Dynamics = build_dynamics(cfg, self.net, self.task, self.seeds["dynamics"])
        self.state = RunState(diverged=torch.zeros(cfg.replicas, dtype=torch.bool, device=self.device),
                              G0=[g.detach().clone() for g in self.net.balancedness()])
        self.tb: TensorBoardLog | None = None   # opened by train (a resumed run purges first)
        self.pending: list[tuple] = []       # logged snapshots not yet observed (see log)
        self.last_flush = time.monotonic()
        self.stopped = False      # by run.stop_energy
        self.finished = False     # the final state is checkpointed

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write checkpoint.pt atomically (temporary file, then rename): a crash or a kill at any
        moment leaves the previous checkpoint whole and usable."""
        s = self.state
        self.flush()
        # events up to this step reach the disk before the checkpoint names the step: a resumed
        # run purges the events past it (purge_step), so every step is in TensorBoard exactly once
        if self.tb is not None:
            self.tb.writer.flush()
        # the trajectory so far goes to trajectory.npz first; the checkpoint records how many of
        # its rows are its own, so a crash between the two writes leaves a consistent pair
        s.trajectory.save(self.out / TRAJECTORY)
        payload = {"step": s.step, "t": s.t, "gradient_evaluations": s.gradient_evaluations,
                   "diverged": s.diverged.cpu(), "G0": [g.cpu() for g in s.G0],
                   "trajectory_rows": len(s.trajectory.rows), "elapsed": s.elapsed + self.wall(),
                   "dynamics": self.dynamics.state_dict(), "config": OmegaConf.to_container(self.cfg),
                   "stopped": self.stopped, "finished": self.finished}
        atomic_write_bytes(self.out / CHECKPOINT, lambda h: torch.save(payload, h))
        self.last_checkpoint = (s.step, time.monotonic())

    def restore(self) -> bool:
        """Continue from checkpoint.pt in the run dir if there is one (resume=true)."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        payload = torch.load(path, map_location=self.device, weights_only=False)
        # continuing under other values would make a run that is neither; name the first change
        then, now = leaves(payload.get("config", {})), leaves(OmegaConf.to_container(self.cfg))
        free = ("resume", "threads", "device", "experiment", "tags", "run.out_dir", "run.progress",
                "run.checkpoint_every", "run.checkpoint_minutes", "run.on_divergence", "run.log_replicas")
        changed = [k for k in now if k in then and then[k] != now[k] and not k.startswith(free)]
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise ConfigError(f"resume=true cannot continue {path}: it was written with {k}={then[k]!r} but this "
                              f"run has {k}={now[k]!r}{more}; rerun with the same values or into another run dir.")
        s = self.state
        s.step, s.t, s.gradient_evaluations = payload["step"], payload["t"], payload["gradient_evaluations"]
        s.diverged = payload["diverged"].to(self.device)
        s.G0 = [g.to(self.device) for g in payload["G0"]]
        s.trajectory = Trajectory.load(self.out / TRAJECTORY, payload["trajectory_rows"])
        s.elapsed = payload["elapsed"]
        self.stopped, self.finished = payload["stopped"], payload["finished"]
        self.dynamics.load_state_dict(payload["dynamics"])
        return True

    def wall(self) -> float:
        return time.monotonic() - self.started

    # -- observing --------------------------------------------------------------------
    # A logged time records a snapshot of the state (a copy: microseconds); the observables of
    # many snapshots are computed in one batched call (SVDs of K·B matrices at once) when the
    # batch is large, every FLUSH_SECONDS of wall time (TensorBoard stays live), at checkpoints
    # and at the end. Observing at every logged time instead costs more than the steps of a
    # short run.
    def snapshot(self) -> tuple:
        s = self.state
        return (s.step, s.t, [f.clone() for f in self.dynamics.factors()],
                {k: v.clone() for k, v in self.dynamics.observables().items()}, s.diverged.clone())

    def log(self) -> None:
        self.pending.append(self.snapshot())
        elements = len(self.pending) * sum(f.numel() for f in self.pending[0][2])
        if elements >= FLUSH_ELEMENTS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def rows(self, snapshots: list[tuple]) -> list[dict[str, np.ndarray]]:
        """The logged rows of snapshots, observed as one batch of K·B replicas."""
        K, B = len(snapshots), self.cfg.replicas
        steps, times, factors, extras, diverged = zip(*snapshots)
        dead = torch.cat(diverged)
        obs = observe([torch.cat(parts) for parts in zip(*factors)], self.task,
                      [g.repeat(K, 1, 1) for g in self.state.G0], self.cfg.run.rank_tol,
                      beta=self.dynamics.beta, depth=self.dynamics.depth, diverged=dead)
        obs.update({k: torch.cat([extra[k] for extra in extras]) for k in extras[0]})
        arrays, dead = to_numpy(obs), dead.cpu().numpy().astype(np.float64)
        rows = []
        for k in range(K):
            row = {name: values[k * B:(k + 1) * B] for name, values in arrays.items()}
            row["diverged"] = dead[k * B:(k + 1) * B]
            row["step"], row["t"] = np.asarray(steps[k]), np.asarray(times[k])
            rows.append(row)
        return rows

    def flush(self) -> None:
        """Observe the pending snapshots; append their rows to the trajectory and TensorBoard."""
        if self.pending:
            rows = self.rows(self.pending)
            for row in rows:
                self.state.trajectory.append(row)
            self.tb.scalars(rows)
            self.pending.clear()
        self.last_flush = time.monotonic()

    def check(self) -> bool:
        """Divergence bookkeeping and the stop test (one host sync). True: stop now."""
        s = self.state
        energy = self.dynamics.energy()
        newly = ~torch.isfinite(energy) & ~s.diverged
        s.diverged |= ~torch.isfinite(energy)
        self.dynamics.freeze(s.diverged)
        if self.cfg.run.on_divergence == "error" and bool(newly.any()):
            raise DivergenceError(f"{int(newly.sum())} replica(s) diverged at step {s.step} (t = {s.t:g}) "
                                  "and run.on_divergence=error")
        live = energy[~s.diverged]
        return live.numel() == 0 or bool((live < self.cfg.run.stop_energy).all())

    def checkpoint_due(self) -> bool:
        every, minutes = self.cfg.run.checkpoint_every, self.cfg.run.checkpoint_minutes
        last_step, last_time = self.last_checkpoint
        return (every > 0 and self.state.step - last_step >= every) or \
            (time.monotonic() - last_time) / 60 >= minutes

    # -- the loop ---------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        self.started = time.monotonic()
        resumed = cfg.resume and self.restore()
        if resumed and (self.out / SUMMARY).is_file():
            previous = json.loads((self.out / SUMMARY).read_text())
            if previous.get("status") == "completed":
                return previous       # nothing left to do: the run had finished
        # resuming purges the events past the checkpoint; past a final checkpoint, the final
        # step's own events too (the reports may have been half written), which finish rewrites
        self.tb = TensorBoardLog(self.out / EVENTS, cfg.run.log_replicas,
                                 purge_step=None if not resumed else s.step if self.finished else s.step + 1)
        self.last_checkpoint = (s.step, time.monotonic())
        ends = chunk_ends(self.grid, cfg.run.stop_check_every if self.dynamics.step_based else None,
                          self.total_steps)
        self.dynamics.plan(ends)
        if self.finished:     # killed after its final checkpoint: only the reports are left
            return self.finish()
        bar = progress_bar(cfg, self.total_steps, s.step)
        if s.step == 0 and not s.trajectory.rows:
            self.check()
            self.log()
        for end in ends[ends > s.step]:
            self.dynamics.advance(int(end) - s.step)
            s.gradient_evaluations = self.dynamics.gradient_evaluations
            s.step, s.t = int(end), self.dynamics.time(int(end))
            self.stopped = self.check()
            if end in self.grid or self.stopped or end == self.total_steps:
                self.log()
            if bar is not None:
                bar.update(int(end) - bar.n)
            if self.stopped:
                break
            if self.checkpoint_due():
                self.checkpoint()
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The final checkpoint first (the state is final), then the reports: a kill in between
        resumes straight to the reports, with the final row, the stop reason and no step twice."""
        s = self.state
        if self.finished:         # resumed past the final checkpoint: its step was purged
            self.tb.scalars(s.trajectory.rows[-1:])
        else:
            last = self.pending[-1][0] if self.pending else \
                int(s.trajectory.rows[-1]["step"]) if s.trajectory.rows else None
            if last != s.step:
                self.log()
            self.finished = True
            self.checkpoint()     # writes trajectory.npz too
        final = s.trajectory.rows[-1]
        self.tb.histograms(s.step, final, final["diverged"] > 0)
        summary = self.summarise(final)
        self.tb.hparams(hparams(summary["config"], hydra_overrides()), headline(summary), s.step)
        self.tb.close()
        write_json(self.out / SUMMARY, summary)
        return summary

    def summarise(self, final: dict[str, np.ndarray]) -> dict[str, Any]:
        s, cfg = self.state, self.cfg
        per_replica = {k: v.tolist() for k, v in final.items() if k not in ("step", "t")}
        per_replica["diverged"] = [bool(x) for x in final["diverged"]]
        live = final["diverged"] == 0
        aggregates = {k: aggregate(np.where(live, v, np.nan)) for k, v in final.items()
                      if v.ndim == 1 and k not in ("step", "t", "diverged")}
        # first passage below the stop level (1e-8 when the run has none) and rank jumps
        events = summarise_events(s.trajectory.arrays(), cfg.run.stop_energy or 1e-8)
        aggregates["convergence_time"] = aggregate(np.where(live, events["convergence_time"], np.nan))
        return {
            "status": "completed",
            "stopped_by": "stop_energy" if self.stopped else ("time" if cfg.run.time is not None
                                                         and s.step == self.total_steps else "steps"),
            "out_dir": str(self.out),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "seeds": self.seeds,
            "environment": environment(self.device),
            "widths": self.widths,
            "depth": len(self.widths) - 1,
            "replicas": cfg.replicas,
            "steps": s.step,
            "t": s.t,
            "gradient_evaluations": s.gradient_evaluations,
            **self.dynamics.counters(),
            "wall_time": s.elapsed + self.wall(),
            "diverged_count": int((~live).sum()),
            "near_rank_one": int(((final["effective_rank"] < cfg.run.rank_one_tol) & live).sum()),
            "aggregates": aggregates,
            "final": per_replica,
            "events": events,
        }


def chunk_ends(grid: np.ndarray, every: int | None, total: int) -> np.ndarray:
    """Where the loop pauses: logged steps, stop checks every `every` steps, and the end."""
    ends = [grid, [total]]
    if every:
        ends.append(np.arange(every, total + 1, every))
    return np.unique(np.concatenate(ends)).astype(np.int64)


def progress_bar(cfg: DictConfig, total: int, start: int):
    if not cfg.run.progress:
        return None
    from tqdm.auto import tqdm
    # delay: the bar appears only on runs that take more than a few seconds
    return tqdm(total=total, initial=start, delay=3, unit="step", dynamic_ncols=True,
                desc=f"{cfg.task.name} N={len(cfg.model.widths) - 1 if cfg.model.widths else resolve_depth(cfg.model)}",
                file=sys.stderr)


def run(cfg: Any) -> dict[str, Any]:
    """Train as `cfg` says and return the summary (also written to summary.json).

    `threads` sets torch's threads for this process (launcher jobs get cores // parallel jobs).
    With `resume=true` and a checkpoint.pt in the run dir the run continues from it (a completed
    run just returns its summary); otherwise it starts afresh, and TensorBoard events that an
    earlier attempt left in the run dir move to tb/superseded-<time>/, so no step appears twice.
    """
    cfg = as_config(cfg)
    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    lab = Lab(cfg)
    events = lab.out / EVENTS
    if not (cfg.resume and (lab.out / CHECKPOINT).is_file()) and events.is_dir():
        stale = sorted(events.glob("events.out.tfevents.*"))
        if stale:
            aside = events / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{len(list(events.glob('superseded-*')))}"
            aside.mkdir(parents=True)
            for file in stale:
                file.replace(aside / file.name)
    return lab.train()
