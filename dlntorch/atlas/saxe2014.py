"""saxe2014 — Saxe, McClelland & Ganguli (2014): from a small balanced start aligned with the
target, each mode of a deep linear network learns on its own, along a closed-form curve.

E = ½‖W − diag(3, 2, 1)‖² (every entry observed, half_sum loss), W_p = u0^{1/N} I (balanced,
aligned, diagonal: init=identity, scale_of=product). The diagonal stays diagonal and each mode
u_k = W_kk follows du/dt = N u^{2−2/N} (s_k − u):
    N = 2:  the logistic u(t) = s / (1 + (s/u0 − 1) e^{−2 s t}), half its target at
            t_½ = ln(s/u0 − 1) / (2 s);
    N ≥ 3:  t_½ = ∫_{u0}^{s/2} du / (N u^{2−2/N} (s − u)), by quadrature.
The lab measures each mode's time to half its target (linear interpolation between logged
times) for plain GD (t = lr·step) and for the exact flow (optim=flow), at depth 2, 3, 4.
"""
from __future__ import annotations

import math

import numpy as np

from ..analysis import load_run
from .common import Notebook, slide_axes

TARGET = (3.0, 2.0, 1.0)
U0 = 1e-3


def half_time(s: float, u0: float, depth: int, points: int = 20001) -> float:
    """t_½ of the docstring: the logistic closed form at N = 2; else Simpson's rule in x = ln u,
    where the integrand dx / (N e^{(1−2/N)x} (s − e^x)) is smooth (20001 points: error ≪ 1e-10)."""
    if depth == 2:
        return math.log(s / u0 - 1) / (2 * s)
    x = np.linspace(math.log(u0), math.log(s / 2), points)
    f = 1.0 / (depth * np.exp((1 - 2 / depth) * x) * (s - np.exp(x)))
    h = x[1] - x[0]
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def crossing(t: np.ndarray, x: np.ndarray, level: float) -> float:
    """The first time x(t) reaches `level`, linear between the two logged times around it."""
    above = np.flatnonzero(x >= level)
    if above.size == 0 or above[0] == 0:
        return math.nan
    j = above[0]
    return float(t[j - 1] + (level - x[j - 1]) / (x[j] - x[j - 1]) * (t[j] - t[j - 1]))


def config(depth: int, optim: dict, horizon: float) -> dict:
    entries = [[i, j, TARGET[i] if i == j else 0.0] for i in range(3) for j in range(3)]
    return {"experiment": "saxe2014",
            "task": {"name": "completion", "size": 3, "entries": entries, "loss": "half_sum"},
            "model": {"depth": depth},
            "init": {"name": "identity", "scale": U0, "scale_of": "product"},
            "optim": optim,
            "run": {"time": horizon, "steps": 10 ** 7, "stop_energy": 0.0, "log_points": 2000,
                    "stop_check_every": 1000},
            "replicas": 1, "seed": 0}


def measure(book: Notebook) -> None:
    depths = [2, 3] if book.quick else [2, 3, 4]
    lr = 2e-3 if book.quick else 1e-3
    dynamics = {"gd": {"name": "gd", "lr": lr}, "flow": {"name": "flow", "lr": lr}}
    book.note(target=TARGET, u0=U0, depths=depths, gd_lr=lr,
              init="W_p = u0^(1/N) I (balanced, aligned; init=identity scale_of=product)")
    rows = []
    curves = {}
    for depth in depths:
        theory = [half_time(s, U0, depth) for s in TARGET]
        horizon = 1.25 * max(theory)
        for name, optim in dynamics.items():
            summary = book.train(config(depth, optim, horizon))
            trajectory = load_run(summary["out_dir"]).trajectory
            t, sv = trajectory["t"], trajectory["singular_values"][:, 0, :]
            curves[(depth, name)] = (t, sv)
            for k, s in enumerate(TARGET):
                measured = crossing(t, sv[:, k], s / 2)
                rows.append({"depth": depth, "dynamics": name, "mode": k + 1, "target": s,
                             "t_half_measured": measured, "t_half_theory": theory[k],
                             "relative_error": measured / theory[k] - 1, "wall_time": summary["wall_time"]})
    book.table(rows)
    worst = {name: max(abs(r["relative_error"]) for r in rows if r["dynamics"] == name) for name in dynamics}
    first = {name: max(abs(r["relative_error"]) for r in rows if r["dynamics"] == name and r["mode"] == 1)
             for name in dynamics}
    book.say(f"Time to half target against the closed forms (depths {depths}, u0 = {U0:g}): the exact flow "
             f"within {100 * worst['flow']:.2g} % for every mode, GD (lr = {lr:g}) within {100 * worst['gd']:.2g} %; "
             f"first mode: flow {100 * first['flow']:.2g} %, GD {100 * first['gd']:.2g} %.",
             worst_relative_error=worst, first_mode_relative_error=first)
    plot(book, curves, depths)


def plot(book: Notebook, curves: dict, depths: list[int]) -> None:
    fig, axes = slide_axes(1, len(depths), width=4.5, height=4.0)
    for ax, depth in zip(axes[0], depths):
        t, sv = curves[(depth, "flow")]
        tg, svg = curves[(depth, "gd")]
        for k, s in enumerate(TARGET):
            ax.plot(t, sv[:, k], color=f"C{k}", label=f"s = {s:g} (flow)")
            ax.plot(tg, svg[:, k], ":", color="k", lw=1)
            ax.axvline(half_time(s, U0, depth), color=f"C{k}", ls="--", lw=0.8)
        ax.set_xlabel("time t")
        ax.set_ylabel("mode strength u_k(t)")
        ax.set_title(f"N = {depth} (dashed: closed-form t_½; dotted: GD)", fontsize=11)
    axes[0, 0].legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
