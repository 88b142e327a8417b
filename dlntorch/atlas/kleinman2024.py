"""kleinman2024 — Kleinman, Achille & Soatto (2024), "Critical learning periods emerge even in
deep linear networks": training first on a deficient set of observations and only later on the
full one leaves a deep network with a worse final solution the longer the deficit lasts; a
shallow (depth-1) model has no critical period.

The authors' matrix-completion setting (their code's defaults, matrixcompletion/ of
mjkleinman/CriticalPeriodDeepLinearNets): a rank-5 100x100 truth U V^T with Gaussian factors
normalised to Frobenius norm 100 (task.normalise=frobenius, task.scale=100), 1000 observed
entries until step T_switch, then 1500 (task.schedule: the first 1000 of one random order, then
the first 1500, so the sets are nested), the loss ½ mean over the observed entries
(task.loss=half_mean), depth 1, 2, 3 of width 100, every factor N(0, (init^{1/N}/√n)²) with
init = 1e-3 (init.scale_of=fan_in), plain GD with lr = 0.2, 30000 steps after the switch. The
paper's number is the final test loss, the mean squared error over all n² entries; with
‖W*‖_F = n that is the square of the lab's relative_error, recorded as `test_mse`. At depth 1
gradient descent never moves an unobserved entry, so its final error is the same for every
T_switch: the control. --quick: 20x20, rank 2, Frobenius norm 20, 100 then 150 entries.
"""
from __future__ import annotations

import numpy as np

from .common import Notebook, slide_axes, standard_error

# The authors' own final test losses (MSE over all entries, seed 1, one run per T_switch) from
# the info.pth files of their repository's first commit (output_nov17/NUM-EXAMPLES-EXP_depth=N-
# ntrain=1000-ntrain2=1500_..._lr=0.2_opt=sgd), rounded to 4 digits here.
AUTHORS_SWITCHES = [0, 1000, 5000, 10000, 20000, 40000, 60000, 80000, 100000]
AUTHORS_TEST_MSE = {1: [0.8516] * 9,
                    2: [0.2421, 0.2437, 0.3390, 0.3639, 0.3696, 0.3704, 0.3704, 0.3704, 0.3704],
                    3: [0.0754, 0.0443, 0.0433, 0.4148, 0.8684, 0.9266, 0.9571, 0.9701, 0.9752]}


def sizes(quick: bool) -> dict:
    if quick:
        return {"size": 20, "rank": 2, "norm": 20.0, "first": 100, "then": 150, "switches": [0, 1000, 4000],
                "after": 12000, "replicas": 4, "lr": 0.5}
    # the authors' T_switch grid up to 40000 (theirs goes on to 100000, where depth 3 has saturated);
    # one replica per run, as their figure
    return {"size": 100, "rank": 5, "norm": 100.0, "first": 1000, "then": 1500,
            "switches": [0, 1000, 5000, 10000, 20000, 40000], "after": 30000, "replicas": 1, "lr": 0.2}


def config(s: dict, depth: int, switch: int) -> dict:
    schedule = [{"at": 0, "observations": s["then"]}] if switch == 0 else \
        [{"at": 0, "observations": s["first"]}, {"at": switch, "observations": s["then"]}]
    return {"experiment": "kleinman2024",
            "task": {"name": "completion", "size": s["size"], "rank": s["rank"], "normalise": "frobenius",
                     "scale": s["norm"], "loss": "half_mean", "schedule": schedule, "seed": 0},
            "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": 1e-3, "scale_of": "fan_in"},
            "optim": {"name": "gd", "lr": s["lr"]},
            "run": {"steps": switch + s["after"], "stop_energy": 0.0, "log_points": 100},
            "replicas": s["replicas"], "seed": 0}


def measure(book: Notebook) -> None:
    s = sizes(book.quick)
    depths = [1, 2, 3]
    book.note(**s, depths=depths, init="Gaussian, every factor std init^(1/N)/sqrt(n), init = 1e-3 (scale_of=fan_in)")
    rows = []
    for depth in depths:
        for switch in s["switches"]:
            summary = book.train(config(s, depth, switch))
            live = ~np.asarray(summary["final"]["diverged"])
            error = np.asarray(summary["final"]["test_error"])[live]
            # the authors' test loss: mean squared error over all n² entries = (relative error · ‖W*‖_F / n)²
            mse = (np.asarray(summary["final"]["relative_error"])[live] * s["norm"] / s["size"]) ** 2
            rows.append({"depth": depth, "T_switch": switch, "t_switch": switch * s["lr"],
                         "test_mse_mean": float(mse.mean()), "test_mse_se": standard_error(mse),
                         "test_error_mean": float(error.mean()), "test_error_se": standard_error(error),
                         "train_energy_max": float(np.max(np.asarray(summary["final"]["energy"])[live])),
                         "replicas": int(live.sum()), "wall_time": summary["wall_time"]})
    book.table(rows)
    spread = {d: float(np.ptp([r["test_error_mean"] for r in rows if r["depth"] == d])) for d in depths}
    book.say("Final test MSE (all entries) against T_switch (" + "; ".join(
        f"N={d}: " + ", ".join(f"{r['test_mse_mean']:.3g}" for r in rows if r["depth"] == d) for d in depths)
        + f" for T_switch = {s['switches']}); spread of the unobserved entries' relative error over T_switch: "
        + ", ".join(f"N={d}: {v:.2g}" for d, v in spread.items()) + ".", spread=spread)
    fig, axes = slide_axes()
    ax = axes[0, 0]
    for depth in depths:
        mine = [r for r in rows if r["depth"] == depth]
        line = ax.errorbar([r["T_switch"] for r in mine], [r["test_mse_mean"] for r in mine],
                           yerr=[1.96 * (r["test_mse_se"] or 0) for r in mine], marker="o", capsize=3,
                           label=f"N = {depth} (lab)")
        if not book.quick:   # the authors' curve is of the full-size problem only
            ax.plot(AUTHORS_SWITCHES, AUTHORS_TEST_MSE[depth], "--", marker="x", color=line[0].get_color(),
                    label=f"N = {depth} (authors)")
    ax.set_xlabel("T_switch (steps on the deficient set)")
    ax.set_ylabel("final test MSE (all entries)")
    ax.legend()
    fig.tight_layout()
    book.figure(fig)
