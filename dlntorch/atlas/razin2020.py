"""razin2020 — Razin & Cohen (2020), "Implicit regularization in deep learning may not be
explainable by norms": on a 2x2 completion whose zero-loss set has det W = −1, a start with
det W0 > 0 cannot reach it without the determinant passing through zero, so gradient descent
drives the loss down by letting the unobserved entry grow without bound (|W11| → ∞) while the
effective rank falls to 1: norms grow while rank falls.

Observed W12 = W21 = 1, W22 = 0 (task.entries), loss = mean over the 3 observed entries,
depth 2, 3, 4, balanced start conditioned on det W0 > 0 (init.det_sign=positive), plain GD.
Per depth and dtype (float64, float32) the lab records, along the trajectory, the loss, |W11|
(the `hidden_norm` observable: the Frobenius norm of the unobserved part) and the effective
rank, and per replica whether det W kept its sign: in exact arithmetic the flow never lets it
cross zero; a finite step or the rounding of a smallest singular value that has decayed to the
size of the last digit can (at depth 2 it decays exponentially, σ' = −2σ⟨u, ∇E v⟩).
"""
from __future__ import annotations

import numpy as np

from ..analysis import load_run
from .common import Notebook, slide_axes, wilson_interval

ENTRIES = [[0, 1, 1.0], [1, 0, 1.0], [1, 1, 0.0]]


def config(depth: int, dtype: str, steps: int, replicas: int, lr: float) -> dict:
    return {"experiment": "razin2020",
            "task": {"name": "completion", "size": 2, "entries": ENTRIES, "loss": "mean"},
            "model": {"depth": depth},
            "init": {"name": "balanced", "scale": 0.1, "scale_of": "product", "det_sign": "positive"},
            "optim": {"name": "gd", "lr": lr},
            "run": {"steps": steps, "stop_energy": 0.0, "log_points": 100},
            "replicas": replicas, "seed": 0, "dtype": dtype}


def median(values: np.ndarray, where: np.ndarray) -> float:
    """The median of the selected replicas (NaN when none is selected)."""
    return float(np.median(values[where])) if where.any() else np.nan


def measure(book: Notebook) -> None:
    quick = book.quick
    depths, dtypes = ([3], ["float64"]) if quick else ([2, 3, 4], ["float64", "float32"])
    steps, replicas, lr = (20000, 4, 0.05) if quick else (100000, 16, 0.05)
    book.note(entries=ENTRIES, depths=depths, dtypes=dtypes, steps=steps, replicas=replicas, lr=lr,
              init="balanced, product entries N(0, 0.1²), det W0 > 0 (init.det_sign=positive)")
    rows, curves = [], {}
    for depth in depths:
        for dtype in dtypes:
            summary = book.train(config(depth, dtype, steps, replicas, lr))
            tr = load_run(summary["out_dir"]).trajectory
            kept = (tr["det"] > 0).all(0)                         # det stayed positive at every logged time
            curves[(depth, dtype)] = (tr["energy"], tr["hidden_norm"], tr["effective_rank"], kept)
            low, high = wilson_interval(int(kept.sum()), kept.size)
            end = {k: tr[k][-1] for k in ("energy", "hidden_norm", "effective_rank")}
            rows.append({"depth": depth, "dtype": dtype, "replicas": kept.size,
                         "det_kept_positive": int(kept.sum()), "det_kept_low": low, "det_kept_high": high,
                         "final_loss_median": float(np.median(end["energy"])),
                         "final_abs_W11_median_kept": median(end["hidden_norm"], kept),
                         "final_abs_W11_median_flipped": median(end["hidden_norm"], ~kept),
                         "final_effective_rank_median_kept": median(end["effective_rank"], kept),
                         "wall_time": summary["wall_time"]})
    book.table(rows)
    parts = [f"N={r['depth']} {r['dtype']}: det kept its sign in {r['det_kept_positive']}/{r['replicas']}, "
             f"there |W11| = {r['final_abs_W11_median_kept']:.3g}, "
             f"effective rank {r['final_effective_rank_median_kept']:.4g} "
             f"at loss {r['final_loss_median']:.2g}" for r in rows]
    book.say(f"GD, lr = {lr:g}, {steps} steps (medians over replicas): " + "; ".join(parts) + ".")
    plot(book, curves)


def plot(book: Notebook, curves: dict) -> None:
    fig, axes = slide_axes(1, 2, width=5.5, height=4.5)
    for i, ((depth, dtype), (energy, hidden, erank, kept)) in enumerate(curves.items()):
        style = "-" if dtype == "float64" else "--"
        for b in np.flatnonzero(kept)[:4]:
            label = f"N={depth} {dtype}" if b == np.flatnonzero(kept)[0] else None
            axes[0, 0].plot(energy[1:, b], hidden[1:, b], style, color=f"C{i}", label=label)
            axes[0, 1].plot(energy[1:, b], erank[1:, b], style, color=f"C{i}", label=label)
    for ax, name in zip(axes[0], ("|W11| (unobserved entry)", "effective rank")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("loss (mean over observed entries)")
        ax.set_ylabel(name)
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=9)
    axes[0, 0].set_title("norm grows as the loss falls", fontsize=12)
    axes[0, 1].set_title("rank falls as the loss falls", fontsize=12)
    fig.tight_layout()
    book.figure(fig)
