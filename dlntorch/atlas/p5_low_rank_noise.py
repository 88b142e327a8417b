"""p5_low_rank_noise — problem 5: does noise carry the product onto the singular set?

Langevin from balanced factors of the product W0 = diag(1, ε) (init=file), close to rank one, on
the fully observed 2x2 task E = ½‖W − diag(1, 0)‖², whose minimiser is rank one, so the drift itself
heads for the singular set and the noise (and, downstairs, the entropy's repulsion −∇S_N/β) decides
whether the replicas get there. Per noise model (isotropic; tangential κ = 0, whose product moves
only by the drift and the mean-curvature term), β, depth N and start ε: the fraction of replicas
whose σ_min(W) fell below THRESHOLD at some logged time ≤ t (every step is logged, so a dip between
steps is all that can be missed), with Wilson 95 % intervals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analysis import load_run
from .common import Notebook, slide_axes, wilson_interval

THRESHOLD = 1e-3
MODELS = {"isotropic": {"noise": "isotropic"}, "tangential κ=0": {"noise": "tangential", "kappa": 0.0}}


def plan(quick: bool) -> dict:
    if quick:
        return dict(betas=[5.0], depths=[3], starts=[0.03], replicas=64, lr=0.01, steps=30)
    return dict(betas=[10.0, 100.0, 1000.0], depths=[2, 3, 4], starts=[0.3, 0.1, 0.03], replicas=256,
                lr=0.005, steps=200)


def files(book: Notebook, eps: float) -> tuple[dict, dict]:
    task_file, init_file = book.out / "rank_one_task.npz", book.out / f"start_{eps:g}.npz"
    np.savez(task_file, mask=np.ones((2, 2)), values=np.diag([1.0, 0.0]), truth=np.diag([1.0, 0.0]))
    np.savez(init_file, product=np.diag([1.0, eps]))
    return ({"name": "completion", "file": str(task_file), "shape": [2, 2]}, {"name": "file", "file": str(init_file)})


def measure(book: Notebook) -> None:
    grid = plan(book.quick)
    book.note(threshold=THRESHOLD, models=MODELS, task="E = ½‖W − diag(1, 0)‖² (every entry observed)", **grid)
    rows, curves = [], {}
    for model_name, model in MODELS.items():
        for N in grid["depths"]:
            for beta in grid["betas"]:
                for eps in grid["starts"]:
                    task, init = files(book, eps)
                    cfg = {"task": task, "model": {"depth": N}, "init": init,
                           "optim": {"name": "langevin", "beta": beta, "lr": grid["lr"], **model},
                           "run": {"steps": grid["steps"], "stop_energy": 0.0, "log_points": grid["steps"] + 1},
                           "replicas": grid["replicas"], "seed": 0}
                    summary = book.train(cfg)
                    traj = load_run(summary["out_dir"]).trajectory
                    hit = np.minimum.accumulate(np.nan_to_num(traj["sigma_min"], nan=np.inf), axis=0) < THRESHOLD
                    fraction = hit.mean(1)
                    curves[model_name, N, beta, eps] = (traj["t"], fraction)
                    k = int(hit[-1].sum())
                    low, high = wilson_interval(k, grid["replicas"])
                    rows.append({"model": model_name, "N": N, "beta": beta, "start_sigma_min": eps,
                                 "t": traj["t"][-1], "replicas": grid["replicas"], "hit": k,
                                 "fraction": k / grid["replicas"], "wilson_low": low, "wilson_high": high,
                                 "diverged": int(np.sum(summary["final"]["diverged"])),
                                 "sigma_min_median_end": float(np.nanmedian(traj["sigma_min"][-1]))})
                    if not book.quick:      # every step logged: ≈ 12 MB a run; the table keeps what counts
                        (Path(summary["out_dir"]) / "trajectory.npz").unlink(missing_ok=True)
    book.table(rows)
    book.say(f"Fraction of replicas with σ_min(W) < {THRESHOLD:g} by t = {rows[0]['t']:g} (Wilson 95 %), "
             "per model, N, β, "
             "start σ_min: " + "; ".join(f"{r['model']} N={r['N']} β={r['beta']:g} ε={r['start_sigma_min']:g}: "
                                         f"{r['hit']}/{r['replicas']} [{r['wilson_low']:.2f}, {r['wilson_high']:.2f}]"
                                         for r in rows) + ".")
    fig, axes = slide_axes(1, len(MODELS), width=5.5, height=4.2)
    beta_mid = grid["betas"][len(grid["betas"]) // 2]
    for ax, model_name in zip(axes[0], MODELS):
        for k, N in enumerate(grid["depths"]):
            for style, eps in zip(("-", "--", ":"), grid["starts"]):
                t, fraction = curves[model_name, N, beta_mid, eps]
                ax.plot(t, fraction, style, color=f"C{k}", label=f"N={N}, ε={eps:g}")
        ax.set(xlabel="time t", ylabel=f"fraction with σ_min < {THRESHOLD:g}", ylim=(-0.02, 1.02),
               title=f"{model_name}, β = {beta_mid:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    book.figure(fig)
