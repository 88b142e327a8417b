"""A run dir's lifecycle: what a run keeps on disk and reads back — its state (RunState) in
checkpoint.pt and trajectory.npz, the resume-compatibility check, superseded TensorBoard events
set aside, summary.json, and the failure record a job leaves when it dies."""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .config import CHECKPOINT, EVENTS, FINISHED, SUMMARY, TRAJECTORY, TRAJECTORY_ROWS, derive_seeds, leaves, run_dir
from .errors import ConfigError
from .logger import atomic_write_bytes, write_json
from .trajectory import Trajectory

log = logging.getLogger(__name__)
SUPERSEDED = "superseded"      # <run dir>/superseded/<time>/: a fresh start's old events

# keys a resumed run may change: where and how it runs, not what it computes
FREE_ON_RESUME = ("resume", "threads", "device", "experiment", "tags", "run.out_dir", "run.progress",
                  "run.checkpoint_every", "run.checkpoint_minutes", "run.on_divergence", "run.log_replicas")


@dataclass
class RunState:
    """Everything that changes during a run and is needed to resume it."""
    step: int = 0
    t: float = 0.0
    gradient_evaluations: int = 0
    diverged: Tensor | None = None         # (B,) bool
    G0: list[Tensor] = field(default_factory=list)
    W0: Tensor | None = None               # the product at t = 0 (for the drift ‖W(t) − W(0)‖)
    trajectory: Trajectory = field(default_factory=Trajectory)
    elapsed: float = 0.0                   # wall seconds before this process (resumed runs)
    stopped: bool = False                  # by run.stop_energy
    finished: bool = False                 # the final state is checkpointed


def hydra_overrides() -> list[str] | None:
    """The command line's overrides of this job (a sweep's swept values); None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


class RunDir:
    """The folder one run writes: run.out_dir, Hydra's run dir, or ./outputs/<date>/<time>."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.events = self.path / EVENTS
        self.rows = self.path / TRAJECTORY_ROWS     # the trajectory's row file while the run logs

    @classmethod
    def create(cls, cfg: DictConfig) -> RunDir:
        out = run_dir(cfg) or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        return cls(out)

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def set_superseded_events_aside(self) -> None:
        """A fresh start: events an earlier attempt left move to superseded/<time>-<n>/ beside tb/,
        renamed so their names no longer hold "tfevents": TensorBoard (and its data server) read
        only files whose name does, so `tensorboard --logdir` on the run or sweep dir shows no
        extra run, and no step appears twice."""
        stale = sorted(self.events.glob("*tfevents*")) if self.events.is_dir() else []
        if stale:
            root = self.path / SUPERSEDED
            count = len(list(root.glob("*"))) if root.is_dir() else 0
            aside = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{count}"
            aside.mkdir(parents=True)
            for file in stale:
                file.replace(aside / file.name.replace("tfevents", SUPERSEDED))

    def save(self, state: RunState, dynamics: Any, cfg: DictConfig, elapsed: float) -> None:
        """Write checkpoint.pt atomically (temporary file, then rename): a crash or a kill at any
        moment leaves the previous checkpoint whole and usable. The trajectory so far goes to
        trajectory.npz first (written from the row file; the final checkpoint's made from it in
        place); the checkpoint records how many of its rows are its own, so a crash between the two
        writes leaves a consistent pair."""
        s = state
        (s.trajectory.seal if s.finished else s.trajectory.save)(self.path / TRAJECTORY)
        payload = {"step": s.step, "t": s.t, "gradient_evaluations": s.gradient_evaluations,
                   "diverged": s.diverged.cpu(), "G0": [g.cpu() for g in s.G0],
                   "W0": None if s.W0 is None else s.W0.cpu(),
                   "trajectory_rows": len(s.trajectory), "elapsed": elapsed,
                   "dynamics": dynamics.state_dict(), "config": OmegaConf.to_container(cfg),
                   "stopped": s.stopped, "finished": s.finished}
        atomic_write_bytes(self.path / CHECKPOINT, lambda h: torch.save(payload, h))

    def restore(self, state: RunState, dynamics: Any, cfg: DictConfig, device: torch.device) -> bool:
        """Continue from checkpoint.pt if there is one: fill `state` and the dynamics from it."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return False
        payload = torch.load(path, map_location=device, weights_only=False)
        check_resumable(payload.get("config", {}), OmegaConf.to_container(cfg), path)
        s = state
        s.step, s.t, s.gradient_evaluations = payload["step"], payload["t"], payload["gradient_evaluations"]
        s.diverged = payload["diverged"].to(device)
        s.G0 = [g.to(device) for g in payload["G0"]]
        s.W0 = None if payload.get("W0") is None else payload["W0"].to(device)   # older checkpoints lack it
        s.trajectory.restore(self.path / TRAJECTORY, payload["trajectory_rows"])
        s.elapsed = payload["elapsed"]
        s.stopped, s.finished = payload["stopped"], payload["finished"]
        dynamics.load_state_dict(payload["dynamics"])
        return True

    def completed(self) -> dict[str, Any] | None:
        """The summary of a run that reached its end here (completed or diverged), else None."""
        path = self.path / SUMMARY
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("status") in FINISHED:
                return previous
        return None

    def write_summary(self, summary: dict[str, Any], before_rename: Callable[[], Any] | None = None) -> None:
        """summary.json, which marks the run complete; `before_rename`: what must be on disk
        before the name appears (logger.atomic_write_bytes)."""
        write_json(self.path / SUMMARY, summary, before_rename)


def check_resumable(then: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Continuing under other values would make a run that is neither: name the first change."""
    then, now = leaves(then), leaves(now)
    changed = [k for k in now if k in then and then[k] != now[k] and not k.startswith(FREE_ON_RESUME)]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"resume=true cannot continue {path}: it was written with {k}={then[k]!r} but this "
                          f"run has {k}={now[k]!r}{more}; rerun with the same values or into another run dir.")


def record_failure(cfg: DictConfig, error: BaseException) -> Path | None:
    """Write a `status: failed` summary.json (error, config, seeds, traceback) into the run dir,
    so that `dlntorch.collect` lists the run with why. A finished run's summary is never overwritten.
    Returns the path written, or None. Never raises: it runs while handling another error."""
    try:
        out = run_dir(cfg)
        if out is None:
            return None
        path = out / SUMMARY
        if path.is_file():
            try:
                if json.loads(path.read_text()).get("status") in FINISHED:
                    return None
            except (OSError, ValueError):
                pass
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:       # a broken interpolation: keep the raw values
            config = OmegaConf.to_container(cfg, resolve=False)
        try:
            seeds = derive_seeds(cfg)
        except Exception:
            seeds = {"seed": OmegaConf.select(cfg, "seed", default=None)}
        summary = {
            "status": "failed",
            "error": {"type": type(error).__name__, "message": str(error),
                      "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))},
            "out_dir": str(out),
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": os.uname().nodename if hasattr(os, "uname") else None,
            "overrides": hydra_overrides(),
            "checkpoint": (out / CHECKPOINT).is_file(),
            "config": config,
            "seeds": seeds,
        }
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
        return path
    except Exception as inner:     # recording must never hide the real error
        log.warning("could not record the failure in summary.json: %s", inner)
        return None
