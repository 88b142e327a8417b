"""practical_vs_flow — how far practical training drifts from gradient flow, on the same replicas.

One set of initial conditions (the preset `experiment=practical_vs_flow`: B replicas of a small
balanced start, and the same products moved along their fibres to ‖G‖ = 1), the exact flow
(optim=flow) as the reference, and practical runs — optimiser × lr × batch size × weight decay —
from exactly those initial conditions: the same seed draws the same start, and the instrument
checks that the factors at step 0 are bit-identical to the flow's.

Optimisers travel at different speeds (an Adam step is not lr long), so each practical state is
compared with the flow's state at the same energy: t_E is the flow time at which the flow's
energy (non-increasing, per replica) equals the practical run's, and the distance at equal
energy is ‖W(t) − W_flow(t_E)‖_F (the flow's product interpolated linearly in t between its
logged times; t_E clamps to the flow's ends). Against t and against t_E: that distance,
‖G(t) − G(0)‖, the effective rank and the test error (relative error on the hidden entries);
at the end the distance of the solution to the flow's limit (the flow run 4× as long). Bands
and intervals: 95 % over replicas (Student's t on the mean).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ..analysis import load_run
from .common import Notebook, slide_axes, standard_error, t975

PRESET = Path(__file__).parents[1] / "conf" / "experiment" / "practical_vs_flow.yaml"
STARTS = {"balanced": {}, "unbalanced": {"name": "unbalanced", "imbalance": 1.0}}
FLOW_LONGER = 4          # the flow's limit: the flow run this many times the horizon
QUANTITIES = {           # name → (axis label, log y)
    "distance_equal_energy": ("‖W − W_flow‖_F at equal energy", True),
    "balancedness_drift": ("‖G(t) − G(0)‖_F", True),
    "effective_rank": ("effective rank of W", False),
    "test_error": ("test error (hidden entries, relative)", True),
}
PRACTICE = {
    "gd lr 0.05": {"name": "gd", "lr": 0.05},
    "gd lr 0.2": {"name": "gd", "lr": 0.2},
    "gd lr 0.05 wd 1e-3": {"name": "gd", "lr": 0.05, "weight_decay": 1e-3},
    "sgd b 3 lr 0.05": {"name": "sgd", "lr": 0.05, "batch_size": 3, "replacement": False},
    "momentum 0.9 lr 0.005": {"name": "momentum", "lr": 0.005, "momentum": 0.9},
    "adam lr 0.005": {"name": "adam", "lr": 0.005},
    "adamw lr 0.005 wd 1e-2": {"name": "adamw", "lr": 0.005, "weight_decay": 1e-2},
    "group_rmsprop lr 0.005": {"name": "group_rmsprop", "lr": 0.005},
}
QUICK = ("gd lr 0.05", "sgd b 3 lr 0.05", "adam lr 0.005", "group_rmsprop lr 0.005")
TINY = 1e-300            # log of an energy of exactly 0


def flow_clock(horizon: float) -> np.ndarray:
    """The common grid of flow times τ on which the runs are read at equal energy."""
    return np.linspace(0.0, horizon, 161)


def preset() -> dict:
    """The preset's config as a plain dict for book.train: its values, each group named as its
    defaults list chooses it (override /task: completion → task.name = completion)."""
    raw = OmegaConf.to_container(OmegaConf.load(PRESET))
    cfg = {k: v for k, v in raw.items() if k != "defaults"}
    for entry in raw["defaults"]:
        (key, name), = entry.items()
        group = key.removeprefix("override /")
        cfg[group] = {"name": name, **cfg.get(group, {})}
    return cfg


def config(start: str, optim: dict, quick: bool, horizon: float) -> dict:
    cfg = preset()
    cfg["init"] = {**cfg["init"], **STARTS[start]}
    cfg["optim"] = dict(optim)
    cfg["run"] = {**cfg["run"], "time": horizon, "save_factors": True, "log_points": 60 if quick else 200}
    if quick:
        cfg["replicas"] = 4
    return cfg


def flow_time_at(flow_energy: np.ndarray, flow_t: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Per replica: the flow time at which the flow's energy equals `energy` (T, B), by linear
    interpolation in log E along the flow's non-increasing energy (clamped to its ends)."""
    out = np.full(energy.shape, np.nan)
    for b in range(energy.shape[1]):
        level = -np.log(np.maximum(np.minimum.accumulate(flow_energy[:, b]), TINY))   # non-decreasing
        out[:, b] = np.interp(-np.log(np.maximum(energy[:, b], TINY)), level, flow_t)
    return out


def product_at(flow_product: np.ndarray, flow_t: np.ndarray, times: np.ndarray) -> np.ndarray:
    """W_flow at per-replica times (T, B), linear in t between the flow's logged times."""
    T, B = times.shape
    m, n = flow_product.shape[2:]
    out = np.empty((T, B, m, n))
    for b in range(B):
        for i in range(m):
            for j in range(n):
                out[:, b, i, j] = np.interp(times[:, b], flow_t, flow_product[:, b, i, j])
    return out


def compare(flow, run) -> dict[str, np.ndarray]:
    """The quantities of one practical run against the flow, each (T, B); NaN where diverged."""
    f, p = flow.trajectory, run.trajectory
    matched = flow_time_at(f["energy"], f["t"], p["energy"])
    gap = p["product"] - product_at(f["product"], f["t"], matched)
    out = {"t_E": matched, "distance_equal_energy": np.sqrt((gap ** 2).sum(axis=(2, 3))),
           **{k: p[k] for k in ("balancedness_drift", "effective_rank", "test_error", "energy")}}
    dead = p["diverged"] > 0
    return {k: np.where(dead, np.nan, v) for k, v in out.items()}


def on_flow_clock(matched: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """values (T, B) read on the flow's clock: at each τ of `grid`, per replica, the value at the
    first logged time whose flow time at equal energy has reached τ (NaN once the run never gets
    that far down in energy, or has diverged), so that replicas share the x axis. (len(grid), B)"""
    out = np.full((grid.size, values.shape[1]), np.nan)
    for b in range(values.shape[1]):
        reach = np.maximum.accumulate(np.nan_to_num(matched[:, b], nan=-np.inf))
        first = np.searchsorted(reach, grid, side="left")
        inside = first < reach.size
        out[inside, b] = values[first[inside], b]
    return out


def mean_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over replicas (axis 1) and the 95 % half-width of the mean, per row."""
    mean, half = np.full(values.shape[0], np.nan), np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        x = row[np.isfinite(row)]
        if x.size:
            mean[i] = x.mean()
            half[i] = t975(x.size - 1) * standard_error(x) if x.size > 1 else np.nan
    return mean, half


def log_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For log-scale panels: the geometric mean over replicas with its 95 % interval (the mean of
    log10 ± its half-width, back-transformed), which a log axis can draw; non-positive values
    (an exact 0) are left out."""
    logs = np.log10(np.where(values > 0, values, np.nan))
    mean, half = mean_band(logs)
    half = np.nan_to_num(half)
    return 10 ** mean, 10 ** (mean - half), 10 ** (mean + half)


def summary_row(start: str, label: str, optim: dict, summary: dict, q: dict, limit: np.ndarray,
                product: np.ndarray, same_start: bool) -> dict:
    live = ~np.asarray(summary["final"]["diverged"], dtype=bool)
    to_limit = np.sqrt(((product[-1] - limit) ** 2).sum(axis=(1, 2)))[live]
    row = {"start": start, "run": label, "optimiser": optim["name"], "lr": optim["lr"],
           "batch_size": optim.get("batch_size", "full"), "weight_decay": optim.get("weight_decay", 0.0),
           "steps": summary["steps"], "t_end": summary["t"], "replicas": int(live.sum()),
           "same_start": same_start, "energy_median": float(np.median(np.asarray(summary["final"]["energy"])[live]))}

    def put(name: str, values: np.ndarray) -> None:
        x = values[np.isfinite(values)]
        row[f"{name}_mean"] = float(x.mean()) if x.size else math.nan
        row[f"{name}_ci"] = t975(x.size - 1) * standard_error(x) if x.size > 1 else math.nan

    put("distance_to_flow_limit", to_limit)
    put("max_distance_equal_energy", np.nanmax(q["distance_equal_energy"], axis=0)[live])
    for name in ("balancedness_drift", "effective_rank", "test_error"):
        put(f"{name}_final", q[name][-1][live])
    return row


def measure(book: Notebook) -> None:
    quick = book.quick
    base = preset()
    horizon = 20.0 if quick else float(base["run"]["time"])
    runs = {k: PRACTICE[k] for k in (QUICK if quick else PRACTICE)}
    book.note(preset=base, starts=STARTS, horizon=horizon, flow_horizon=FLOW_LONGER * horizon, practice=runs)
    rows, curves, on_clock, plotted = [], [], [], {}
    for start in STARTS:
        flow_optim = {"name": "flow", "lr": base["optim"]["lr"]}
        flow_cfg = config(start, flow_optim, quick, FLOW_LONGER * horizon)
        flow_cfg["run"]["log_points"] *= 2       # a fine grid for the interpolation at equal energy
        flow_summary = book.train(flow_cfg)
        flow = load_run(flow_summary["out_dir"])
        f = flow.trajectory
        limit = f["product"][-1]
        start_factors = [f[f"factor_{p}"][0] for p in range(1, flow.config["model"]["depth"] + 1)]
        within = f["t"] <= horizon + 1e-9       # the flow's own curves over the practical horizon
        flow_q = {"t_E": np.broadcast_to(f["t"][:, None], f["energy"].shape),
                  "distance_equal_energy": np.zeros_like(f["energy"]),
                  **{k: f[k] for k in ("balancedness_drift", "effective_rank", "test_error", "energy")}}
        plotted[start] = {"flow": ({k: v[within] for k, v in flow_q.items()}, f["t"][within])}
        rows.append(summary_row(start, "flow", flow_optim, flow_summary,
                                {k: v[within] for k, v in flow_q.items()}, limit, f["product"][within], True))
        for label, optim in runs.items():
            summary = book.train(config(start, optim, quick, horizon))
            run = load_run(summary["out_dir"])
            p = run.trajectory
            same = all(np.array_equal(p[f"factor_{k}"][0], w0) for k, w0 in enumerate(start_factors, start=1))
            q = compare(flow, run)
            rows.append(summary_row(start, label, optim, summary, q, limit, p["product"], same))
            plotted[start][label] = (q, p["t"])
            more_curves, more_on_clock = tabulate(start, label, q, p, horizon)
            curves += more_curves
            on_clock += more_on_clock
    book.table(rows)
    book.table(curves, "curves.csv")
    book.table(on_clock, "curves_equal_energy.csv")
    say_findings(book, rows)
    draw(book, plotted, horizon, "t_E", "figure.png")
    draw(book, plotted, horizon, "t", "figure_t.png")


def tabulate(start: str, label: str, q: dict, trajectory: dict, horizon: float) -> tuple[list, list]:
    """The curves of one run, mean and 95 % half-width over replicas: against its own t (with the
    flow time at equal energy), and on the flow's clock (on_flow_clock)."""
    bands = {name: mean_band(q[name]) for name in ("t_E", *QUANTITIES)}
    against_t = [{"start": start, "run": label, "step": int(trajectory["step"][i]), "t": float(t),
                  **{f"{name}_{part}": float(band[j][i]) for name, band in bands.items()
                     for j, part in enumerate(("mean", "ci"))}}
                 for i, t in enumerate(trajectory["t"])]
    grid = flow_clock(horizon)
    clocked = {name: mean_band(on_flow_clock(q["t_E"], q[name], grid)) for name in QUANTITIES}
    on_clock = [{"start": start, "run": label, "t_E": float(tau),
                 **{f"{name}_{part}": float(band[j][k]) for name, band in clocked.items()
                    for j, part in enumerate(("mean", "ci"))}}
                for k, tau in enumerate(grid)]
    return against_t, on_clock


def say_findings(book: Notebook, rows: list[dict]) -> None:
    same = all(r["same_start"] for r in rows)
    book.say(("Every practical run started from factors bit-identical to the flow's at step 0"
              if same else "Some runs did NOT start from the flow's factors: "
              + ", ".join(f"{r['start']} {r['run']}" for r in rows if not r["same_start"])) + ".",
             same_start=same)

    def pm(r: dict, name: str, digits: int = 2) -> str:
        return f"{r[f'{name}_mean']:.{digits}g} ± {r[f'{name}_ci']:.{digits}g}"

    for start in STARTS:
        mine = [r for r in rows if r["start"] == start]
        flow = mine[0]
        book.say(f"{start} start (t = {mine[1]['t_end']:g}, 95 % over {flow['replicas']} replicas): the flow "
                 f"reaches test error {pm(flow, 'test_error_final')} and effective rank "
                 f"{pm(flow, 'effective_rank_final', 3)}; distance of the solution to the flow's limit, "
                 "largest distance to the flow at equal energy, ‖G − G(0)‖ and test error at the end: "
                 + "; ".join(f"{r['run']}: {pm(r, 'distance_to_flow_limit')}, {pm(r, 'max_distance_equal_energy')}, "
                             f"{pm(r, 'balancedness_drift_final')}, {pm(r, 'test_error_final')}" for r in mine[1:])
                 + ".", **{f"{start}_{r['run']}": {k: v for k, v in r.items() if k.endswith(("_mean", "_ci"))}
                           for r in mine})


def draw(book: Notebook, plotted: dict, horizon: float, axis: str, name: str) -> None:
    """One row per start, one panel per quantity, one line per run with its 95 % band over replicas
    (log panels: geometric mean and its interval; linear: the mean); x: the flow's time at equal
    energy (each replica read on the flow's clock, on_flow_clock), or the run's own t."""
    grid = flow_clock(horizon)
    fig, axes = slide_axes(len(plotted), len(QUANTITIES), width=4.2, height=3.3)
    for r, (start, by_run) in enumerate(plotted.items()):
        for c, (quantity, (label, log)) in enumerate(QUANTITIES.items()):
            ax = axes[r, c]
            for k, (run, (q, t)) in enumerate(by_run.items()):
                if run == "flow" and quantity == "distance_equal_energy":
                    continue            # zero by construction
                x, y = (grid, on_flow_clock(q["t_E"], q[quantity], grid)) if axis == "t_E" else (t, q[quantity])
                if log:
                    centre, low, high = log_band(y)
                else:
                    centre, half = mean_band(y)
                    low, high = centre - np.nan_to_num(half), centre + np.nan_to_num(half)
                style = {"color": "black", "lw": 2.5} if run == "flow" else {"color": f"C{k}", "lw": 1.5}
                ax.plot(x, centre, label=run if r == 0 and c == 1 else None, **style)
                ax.fill_between(x, low, high, color=style["color"], alpha=0.15, lw=0)
            if log:
                ax.set_yscale("log")
            ax.set_xlim(0, horizon)
            ax.set_xlabel("flow time at equal energy t_E" if axis == "t_E" else "time t (Σ lr_k)")
            ax.set_ylabel(label, fontsize=11)
            ax.set_title(f"{start} start", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(loc="lower center", ncol=5, fontsize=10, frameon=False)
    book.figure(fig, name)
