"""What a run writes: TensorBoard events, trajectory.npz, summary.json — and the time grid.

TensorBoard gets aggregates over live replicas of every scalar observable (tag `name/mean`,
`name/median`, `name/min`, `name/max`, `name/q10`, `name/q90`), the first few replicas
individually (`name/replica_i`), histograms of per-replica final values, and hparams.
trajectory.npz gets every observable as an array (T, B[, k]) — analysis reads that, not events.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import compat

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


def write_npz(handle, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz (np.load reads it) deflated at level 1: as small as np.savez_compressed's level 6
    on these float arrays and twice as fast, which matters at every checkpoint."""
    import zipfile
    from numpy.lib import format as npy

    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                npy.write_array(member, np.asanyarray(array), allow_pickle=False)


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


def aggregate_rows(values: np.ndarray) -> dict[str, np.ndarray]:
    """mean, median, min, max, q10, q90 of every row of (K, B), NaN entries (diverged replicas)
    left out; NaN for a row with none. Quantiles interpolate linearly (numpy's default), from one
    sort of the whole array: np.nanquantile works row by row and costs milliseconds per call."""
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    n = valid.sum(1)
    last = np.maximum(n - 1, 0)
    ordered = np.sort(values, axis=1)                  # NaN sorts last
    rows = np.arange(values.shape[0])

    def quantile(q: float) -> np.ndarray:
        position = q * last
        low = np.floor(position).astype(np.int64)
        a, b = ordered[rows, low], ordered[rows, np.minimum(low + 1, last)]
        return np.where(n > 0, a + (b - a) * (position - low), np.nan)

    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean": np.where(n > 0, np.where(valid, values, 0.0).sum(1) / n, np.nan),
                "median": quantile(0.5),
                "min": np.where(n > 0, ordered[:, 0], np.nan),
                "max": np.where(n > 0, ordered[rows, last], np.nan),
                "q10": quantile(0.1), "q90": quantile(0.9)}


def aggregate(values: np.ndarray) -> dict[str, float]:
    """The aggregates of one observable over replicas, as floats (see aggregate_rows)."""
    return {k: float(v[0]) for k, v in aggregate_rows(np.asarray(values, dtype=np.float64)[None]).items()}


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
        atomic_write_bytes(path, lambda h: write_npz(h, arrays))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, in C (google-crc32c). TensorBoard without TensorFlow computes it
    in pure Python, ~90 µs per KB: that, not the logging itself, was most of the time a logged
    point cost. Same value (tests/test_logger.py checks it against TensorBoard's)."""
    import google_crc32c
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TensorBoardLog:
    """TensorBoard events under `tb/`. Resuming purges events past the checkpoint's step."""

    def __init__(self, log_dir: Path, replicas_shown: int, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter   # imports tensorboard: do it lazily

        compat.install_event_checksums(masked_crc32c)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.replicas_shown = replicas_shown

    def scalars(self, rows: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Logged rows (each with its `step`, `t` and `diverged`) to TensorBoard: the aggregates
        of all rows from one sort, and every tag of a row as ONE Summary record (~250
        add_scalar calls, each a record of its own, would cost milliseconds per row)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        names = [k for k, v in rows[0].items() if v.ndim == 1 and k not in ("step", "t", "diverged")]
        values = np.stack([np.stack([row[k] for k in names]) for row in rows]).astype(np.float64)  # (K, n, B)
        dead = np.stack([row["diverged"] > 0 for row in rows])[:, None, :]
        K, n, B = values.shape
        stats = {a: v.reshape(K, n) for a, v in aggregate_rows(np.where(dead, np.nan, values).reshape(K * n, B)).items()}
        shown = min(self.replicas_shown, B)
        records = compat.file_writer(self.writer)    # add_scalar's own writer, where it can be reached
        for k, row in enumerate(rows):
            tags = {"time/t": float(row["t"]), "diverged/count": float(dead[k].sum())}
            for i, name in enumerate(names):
                tags.update({f"{name}/{agg}": stats[agg][k, i] for agg in AGGREGATES})
                tags.update({f"{name}/replica_{r}": values[k, i, r] for r in range(shown)})
            if records is None:
                for tag, v in tags.items():
                    self.writer.add_scalar(tag, float(v), int(row["step"]))
                continue
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in tags.items()])
            records.add_summary(summary, int(row["step"]))

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


def to_numpy(observables: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """One device→host transfer per logged time."""
    return {k: v.detach().to("cpu", torch.float64).numpy() for k, v in observables.items()}
