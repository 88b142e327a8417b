"""kleinman2024 — Kleinman, Achille & Soatto (2024), "Critical learning periods emerge even in
deep linear networks": training first on a deficient set of observations and only later on the
full one leaves a deep network with a worse final solution the longer the deficit lasts; a
shallow (depth-1) model has no critical period.

Matrix completion of a rank-5 100x100 truth (the lab's convention: U V^T, spectral norm 1),
1000 observed entries until step T_switch, then 1500 (task.schedule: the first 1000 of one
random order, then the first 1500, so the sets are nested), depth 1, 2, 3, plain GD from a small
Gaussian start; the final test error (relative error on the entries never observed) against
T_switch, one curve per depth. At depth 1 gradient descent never moves an unobserved entry, so
its final test error is the same for every T_switch (the initial values of the hidden entries):
the control. --quick: 20x20, rank 2, 100 then 150 entries.
"""
from __future__ import annotations

import numpy as np

from .common import Notebook, slide_axes, standard_error


def sizes(quick: bool) -> dict:
    if quick:
        return {"size": 20, "rank": 2, "first": 100, "then": 150, "switches": [0, 1000, 4000], "after": 6000,
                "replicas": 4, "lr": 0.2}
    return {"size": 100, "rank": 5, "first": 1000, "then": 1500, "switches": [0, 2000, 5000, 10000, 20000, 40000],
            "after": 20000, "replicas": 4, "lr": 0.2}


def config(s: dict, depth: int, switch: int) -> dict:
    schedule = [{"at": 0, "observations": s["then"]}] if switch == 0 else \
        [{"at": 0, "observations": s["first"]}, {"at": switch, "observations": s["then"]}]
    return {"experiment": "kleinman2024",
            "task": {"name": "completion", "size": s["size"], "rank": s["rank"], "loss": "half_sum",
                     "schedule": schedule, "seed": 0},
            "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": 1e-3, "scale_of": "product"},
            "optim": {"name": "gd", "lr": s["lr"]},
            "run": {"steps": max(s["switches"]) + s["after"], "stop_energy": 0.0, "log_points": 100},
            "replicas": s["replicas"], "seed": 0}


def measure(book: Notebook) -> None:
    s = sizes(book.quick)
    depths = [1, 2, 3]
    book.note(**s, depths=depths, init="Gaussian, product entries of size 1e-3 (scale_of=product)")
    rows = []
    for depth in depths:
        for switch in s["switches"]:
            summary = book.train(config(s, depth, switch))
            live = ~np.asarray(summary["final"]["diverged"])
            error = np.asarray(summary["final"]["test_error"])[live]
            rows.append({"depth": depth, "T_switch": switch, "t_switch": switch * s["lr"],
                         "test_error_mean": float(error.mean()), "test_error_se": standard_error(error),
                         "train_energy_max": float(np.max(np.asarray(summary["final"]["energy"])[live])),
                         "replicas": int(live.sum()), "wall_time": summary["wall_time"]})
    book.table(rows)
    spread = {d: float(np.ptp([r["test_error_mean"] for r in rows if r["depth"] == d])) for d in depths}
    book.say("Final test error against T_switch (" + "; ".join(
        f"N={d}: " + ", ".join(f"{r['test_error_mean']:.3g}" for r in rows if r["depth"] == d) for d in depths)
        + f" for T_switch = {s['switches']}); spread over T_switch per depth: "
        + ", ".join(f"N={d}: {v:.2g}" for d, v in spread.items()) + ".", spread=spread)
    fig, axes = slide_axes()
    ax = axes[0, 0]
    for depth in depths:
        mine = [r for r in rows if r["depth"] == depth]
        ax.errorbar([r["T_switch"] for r in mine], [r["test_error_mean"] for r in mine],
                    yerr=[1.96 * (r["test_error_se"] or 0) for r in mine], marker="o", capsize=3, label=f"N = {depth}")
    ax.set_xlabel("T_switch (steps on the deficient set)")
    ax.set_ylabel("final test error")
    ax.legend()
    fig.tight_layout()
    book.figure(fig)
