"""What a run writes: TensorBoard events, trajectory.npz, summary.json — and the time grid.

TensorBoard gets aggregates over live replicas of every scalar observable (tag `name/mean`,
`name/median`, `name/min`, `name/max`, `name/q10`, `name/q90`), the first few replicas
individually (`name/replica_i`), histograms of per-replica final values, and hparams.
trajectory.npz gets every observable as an array (T, B[, k]) — analysis reads that, not events.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

AGGREGATES = ("mean", "median", "min", "max", "q10", "q90")


def log_steps(total_steps: int, points: int) -> np.ndarray:
    """At most `points` distinct steps in [0, total]: half evenly spaced (late dynamics) and half
    log-spaced from step 1 (rank dynamics span decades of t); always 0 and the last step."""
    if total_steps + 1 <= points:
        return np.arange(total_steps + 1)
    half = max(points // 2, 1)
    even = np.linspace(0, total_steps, half)
    logs = np.geomspace(1, total_steps, points - half)
    steps = np.unique(np.concatenate([[0, total_steps], np.rint(even), np.rint(logs)]).astype(np.int64))
    return steps


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a reader (or a crash)
    never sees a half-written file, and the previous version survives until the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; results are for collaborators too
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, default=_jsonable, allow_nan=True)
    atomic_write_bytes(path, lambda h: h.write(text.encode()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, Tensor)):
        return np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def aggregate(values: np.ndarray) -> dict[str, float]:
    """Aggregates over the finite entries (diverged replicas are excluded); NaN if none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {name: math.nan for name in AGGREGATES}
    q10, median, q90 = np.quantile(finite, [0.1, 0.5, 0.9])
    return {"mean": float(finite.mean()), "median": float(median), "min": float(finite.min()),
            "max": float(finite.max()), "q10": float(q10), "q90": float(q90)}


class Trajectory:
    """The logged rows, kept in memory (at most run.log_points of them) and saved as npz."""

    def __init__(self, rows: list[dict[str, np.ndarray]] | None = None):
        self.rows = rows or []

    def append(self, row: dict[str, np.ndarray]) -> None:
        self.rows.append(row)

    def arrays(self) -> dict[str, np.ndarray]:
        keys = list(self.rows[0]) if self.rows else []
        return {key: np.stack([row[key] for row in self.rows]) for key in keys
                if all(key in row for row in self.rows)}

    @classmethod
    def load(cls, path: Path, rows: int) -> "Trajectory":
        """The first `rows` logged rows of a saved trajectory."""
        if rows == 0:
            return cls()
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        return cls([{key: value[i] for key, value in arrays.items()} for i in range(rows)])

    def save(self, path: Path) -> None:
        arrays = self.arrays()
        atomic_write_bytes(path, lambda h: np.savez_compressed(h, **arrays))


class TensorBoardLog:
    """TensorBoard events under `tb/`. Resuming purges events past the checkpoint's step."""

    def __init__(self, log_dir: Path, replicas_shown: int, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter   # imports tensorboard: do it lazily

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.replicas_shown = replicas_shown

    def scalars(self, step: int, t: float, row: Mapping[str, np.ndarray], diverged: np.ndarray) -> None:
        add = self.writer.add_scalar
        add("time/t", t, step)
        add("diverged/count", float(diverged.sum()), step)
        for name, values in row.items():
            if values.ndim != 1 or name in ("step", "t", "diverged"):
                continue
            live = np.where(diverged, np.nan, values)
            for agg, value in aggregate(live).items():
                add(f"{name}/{agg}", value, step)
            for i in range(min(self.replicas_shown, values.shape[0])):
                add(f"{name}/replica_{i}", float(values[i]), step)

    def histograms(self, step: int, row: Mapping[str, np.ndarray], diverged: np.ndarray) -> None:
        for name, values in row.items():
            if values.ndim == 1 and name not in ("step", "t", "diverged"):
                finite = values[np.isfinite(values) & ~diverged]
                if finite.size:
                    self.writer.add_histogram(f"final/{name}", finite, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        # run_name="." keeps the hparams in this run's own folder, so the HPARAMS tab shows one
        # row per run of a sweep next to its scalars; at the final step, so that a resumed run's
        # purge covers them
        self.writer.add_hparams(dict(hparams), {f"hparam/{k}": v for k, v in metrics.items()},
                                run_name=".", global_step=step)

    def close(self) -> None:
        self.writer.close()


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Config leaves as TensorBoard hparams (numbers, strings, bools; lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def to_numpy(observables: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """One device→host transfer per logged time."""
    return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in observables.items()}
