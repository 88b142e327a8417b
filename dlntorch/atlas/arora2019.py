"""arora2019 — Arora, Cohen, Hu & Luo (2019), "Implicit regularization in deep matrix
factorization": on matrix completion with few observations, deeper factorizations find
lower-rank solutions and recover the matrix where depth 2 (and the minimum nuclear norm) does not.

The paper's conventions: a rank-5 100x100 truth U V^T with Gaussian 100x5 factors normalised to
Frobenius norm 100 (task.normalise=frobenius, task.scale=100), 2000 observed entries, width 100,
depth 2, 3, 4, every factor i.i.d. Gaussian with std init^{1/N}/√n, init = 1e-3
(init.scale_of=fan_in), the loss the mean over the observed entries, stop at train loss 1e-6,
and the paper's optimiser: RMSProp with one second-moment estimate shared by all parameters
(optim=group_rmsprop, `authors_rmsprop`), beside plain GD.
The lab records the test error (relative error on the unobserved entries), the relative error
over all entries (the square root of the paper's mean squared error when ‖W*‖_F² equals the
number of entries, as here) and the effective rank of the solution per depth and optimiser.
Beside them the minimum nuclear-norm completion (dlntorch.convex, the optional extra
`dlntorch[convex]`; skipped, in one line, without cvxpy). --quick: 20x20, rank 2, Frobenius
norm 20, 160 entries.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..config import as_config, derive_seeds
from ..convex import have_cvxpy, nuclear_norm_completion, observations
from ..metrics import effective_rank
from ..tasks import build_task, relative_error
from .common import Notebook, slide_axes, standard_error

OPTIMISERS = ("group_rmsprop", "gd")
GD_LR = 0.5
# the authors' run: lr 1e-3 (their README's grid is 1e-3 and 3e-4), eps 1e-4, smoothing 0.99
AUTHORS_LR, AUTHORS_EPS = 1e-3, 1e-4


def authors_rmsprop(depth: int, size: int) -> dict:
    """The authors' shared RMSProp in the lab's group_rmsprop. Theirs divides by √(Σ_p ‖g_p‖²) + eps,
    the lab's by √(Σ_p ‖g_p‖² / P) + eps with P = N·n² parameters, so the same step is the lab's
    with lr and eps divided by √P. (Theirs also corrects v for its zero start, v/(1 − α^t); the
    lab's does not, so its first ~300 steps are up to 1/√(1 − α^t) larger: 10x at t = 1, 1.3x at
    t = 100, 1.03x at t = 300.)"""
    root = math.sqrt(depth * size * size)
    return {"name": "group_rmsprop", "lr": AUTHORS_LR / root, "eps": AUTHORS_EPS / root, "alpha": 0.99}


def optimiser_settings(optimiser: str, depth: int, size: int) -> dict:
    return authors_rmsprop(depth, size) if optimiser == "group_rmsprop" else {"name": "gd", "lr": GD_LR}


def sizes(quick: bool) -> dict:
    if quick:
        return {"size": 20, "rank": 2, "observations": 160, "norm": 20.0, "replicas": 2, "steps": 40000}
    # one replica per run, as the paper's figure (its budget 1e6 iterations; here 2e5)
    return {"size": 100, "rank": 5, "observations": 2000, "norm": 100.0, "replicas": 1, "steps": 200000}


def config(s: dict, depth: int, optimiser: str = "gd") -> dict:
    return {"experiment": "arora2019",
            "task": {"name": "completion", "size": s["size"], "rank": s["rank"], "observations": s["observations"],
                     "normalise": "frobenius", "scale": s["norm"], "loss": "mean", "seed": 0},
            "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": 1e-3, "scale_of": "fan_in"},
            "optim": optimiser_settings(optimiser, depth, s["size"]),
            "run": {"steps": s["steps"], "stop_energy": 1e-6, "log_points": 100},
            "replicas": s["replicas"], "seed": 0}


def the_task(s: dict):
    """The completion every run of the sweep trains on (task.seed fixes it), rebuilt here."""
    cfg = as_config(config(s, 2))
    return build_task(cfg.task, derive_seeds(cfg)["task"])


def nuclear_norm_row(s: dict) -> dict | None:
    """The minimum nuclear-norm completion of the same observations (None without cvxpy)."""
    if not have_cvxpy():
        return None
    task = the_task(s)
    started = time.monotonic()
    X = torch.as_tensor(nuclear_norm_completion(observations(task.mask.numpy(), task.values.numpy())))[None]
    seen = task.mask.bool()
    return {"optimiser": "nuclear_norm (cvxpy, SCS)", "depth": None,
            "test_error_mean": float(task.test_error(X)[0]), "test_error_se": None,
            "relative_error_mean": float(relative_error(X, task.truth)[0]),
            "effective_rank_mean": float(effective_rank(torch.linalg.svdvals(X))[0]),
            "train_loss_max": float(((X[0] - task.values)[seen] ** 2).mean()), "steps": None,
            "stopped_by": "solver", "replicas": 1, "wall_time": time.monotonic() - started}


def measure(book: Notebook) -> None:
    s = sizes(book.quick)
    depths = [2, 3, 4]
    book.note(**s, depths=depths,
              optimisers={o: [optimiser_settings(o, d, s["size"]) for d in depths] for o in OPTIMISERS})
    baseline = nuclear_norm_row(s)
    if baseline is None:
        book.say("The minimum nuclear-norm baseline was skipped: cvxpy is absent (pip install dlntorch[convex]).")
    rows = []
    for optimiser in OPTIMISERS:
        for depth in depths:
            summary = book.train(config(s, depth, optimiser))
            live = ~np.asarray(summary["final"]["diverged"])
            final = {k: np.asarray(summary["final"][k])[live]
                     for k in ("test_error", "relative_error", "effective_rank", "energy")}
            rows.append({"optimiser": optimiser, "depth": depth,
                         "test_error_mean": float(final["test_error"].mean()),
                         "test_error_se": standard_error(final["test_error"]),
                         "relative_error_mean": float(final["relative_error"].mean()),
                         "effective_rank_mean": float(final["effective_rank"].mean()),
                         "train_loss_max": float(final["energy"].max()), "steps": summary["steps"],
                         "stopped_by": summary["stopped_by"], "replicas": int(live.sum()),
                         "wall_time": summary["wall_time"]})
    if baseline is not None:
        rows.append(baseline)
    book.table(rows)
    problem = f"{s['size']}x{s['size']}, rank {s['rank']}, {s['observations']} entries"
    for optimiser in OPTIMISERS:
        book.say(f"{optimiser} to train loss 1e-6 ({problem}): " + "; ".join(
            f"N={r['depth']}: test error {r['test_error_mean']:.3g}, effective rank {r['effective_rank_mean']:.3g}"
            f" ({r['stopped_by']} at step {r['steps']})" for r in rows if r["optimiser"] == optimiser) + ".")
    if baseline is not None:
        book.say(f"Minimum nuclear norm ({problem}): test error {baseline['test_error_mean']:.3g}, "
                 f"effective rank {baseline['effective_rank_mean']:.3g} ({baseline['wall_time']:.0f} s).")
    figure(book, rows, depths, baseline)


def figure(book: Notebook, rows: list[dict], depths: list[int], baseline: dict | None) -> None:
    fig, axes = slide_axes(1, 2, width=5.0, height=4.0)
    for key, ax, label in (("test_error_mean", axes[0, 0], "test error (unobserved entries)"),
                           ("effective_rank_mean", axes[0, 1], "effective rank of the solution")):
        for optimiser in OPTIMISERS:
            ax.plot(depths, [r[key] for r in rows if r["optimiser"] == optimiser], "o-", label=optimiser)
        if baseline is not None:
            ax.axhline(baseline[key], color="grey", linestyle="--", label="min nuclear norm")
        ax.set_xlabel("depth N")
        ax.set_ylabel(label)
        ax.set_xticks(depths)
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend()
    fig.tight_layout()
    book.figure(fig)
