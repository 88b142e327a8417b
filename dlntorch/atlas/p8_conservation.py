"""p8_conservation — problem 8: what the dynamics conserves, and how well each optimiser keeps it.

(a) The number of independent conservation laws by the Lie-algebra method (see lie.py) against
the Jacobian-rank count of the entries of the G_p (geometry.conservation_law_count), per widths.
The Jacobian count k_G is a lower bound on the true number k of laws, and D − dim of the
algebra truncated at some bracket level is an upper bound on k, so when the two meet, k = k_G:
no law beyond G exists for those widths. (b) The drift ‖G(T) − G(0)‖ over a fixed time T under
gd, sgd, momentum, adam, langevin and the exact flow against the step size, log-log with fitted
slopes. (c) One run: the energy dissipates while G stays put (flow), or creeps (gd).
"""
from __future__ import annotations

import math

import numpy as np

from ..analysis import load_run
from ..geometry import conservation_law_count
from .common import Notebook, fit_loglog, interval, slide_axes, standard_error
from .lie import lie_algebra_dimension, parameter_count

WIDTHS = ([2, 2, 2], [2, 1, 2], [1, 2, 1], [3, 2, 3], [2, 3, 2], [3, 2, 2], [2, 3, 4], [4, 2, 3],
          [2, 2, 2, 2], [2, 1, 1, 2], [3, 3, 3], [1, 3, 2, 1])
QUICK_WIDTHS = ([2, 2, 2], [2, 1, 2], [1, 2, 1])
CLIP = 1e2          # drift above this is instability, not drift: drawn off the top of panel (b)
FIT_POINTS = 4      # slopes from the smallest step sizes: large ones leave the asymptotic regime (or diverge)

# each optimiser with only its own keys (other helpers give each its own schema)
OPTIMISERS = {
    "flow": {"name": "flow"},
    "gd": {"name": "gd"},
    "sgd": {"name": "sgd", "batch_size": 1},
    "momentum": {"name": "momentum", "momentum": 0.9},
    "adam": {"name": "adam"},
    "langevin": {"name": "langevin", "beta": 1e4},
}


def counts(book: Notebook) -> list[dict]:
    rows = []
    for widths in (QUICK_WIDTHS if book.quick else WIDTHS):
        lie = lie_algebra_dimension(widths, seed=0)
        D = parameter_count(widths)
        rows.append({"widths": "-".join(map(str, widths)), "parameters": D,
                     "jacobian_count": conservation_law_count(widths, seed=0),
                     "lie_algebra_count": D - lie.dimension, "lie_dimension": lie.dimension,
                     "bracket_levels": len(lie.dimensions) - 1, "closed": lie.closed})
    return rows


def base_config(replicas: int, horizon: float) -> dict:
    """Seed 2x2 task, depth 3, unbalanced Gaussian start (G ≠ 0), run to t = horizon."""
    return {"task": {"name": "seed2x2"}, "model": {"depth": 3},
            "init": {"name": "gaussian", "scale": 0.5, "scale_of": "layer"},
            "run": {"time": horizon, "steps": 10 ** 7, "stop_energy": 0.0, "log_points": 50},
            "replicas": replicas, "seed": 0}


def drift(book: Notebook, lrs: list[float], replicas: int, horizon: float) -> list[dict]:
    rows = []
    for name, optim in OPTIMISERS.items():
        for lr in lrs:
            cfg = base_config(replicas, horizon)
            cfg["optim"] = {**optim, "lr": lr}
            summary = book.train(cfg)
            values = np.asarray(summary["final"]["balancedness_drift"], dtype=float)
            live = ~np.asarray(summary["final"]["diverged"], dtype=bool)
            values = values[live & np.isfinite(values)]
            rows.append({"optimiser": name, "lr": lr, "horizon": horizon, "replicas": int(live.sum()),
                         "drift_mean": float(values.mean()) if values.size else math.nan,
                         "drift_se": standard_error(values),
                         "G_final_norm_mean": float(np.nanmean(summary["final"]["balancedness"]))})
    return rows


def dissipation(book: Notebook, horizon: float):
    """One replica under the flow and under gd (lr 0.05): E(t) and ‖G(t) − G(0)‖."""
    runs = {}
    for name in ("flow", "gd"):
        cfg = base_config(1, horizon)
        cfg["optim"] = {**OPTIMISERS[name], "lr": 0.05}
        cfg["run"]["log_points"] = 200
        runs[name] = load_run(book.train(cfg)["out_dir"]).trajectory
    return runs


def measure(book: Notebook) -> None:
    quick = book.quick
    lrs = [0.1, 0.025] if quick else [0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625]
    replicas, horizon = (4, 1.0) if quick else (64, 5.0)
    book.note(widths=[list(w) for w in (QUICK_WIDTHS if quick else WIDTHS)], lie_seed=0, lie_points=4,
              lrs=lrs, replicas=replicas, horizon=horizon, optimisers=OPTIMISERS)

    table = counts(book)
    book.table(table)
    beyond = [r for r in table if r["lie_algebra_count"] != r["jacobian_count"]]
    sizes = [r['parameters'] for r in table]
    book.say(f"For {len(table)} widths (D = {min(sizes)}…{max(sizes)} "
             "parameters) the Lie-algebra count D − dim 𝔏 equals the Jacobian count of the G_p entries"
             + ("" if not beyond else " except at " + ", ".join(
                 f"{r['widths']} ({r['lie_algebra_count']} laws against {r['jacobian_count']}"
                 + (", the algebra closed: exact" if r["closed"] else ", upper bound") + ")" for r in beyond))
             + "; where they meet, the Jacobian count (a lower bound on the number of laws) and the truncated "
             "algebra's count (an upper bound) pin it, so no law beyond G exists there.",
             laws_beyond_G=[r["widths"] for r in beyond])

    rows = drift(book, lrs, replicas, horizon)
    book.table(rows, "drift.csv")
    fits = {}
    for name in OPTIMISERS:
        mine = [r for r in rows if r["optimiser"] == name]
        small = sorted(mine, key=lambda r: r["lr"])[:FIT_POINTS]       # the small-step regime
        fits[name] = fit_loglog([r["lr"] for r in small], [r["drift_mean"] for r in small])
    book.say("Drift ‖G(T) − G(0)‖ at T = " + f"{horizon:g} against step size, log-log slopes fitted over the "
             f"{min(FIT_POINTS, len(lrs))} smallest step sizes (95 %): "
             + "; ".join(f"{name} {interval(fit)}" for name, fit in fits.items()) + ".",
             drift_slopes={name: fit for name, fit in fits.items()})

    runs = dissipation(book, horizon)
    flow, gd = runs["flow"], runs["gd"]
    book.say(f"One replica, t ∈ [0, {horizon:g}]: E falls from {flow['energy'][0, 0]:.3g} to "
             f"{flow['energy'][-1, 0]:.3g} while ‖G(t) − G(0)‖ stays below "
             f"{np.nanmax(flow['balancedness_drift'][:, 0]):.2g} under the flow "
             f"(‖G(0)‖ = {flow['balancedness'][0, 0]:.3g}) and reaches "
             f"{np.nanmax(gd['balancedness_drift'][:, 0]):.2g} under gd at lr 0.05.")

    fig, axes = slide_axes(1, 3, width=5.5, height=4.5)
    ax = axes[0, 0]
    x = np.arange(len(table))
    ax.bar(x - 0.2, [r["jacobian_count"] for r in table], 0.4, label="Jacobian rank of G entries")
    ax.bar(x + 0.2, [r["lie_algebra_count"] for r in table], 0.4, label="D − dim Lie algebra")
    ax.set_xticks(x, [r["widths"] for r in table], rotation=60, ha="right")
    ax.set_xlabel("widths d_0-…-d_N")
    ax.set_ylabel("independent conserved quantities (count)")
    ax.set_title("(a) conservation laws")
    ax.legend()
    ax = axes[0, 1]
    for name in OPTIMISERS:
        mine = [r for r in rows if r["optimiser"] == name]
        ax.errorbar([r["lr"] for r in mine], [r["drift_mean"] for r in mine],
                    yerr=[1.96 * r["drift_se"] if np.isfinite(r["drift_se"]) else 0 for r in mine],
                    marker="o", capsize=3, label=f"{name} (slope {fits[name]['slope']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    unstable = [r for r in rows if r["drift_mean"] > CLIP]
    if unstable:      # one unstable point (momentum at a large lr) would squash every other curve
        ax.set_ylim(top=CLIP)
        ax.text(0.02, 0.02, "off the top: " + ", ".join(f"{r['optimiser']} lr {r['lr']:g} ({r['drift_mean']:.1g})"
                                                          for r in unstable), transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("step size lr (time units)")
    ax.set_ylabel(f"‖G(T) − G(0)‖_F at T = {horizon:g} (mean, 95 %)")
    ax.set_title("(b) drift of G against step size")
    ax.legend(fontsize=9)
    ax = axes[0, 2]
    floor = 1e-18       # log axes: exact zeros drawn at the floor
    ax.plot(flow["t"], np.maximum(flow["energy"][:, 0], floor), label="energy E (flow)")
    ax.plot(flow["t"], np.maximum(flow["balancedness_drift"][:, 0], floor), label="‖G(t) − G(0)‖ (flow)")
    ax.plot(gd["t"], np.maximum(gd["balancedness_drift"][:, 0], floor), "--", label="‖G(t) − G(0)‖ (gd, lr 0.05)")
    ax.axhline(flow["balancedness"][0, 0], color="grey", lw=1, label="‖G(0)‖")
    ax.set_yscale("log")
    ax.set_xlabel("time t (lr × steps)")
    ax.set_ylabel("value (dimensionless)")
    ax.set_title("(c) energy dissipates, G is conserved")
    ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
