"""A run's logged times: snapshots of the state, observed many at a time, as rows of the
trajectory and records in TensorBoard.

A logged time records a snapshot of the state (a copy: microseconds); the observables of many
snapshots are computed in one batched call (SVDs of K·B matrices at once) when the batch is
large, every FLUSH_SECONDS of wall time (TensorBoard stays live), at checkpoints and at the end.
Observing at every logged time instead costs more than the steps of a short run.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .hooks import Hooks
from .logger import TensorBoardLog, to_numpy
from .metrics import observe

FLUSH_SECONDS = 10.0          # TensorBoard lags the run by at most this much wall time
FLUSH_ELEMENTS = 1 << 22      # pending snapshot entries (×8 bytes) before observing them


class Recorder:
    """The logged rows of one run: `log()` at each logged time, `flush()` to observe them.

    Reads the step, t, G0, divergence flags and trajectory of `state` (a rundir.RunState), and
    the factors and extra observables of `dynamics`; `beta` is the Langevin β (None otherwise)."""

    def __init__(self, dynamics: Any, task: Any, state: Any, rank_tol: float, beta: float | None,
                 hooks: Hooks | None = None):
        self.dynamics, self.task, self.state = dynamics, task, state
        self.rank_tol, self.beta, self.hooks = rank_tol, beta, hooks or Hooks()
        self.tb: TensorBoardLog | None = None   # opened by `open` (a resumed run purges first)
        self.pending: list[tuple] = []          # logged snapshots not yet observed
        self.last_flush = time.monotonic()

    def open(self, log_dir: Path, replicas_shown: int, purge_step: int | None) -> None:
        self.tb = TensorBoardLog(log_dir, replicas_shown, purge_step=purge_step)

    def snapshot(self) -> tuple:
        s = self.state
        return (s.step, s.t, [f.clone() for f in self.dynamics.factors()],
                {k: v.clone() for k, v in self.dynamics.observables().items()}, s.diverged.clone())

    def log(self) -> None:
        with self.hooks.phase("log"):
            self.pending.append(self.snapshot())
            elements = len(self.pending) * sum(f.numel() for f in self.pending[0][2])
            if elements >= FLUSH_ELEMENTS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
                self.flush()

    def last_step(self) -> int | None:
        """The step of the latest logged time, observed or not; None before the first."""
        if self.pending:
            return self.pending[-1][0]
        rows = self.state.trajectory.rows
        return int(rows[-1]["step"]) if rows else None

    def rows(self, snapshots: list[tuple]) -> list[dict[str, np.ndarray]]:
        """The logged rows of snapshots, observed as one batch of K·B replicas."""
        steps, times, factors, extras, diverged = zip(*snapshots)
        K, B = len(snapshots), diverged[0].shape[0]
        dead = torch.cat(diverged)
        obs = observe([torch.cat(parts) for parts in zip(*factors)], self.task,
                      [g.repeat(K, 1, 1) for g in self.state.G0], self.rank_tol,
                      beta=self.beta, depth=self.dynamics.depth, diverged=dead)
        obs.update({k: torch.cat([extra[k] for extra in extras]) for k in extras[0]})
        arrays, dead = to_numpy(obs), dead.cpu().numpy().astype(np.float64)
        rows = []
        for k in range(K):
            row = {name: values[k * B:(k + 1) * B] for name, values in arrays.items()}
            row["diverged"] = dead[k * B:(k + 1) * B]
            row["step"], row["t"] = np.asarray(steps[k]), np.asarray(times[k])
            rows.append(row)
        return rows

    def flush(self, to_disk: bool = False) -> None:
        """Observe the pending snapshots; append their rows to the trajectory and TensorBoard.
        `to_disk`: the events written so far reach the disk too (before a checkpoint)."""
        with self.hooks.phase("flush"):
            if self.pending:
                rows = self.rows(self.pending)
                for row in rows:
                    self.state.trajectory.append(row)
                self.scalars(rows)
                self.pending.clear()
            self.last_flush = time.monotonic()
        if to_disk and self.tb is not None:
            self.tb.writer.flush()

    def scalars(self, rows: list[dict[str, np.ndarray]]) -> None:
        with self.hooks.phase("scalars"):
            self.tb.scalars(rows)

    def histograms(self, step: int, final: Mapping[str, np.ndarray]) -> None:
        """Histograms of the final row's per-replica values, diverged replicas left out."""
        self.tb.histograms(step, final, final["diverged"] > 0)

    def close(self, step: int, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The end of the run in TensorBoard: hparams with the final metrics at the final step,
        then the events file closed."""
        self.tb.hparams(hparams, metrics, step)
        self.tb.close()
