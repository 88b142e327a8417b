"""Runs over time: trajectory.npz as pandas DataFrames, and figures. (The final values of every
run of a sweep, one row per run or replica, are `dlntorch.collect`.)

    python -m dlntorch.analysis outputs/runs/2025-06-01/12-00-00            # writes figure.png there
    python -m dlntorch.analysis <run dir> --out fig.png --observables energy singular_values

    from dlntorch.analysis import load_run, trajectory_frame, sweep_trajectories, plot_run
    run = load_run("outputs/runs/...")                   # summary, config, trajectory arrays
    run.product, run.factors, run.balancedness()         # the state (T, B, ...) when the run saved it
    df = trajectory_frame(run, ["energy"])               # long form: t, step, replica, diverged, energy
    ranks = sweep_trajectories("outputs/multirun/...", "effective_rank")   # median, q10, q90 per t
    plot_run(run, path="fig.png")
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .collect import collect, is_run_dir, run_status
from .config import CHECKPOINT, FINISHED, TRAJECTORY
from .logger import aggregate_rows
from .trajectory import read_rows

PANELS = ("energy", "effective_rank", "balancedness", "singular_values")
# quantities that decay towards 0 over decades (and the staircase of rank jumps): log y when they span one
LOG_Y = ("energy", "test_error", "hyperbola_distance", "singular_values")
SINGULAR = re.compile(r"singular_value_(\d+)")
FACTOR = re.compile(r"factor_\d+")     # factor_norm_p is an observable, factor_p the saved W_p


@dataclass
class Run:
    """A run that ended (completed or diverged), or an unfinished one as far as its last checkpoint
    (`summary` then is {"status": "unfinished", "why": …}): its summary.json, its config and
    trajectory.npz as arrays — `t`, `step` (T,), each observable (T, B), `singular_values`
    (T, B, k) and `diverged` (T, B); and the state when the run kept it: `product` W (T, B, m, n)
    (run.save_product, by default when m·n ≤ 64) and `factors` [W_1, …, W_N], each
    (T, B, d_p, d_{p-1}) (run.save_factors=true)."""
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    trajectory: dict[str, np.ndarray]

    @property
    def t(self) -> np.ndarray:
        return self.trajectory["t"]

    @property
    def step(self) -> np.ndarray:
        return self.trajectory["step"]

    @property
    def diverged(self) -> np.ndarray:
        """(T, B) bool: replica b had diverged by logged time i (the npz stores 0.0 / 1.0)."""
        return self.trajectory["diverged"] > 0

    @property
    def live(self) -> np.ndarray:
        """(B,) bool: the replicas that never diverged (a diverged replica stays frozen)."""
        return ~self.diverged.any(0)

    @property
    def replicas(self) -> int:
        return self.diverged.shape[1]

    @property
    def product(self) -> np.ndarray | None:
        """(T, B, m, n): W at every logged time, or None if the run did not save it."""
        return self.trajectory.get("product")

    @property
    def factors(self) -> list[np.ndarray] | None:
        """[W_1, …, W_N], each (T, B, d_p, d_{p-1}), or None if the run did not save them."""
        names = sorted((k for k in self.trajectory if FACTOR.fullmatch(k)), key=lambda k: int(k.split("_")[1]))
        return [self.trajectory[k] for k in names] or None

    def balancedness(self) -> list[np.ndarray]:
        """[G_1, …, G_{N-1}], each (T, B, d_p, d_p): G_p = W_{p+1}^T W_{p+1} − W_p W_p^T at every
        logged time, from the saved factors (network.balancedness_of, the lab's own rule)."""
        if self.factors is None:
            raise ValueError(f"{self.path} has no factors to compute G_p from: rerun it with run.save_factors=true")
        import torch

        from .network import balancedness_of
        return [g.numpy() for g in balancedness_of([torch.from_numpy(f) for f in self.factors])]

    @property
    def observables(self) -> list[str]:
        """The scalar observables, in the order the run logged them."""
        return [k for k, v in self.trajectory.items() if v.ndim == 2 and k != "diverged"]

    def series(self, name: str) -> np.ndarray:
        """(T, B) values of a scalar observable, or of one singular value (`singular_value_2`)."""
        if name in self.observables:
            return self.trajectory[name]
        match = SINGULAR.fullmatch(name)
        k = self.trajectory["singular_values"].shape[-1] if "singular_values" in self.trajectory else 0
        if match and 1 <= int(match[1]) <= k:
            return self.trajectory["singular_values"][:, :, int(match[1]) - 1]
        raise KeyError(f"{self.path} has no observable {name!r}: it has {', '.join(self.observables)}"
                       f" and singular_value_1..{k}")


def load_run(run_dir: str | Path) -> Run:
    """The run in `run_dir` (an unfinished one up to its last checkpoint); FileNotFoundError or
    ValueError, one sentence, when there is nothing to load."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder, so there is no run to load")
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} is not a run dir: it has no summary.json, checkpoint.pt or .hydra/")
    status, why, summary, config = run_status(path)   # collect's verdict, so both say the same
    if status == "failed":
        raise ValueError(f"{path} is a failed run with no trajectory to load ({why})")
    if status == "unfinished" and (path / CHECKPOINT).is_file() and (path / TRAJECTORY).is_file():
        return _unfinished_run(path, why)
    if status not in FINISHED:
        raise FileNotFoundError(f"{path} is not a completed run ({status}: {why})")
    if not (path / TRAJECTORY).is_file():
        raise FileNotFoundError(f"{path / TRAJECTORY} is missing although summary.json says the run completed")
    with np.load(path / TRAJECTORY) as data:
        trajectory = {name: data[name] for name in data.files}
    return Run(path, summary, config or {}, trajectory)


def _unfinished_run(path: Path, why: str) -> Run:
    """A run without summary.json, as far as its last checkpoint: the rows that checkpoint counts
    as its own (trajectory.npz may hold more, written just before a checkpoint that never came);
    `summary` holds only status "unfinished" and why."""
    import torch
    payload = torch.load(path / CHECKPOINT, map_location="cpu", weights_only=False)
    rows = read_rows(path / TRAJECTORY, payload["trajectory_rows"])
    return Run(path, {"status": "unfinished", "why": why}, payload.get("config") or {}, rows)


def _names(run: Run, observables: str | Iterable[str] | None) -> list[str]:
    if observables is None:
        return run.observables + (["singular_values"] if "singular_values" in run.trajectory else [])
    names = [observables] if isinstance(observables, str) else list(observables)
    for name in names:
        if name != "singular_values" or name not in run.trajectory:
            run.series(name)             # raises, naming what the run has
    return names


def trajectory_frame(run: Run, observables: str | Iterable[str] | None = None,
                     replicas: int | Sequence[int] | None = None) -> pd.DataFrame:
    """Long form, one row per (logged time, replica): `t`, `step`, `replica`, `diverged` and one
    column per observable (`singular_values` becomes singular_value_1..k); the values are the
    npz's own, diverged replicas included (filter on `diverged`)."""
    names = _names(run, observables)
    chosen = np.arange(run.replicas) if replicas is None else np.atleast_1d(np.asarray(replicas, dtype=np.int64))
    outside = chosen[(chosen < 0) | (chosen >= run.replicas)]
    if outside.size:
        raise IndexError(f"replica {outside[0]} is not in {run.path}: it has replicas 0..{run.replicas - 1}")
    T, B = len(run.t), len(chosen)
    columns = {"t": np.repeat(run.t, B), "step": np.repeat(run.step, B), "replica": np.tile(chosen, T),
               "diverged": run.diverged[:, chosen].reshape(-1)}
    for name in names:
        if name == "singular_values":
            for i in range(run.trajectory[name].shape[-1]):
                columns[f"singular_value_{i + 1}"] = run.trajectory[name][:, chosen, i].reshape(-1)
        else:
            columns[name] = run.series(name)[:, chosen].reshape(-1)
    return pd.DataFrame(columns)


def aggregate_trajectory(run: Run, observable: str) -> pd.DataFrame:
    """Per logged time: `t`, `step`, `live` (replicas counted), `median`, `q10`, `q90` over the
    replicas that never diverged. Left out at every time, not just after they blew up: their
    approach to infinity would swamp the band, and the last row then equals summary.json's
    aggregates (which count the replicas live at the end) exactly."""
    values = np.where(run.live, run.series(observable), np.nan)
    stats = aggregate_rows(values)       # logger's: NaN left out, numpy's linear quantiles
    return pd.DataFrame({"t": run.t, "step": run.step, "live": (~np.isnan(values)).sum(1),
                         "median": stats["median"], "q10": stats["q10"], "q90": stats["q90"]})


def sweep_trajectories(sweep_dir: str | Path, observable: str) -> pd.DataFrame:
    """`observable` over time for every completed run under `sweep_dir`, aggregated over replicas:
    columns `run`, the swept values (as in collect; listed in `df.attrs["swept"]`), then those of
    aggregate_trajectory. Failed and unfinished runs are left out (collect lists them)."""
    root = Path(sweep_dir)
    runs = collect(root, write=False)    # reading a sweep should leave no files behind
    swept = list(runs.attrs.get("swept", []))
    keys = ["run", *swept]
    frames = [aggregate_trajectory(load_run(root / rec["run"]), observable).assign(**{k: rec[k] for k in keys})
              for rec in runs[runs["status"] == "completed"].to_dict("records")]
    columns = [*keys, "t", "step", "live", "median", "q10", "q90"]
    df = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    df.attrs.update(swept=swept, observable=observable)
    return df


def plot_run(run: Run, observables: Sequence[str] | None = None, path: str | Path | None = None,
             replicas_shown: int = 3):
    """One panel per observable against t (log axis): the median over the replicas that never
    diverged, their q10–q90 band and the first `replicas_shown` of them as thin lines; for
    `singular_values` the median of each s_i. Default panels: PANELS, those the run has. Saved to
    `path` if given; returns the matplotlib Figure."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure to leak in loops

    from .report import table

    names = [n for n in PANELS if n in run.trajectory] if observables is None else _names(run, observables)
    if not names:
        raise ValueError("plot_run needs at least one observable to plot")
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    # log t shows the plateaus of rank dynamics across decades; t = 0 has no place on it
    keep = run.t > 0 if (run.t > 0).any() else np.ones(len(run.t), bool)
    t = run.t[keep]
    shown = np.flatnonzero(run.live)[:replicas_shown]
    banded = [n for n in names if n != "singular_values"] or [None]
    for ax, name in zip(axes, names):
        if name == "singular_values":
            k = run.trajectory[name].shape[-1]
            # past a handful, distinct colours run out: an ordered colormap, s_1 dark to s_k light
            colors = [f"C{i}" for i in range(k)] if k <= 6 else colormaps["viridis"](np.linspace(0, 0.9, k))
            for i in range(k):
                median = aggregate_trajectory(run, f"singular_value_{i + 1}")["median"].to_numpy()[keep]
                ax.plot(t, median, lw=1.5, color=colors[i],
                        label=f"$s_{{{i + 1}}}$" if k <= 6 or i in (0, k - 1) else None)
            ax.legend(fontsize=8, title="median", title_fontsize=8)
        else:
            stats = aggregate_trajectory(run, name)[keep]
            ax.plot(t, run.series(name)[keep][:, shown], color="0.45", lw=0.6, alpha=0.7)
            ax.fill_between(t, stats["q10"], stats["q90"], color="C0", alpha=0.25, lw=0, label="q10–q90")
            ax.plot(t, stats["median"], color="C0", lw=1.8, label="median")
            if name == banded[0]:       # one legend says what every band panel shows
                if shown.size:
                    ax.plot([], [], color="0.45", lw=0.6, label=f"replicas {', '.join(map(str, shown))}")
                ax.legend(fontsize=8)
        values = (run.trajectory[name] if name == "singular_values" else run.series(name))[keep][:, run.live]
        positive = values[np.isfinite(values) & (values > 0)]
        if name in LOG_Y and positive.size and positive.max() > 10 * positive.min():   # < a decade: linear reads better
            ax.set_yscale("log")
        ax.set(title=name, xlabel="t", xscale="log" if (run.t > 0).any() else "linear")
        _label_short_log_axis(ax)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    dead = int((~run.live).sum())
    if run.summary.get("status") == "unfinished":
        title = (f"{run.path.name}: unfinished, up to its last checkpoint "
                 f"(step {int(run.step[-1])}, t = {run.t[-1]:.4g})")
    else:
        title = table(run.summary).splitlines()[0].removeprefix("dlntorch: ")   # the run's own report header
    fig.suptitle(title + (f"\n{dead} of {run.replicas} replicas diverged (left out of the bands)" if dead else ""),
                 fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _label_short_log_axis(ax) -> None:
    # on a log axis of under ~2 decades matplotlib labels the minor ticks 2×10⁻¹, 3×10⁻¹, …, and
    # they collide; plain 0.2, 0.5, 1, 2, 5 read at a glance (longer axes: the decades suffice)
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_xlim()
    if ax.get_xscale() == "log" and hi <= 100 * lo:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "25" else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlntorch.analysis",
                                     description="Plot a run's observables against t (an unfinished run: "
                                                 "up to its last checkpoint).")
    parser.add_argument("run_dir", help="a run dir (with summary.json and trajectory.npz)")
    parser.add_argument("--out", help="where to write the figure (default: <run_dir>/figure.png)")
    parser.add_argument("--observables", nargs="+", metavar="NAME",
                        help=f"the panels (default: {' '.join(PANELS)})")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir)
        if run.summary.get("status") == "unfinished":
            print(f"dlntorch.analysis: {run.path} is unfinished ({run.summary['why']}); plotting its "
                  f"last checkpoint's {len(run.t)} logged rows", file=sys.stderr)
        out = Path(args.out) if args.out else run.path / "figure.png"
        plot_run(run, args.observables, path=out)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"dlntorch.analysis: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
