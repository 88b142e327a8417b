"""A run's logged times: snapshots of the state, observed many at a time, as rows of the
trajectory and records in TensorBoard.

A logged time records a snapshot of the state (a copy: microseconds); the observables of many
snapshots are computed in one batched call (SVDs of K·B matrices at once) when the batch is
large, every FLUSH_SECONDS of wall time (TensorBoard stays live), at checkpoints and at the end.
Observing at every logged time instead costs more than the steps of a short run.

Besides the observables, a row can keep the state itself (run.save_product, run.save_factors):
the product W (B, m, n) and the factors W_p (B, d_p, d_{p-1}), so that analysis can compute
anything afterwards (dlntorch.analysis.Run.product, .factors, .balancedness()).
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .hooks import Hooks
from .logger import TensorBoardLog, histogram_steps, to_numpy
from .metrics import check_entries, observe, product_drift
from .sharpness import observed_sharpness

FLUSH_SECONDS = 10.0          # TensorBoard lags the run by at most this much wall time
FLUSH_ELEMENTS = 1 << 22      # pending snapshot entries (×8 bytes) before observing them
OBSERVE_REPLICAS = 1 << 14    # replicas observed in one batch (a multiple of ALIGN: observed_batches), so
                              # that its temporaries (~1 KB a replica) do not grow with the row's B
SCALAR_ROWS = 8               # rows whose TensorBoard aggregates are computed together (one sort)
ALIGN = 64                    # ≥ 2 SIMD vectors of torch's widest (AVX-512: 16 float64, 32 float32)
PRODUCT_ENTRIES = 64          # run.save_product=auto keeps W when it has at most this many entries
FACTORS_WARN_BYTES = 1 << 30  # run.save_factors=true warns past this size of the saved factors


def saves_product(setting: Any, shape: tuple[int, int]) -> bool:
    """run.save_product: auto keeps the product W when m·n ≤ PRODUCT_ENTRIES (a few numbers per
    replica and logged time, next to the ~30 observables), else true or false as set."""
    return shape[0] * shape[1] <= PRODUCT_ENTRIES if setting == "auto" else bool(setting)


def factor_bytes(factors: Sequence[torch.Tensor], rows: int) -> int:
    """The size of the factors W_p (B, d_p, d_{p-1}) saved as float64 at `rows` logged times."""
    return rows * sum(f.numel() for f in factors) * 8


def readable_size(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def stability_limit(dynamics: Any) -> float | None:
    """2/lr of the next step of step-based dynamics (a schedule moves lr), beside the sharpness:
    gradient descent is stable near a point only while λ_max < 2/lr. None for the flows."""
    optimizer = getattr(dynamics, "optimizer", None)
    if optimizer is None:
        return None
    lr = float(optimizer.param_groups[0]["lr"])
    return 2 / lr if lr > 0 else math.inf        # a cosine schedule's last lr is 0: no limit


def warn_if_large(factors: Sequence[torch.Tensor], rows: int) -> None:
    size = factor_bytes(factors, rows)
    if size > FACTORS_WARN_BYTES:
        warnings.warn(f"run.save_factors=true keeps {readable_size(size)} of factors ({rows} logged times "
                      f"× {factors[0].shape[0]} replicas) in memory and in trajectory.npz; lower "
                      "run.log_points or replicas if that is too much.", stacklevel=2)


def observed_batches(K: int, B: int, size: int) -> list[list[tuple[int, int, int]]]:
    """The K·B replicas of K snapshots (snapshot after snapshot) in consecutive runs of `size`,
    each as its pieces (k, start, stop) of snapshot k's replicas. Consecutive runs of a multiple
    of ALIGN = 64, because torch's elementwise loops take 2 SIMD vectors a step and the rest one number at
    a time (pow, hypot, … round differently there): runs that start on a multiple of it split each
    loop exactly where the whole K·B would, so that every replica gets the bits it gets observed
    with all of them at once."""
    if size <= 0 or size % ALIGN:
        raise ValueError(f"size={size} is not allowed: observed batches must be a positive multiple of {ALIGN}.")
    batches = []
    for first in range(0, K * B, size):
        pieces, i, last = [], first, min(first + size, K * B)
        while i < last:
            k, b = divmod(i, B)
            pieces.append((k, b, min(B, b + last - i)))
            i += pieces[-1][2] - b
        batches.append(pieces)
    return batches


def gather(parts: Sequence[torch.Tensor], batch: list[tuple[int, int, int]]) -> torch.Tensor:
    """The replicas of one batch (observed_batches) from per-snapshot tensors `parts`."""
    return torch.cat([parts[k][b:e] for k, b, e in batch])


class Recorder:
    """The logged rows of one run: `log()` at each logged time, `flush()` to observe them.

    Reads the step, t, G0, divergence flags and trajectory of `state` (a rundir.RunState), and
    the factors and extra observables of `dynamics`; `run` is the config's run group (rank_tol,
    sigma_k, log_entries, save_product, save_factors, TensorBoard's tags and histograms), `grid`
    the logged steps; `beta` is the Langevin β (None otherwise)."""

    def __init__(self, dynamics: Any, task: Any, state: Any, run: Any, grid: np.ndarray,
                 beta: float | None, hooks: Hooks | None = None):
        self.dynamics, self.task, self.state, self.run, self.grid = dynamics, task, state, run, grid
        self.beta, self.hooks = beta, hooks or Hooks()
        check_entries(run.log_entries, task.shape)    # a data file's task: its shape is known now
        self.entries = [tuple(e) for e in run.log_entries]
        self.save_product = saves_product(run.save_product, task.shape)
        if run.save_factors:
            warn_if_large(dynamics.factors(), len(grid))
        self.sharpness = run.sharpness_iterations     # Lanczos steps per logged time; 0: off
        if self.sharpness and len(dynamics.factors()) != dynamics.depth:
            raise ConfigError(f"run.sharpness_iterations={self.sharpness} is not allowed with these dynamics: "
                              f"they integrate the product W, not the {dynamics.depth} factors whose Hessian "
                              "the sharpness is; use 0.")
        self.tb: TensorBoardLog | None = None   # opened by `open` (a resumed run purges first)
        self.pending: list[tuple] = []          # logged snapshots not yet observed
        self.last_flush = time.monotonic()

    @property
    def stochastic(self) -> bool:
        """Stochastic dynamics: the product's drift is observed, and TensorBoard carries 95 % bands
        over replicas (a run resumed from a checkpoint older than W0 has no drift)."""
        return bool(getattr(self.dynamics, "stochastic", False)) and self.state.W0 is not None

    def open(self, log_dir: Path, purge_step: int | None) -> None:
        self.tb = TensorBoardLog(log_dir, self.run.log_replicas, purge_step=purge_step, tags=self.run.tb_tags,
                                 histogram_steps=histogram_steps(self.grid, self.run.histogram_points),
                                 bands=self.stochastic)

    def snapshot(self) -> tuple:
        s = self.state
        extras = {k: v.clone() for k, v in self.dynamics.observables().items()}
        if self.sharpness and (limit := stability_limit(self.dynamics)) is not None:
            extras["stability_limit"] = torch.full_like(s.diverged, limit, dtype=self.dynamics.factors()[0].dtype)
        return (s.step, s.t, [f.clone() for f in self.dynamics.factors()], extras, s.diverged.clone())

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
        last = self.state.trajectory.last
        return None if last is None else int(last["step"])

    def rows(self, snapshots: list[tuple]) -> Iterator[dict[str, np.ndarray]]:
        """The logged rows of snapshots, in order, each as soon as its replicas are observed. The
        K·B replicas are observed OBSERVE_REPLICAS at a time (many small snapshots in one batch, a
        huge one in blocks of replicas): the observables are per replica, and the blocks aligned
        (observed_batches), so they change no bit, and the temporaries stay a block's size; only
        the rows still being filled are held (not K rows at once: fresh memory costs page faults)."""
        steps, times, factors, extras, diverged = zip(*snapshots)
        K, B = len(snapshots), diverged[0].shape[0]
        sharpness = None
        if self.sharpness:          # k Hessian-vector products for all K·B replicas at once (not in
            # blocks: the Lanczos start vectors are drawn for the whole batch, so depend on its size)
            sharpness = observed_sharpness([torch.cat(parts) for parts in zip(*factors)], self.task,
                                           self.sharpness, torch.cat(diverged))
        filling: dict[int, dict[str, np.ndarray]] = {}
        for batch in observed_batches(K, B, OBSERVE_REPLICAS):
            first = batch[0][0] * B + batch[0][1]          # the batch's place among the K·B replicas
            count = sum(e - b for _, b, e in batch)
            observed = self.observe_batch([gather(f, batch) for f in zip(*factors)], gather(diverged, batch),
                                          {name: gather([x[name] for x in extras], batch) for name in extras[0]},
                                          [gather([g] * K, batch) for g in self.state.G0],
                                          gather([self.state.W0] * K, batch) if self.stochastic else None,
                                          None if sharpness is None else sharpness[first:first + count])
            observed = to_numpy(observed)
            offset = 0
            for k, b, e in batch:
                row = filling.get(k)
                if row is None:     # snapshot k's first piece (setdefault would allocate a row per piece)
                    row = filling[k] = {name: np.empty((B, *v.shape[1:]), np.float64)
                                        for name, v in observed.items()}
                for name, values in observed.items():
                    row[name][b:e] = values[offset:offset + e - b]
                offset += e - b
                if e == B:          # snapshot k complete
                    row = filling.pop(k)
                    row["step"], row["t"] = np.asarray(steps[k]), np.asarray(times[k])
                    yield row
            del observed

    def observe_batch(self, factors: list[torch.Tensor], dead: torch.Tensor, extras: dict[str, torch.Tensor],
                      G0: list[torch.Tensor], W0: torch.Tensor | None,
                      sharpness: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The observables of one batch of replicas (their factors, divergence flags, the dynamics'
        extras, their G0 and W0, and their sharpness if observed), with the raw state where the
        run keeps it."""
        keep = self.save_product or W0 is not None
        obs = observe(factors, self.task, G0, self.run.rank_tol, beta=self.beta, depth=self.dynamics.depth,
                      diverged=dead, sigma_k=self.run.sigma_k, entries=self.entries, keep_product=keep)
        W = obs.pop("product") if keep else None
        obs.update(extras)
        if W0 is not None:          # the product's drift ‖W(t) − W(0)‖ (balance, S_N, F_β: observe)
            obs["product_drift"] = product_drift(W, W0, dead)
        if sharpness is not None:
            obs["sharpness"] = sharpness
        if self.save_product:       # the raw state: a diverged replica keeps its own values
            obs["product"] = W
        if self.run.save_factors:
            obs.update({f"factor_{p}": f for p, f in enumerate(factors, start=1)})
        obs["diverged"] = dead
        return obs

    def flush(self, to_disk: bool = False) -> None:
        """Observe the pending snapshots; append their rows to the trajectory and TensorBoard.
        `to_disk`: the events written so far reach the disk too (before a checkpoint)."""
        with self.hooks.phase("flush"):
            if self.pending:
                rows: list[dict[str, np.ndarray]] = []
                for row in self.rows(self.pending):
                    self.state.trajectory.append(row)
                    rows.append(row)
                    if len(rows) == SCALAR_ROWS:
                        self.scalars(rows)
                        rows = []
                if rows:
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
