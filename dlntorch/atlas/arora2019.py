"""arora2019 — Arora, Cohen, Hu & Luo (2019), "Implicit regularization in deep matrix
factorization": on matrix completion with few observations, deeper factorizations find
lower-rank solutions and recover the matrix where depth 2 (and the minimum nuclear norm) does not.

The paper's conventions, as far as the lab expresses them: a rank-5 100x100 truth U V^T with
Gaussian 100x5 factors normalised to Frobenius norm 100 (task.normalise=frobenius, task.scale=100),
2000 observed entries, width 100, depth 2, 3, 4, every factor i.i.d. Gaussian with std
init^{1/N}/√n, init = 1e-3 (init.scale_of=fan_in), the loss the mean over the observed entries,
stop at train loss 1e-6. The paper's optimiser (RMSProp with one second-moment estimate shared
by all parameters) is now `optim=group_rmsprop`, but this instrument was measured with plain GD
and has not been re-run with it: GD here (a difference the docs state). The lab
records the test error (relative error on the unobserved entries) and the effective rank of
the solution per depth. --quick: 20x20, rank 2, Frobenius norm 20, 160 entries.
"""
from __future__ import annotations

import numpy as np

from .common import Notebook, slide_axes, standard_error


def sizes(quick: bool) -> dict:
    if quick:
        return {"size": 20, "rank": 2, "observations": 160, "norm": 20.0, "steps": 40000, "replicas": 2, "lr": 0.5}
    return {"size": 100, "rank": 5, "observations": 2000, "norm": 100.0, "steps": 200000, "replicas": 2, "lr": 0.5}


def config(s: dict, depth: int) -> dict:
    return {"experiment": "arora2019",
            "task": {"name": "completion", "size": s["size"], "rank": s["rank"], "observations": s["observations"],
                     "normalise": "frobenius", "scale": s["norm"], "loss": "mean", "seed": 0},
            "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": 1e-3, "scale_of": "fan_in"},
            "optim": {"name": "gd", "lr": s["lr"]},
            "run": {"steps": s["steps"], "stop_energy": 1e-6, "log_points": 100},
            "replicas": s["replicas"], "seed": 0}


def measure(book: Notebook) -> None:
    s = sizes(book.quick)
    depths = [2, 3, 4]
    book.note(**s, depths=depths,
              optimiser="gd (the paper's shared RMSProp is optim=group_rmsprop; not re-measured with it)")
    rows = []
    for depth in depths:
        summary = book.train(config(s, depth))
        live = ~np.asarray(summary["final"]["diverged"])
        final = {k: np.asarray(summary["final"][k])[live] for k in ("test_error", "effective_rank", "energy")}
        rows.append({"depth": depth, "test_error_mean": float(final["test_error"].mean()),
                     "test_error_se": standard_error(final["test_error"]),
                     "effective_rank_mean": float(final["effective_rank"].mean()),
                     "train_loss_max": float(final["energy"].max()), "steps": summary["steps"],
                     "stopped_by": summary["stopped_by"], "replicas": int(live.sum()),
                     "wall_time": summary["wall_time"]})
    book.table(rows)
    book.say("GD to train loss 1e-6 (" + str(s["size"]) + "x" + str(s["size"]) + ", rank " + str(s["rank"]) + ", "
             + str(s["observations"]) + " entries): " + "; ".join(
                 f"N={r['depth']}: test error {r['test_error_mean']:.3g}, effective rank {r['effective_rank_mean']:.3g}"
                 f" ({r['stopped_by']} at step {r['steps']})" for r in rows) + ".")
    fig, axes = slide_axes(1, 2, width=5.0, height=4.0)
    d = [r["depth"] for r in rows]
    axes[0, 0].plot(d, [r["test_error_mean"] for r in rows], "o-")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_xlabel("depth N")
    axes[0, 0].set_ylabel("test error (unobserved entries)")
    axes[0, 1].plot(d, [r["effective_rank_mean"] for r in rows], "o-")
    axes[0, 1].set_xlabel("depth N")
    axes[0, 1].set_ylabel("effective rank of the solution")
    fig.tight_layout()
    book.figure(fig)
