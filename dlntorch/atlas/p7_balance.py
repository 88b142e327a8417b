"""p7_balance — problem 7: does noise drive the factors towards balance, and which noise?

Langevin on the seed 2x2 task, depth 3, at one β, from an unbalanced start on M_G (init=unbalanced:
a balanced point moved along its fibre to ‖G‖ = 1) and from a balanced one on M_0 (init=balanced),
for each noise model of dlntorch.noise that runs on 2x2 factors (isotropic, gl_walk, tangential at
κ = 0 and 0.5, fibre_brownian; `balanced` is 1x1 only), at step sizes h, h/2, h/4. Read off, with
95 % bands over replicas: E‖G‖² (G = (G_p)_p, ‖G‖² = Σ_p ‖G_p‖_F²) and the balance gap E δ against
t, and the initial rate d E‖G‖²/dt: each replica's least-squares slope of ‖G‖² over the first
stretch t ≤ T₁ (averaged, standard error over replicas), extrapolated linearly in h to h → 0 by
weighted least squares (weights 1/se²; the intercept's standard error from the same fit). The
first-stretch slope is the t = 0 rate up to O(T₁) curvature, the same at every h.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..analysis import load_run
from .common import Z95, Notebook, slide_axes

MODELS = {
    "isotropic": {"noise": "isotropic"},
    "gl_walk": {"noise": "gl_walk"},
    "tangential κ=0": {"noise": "tangential", "kappa": 0.0},
    "tangential κ=0.5": {"noise": "tangential", "kappa": 0.5},
    "fibre_brownian": {"noise": "fibre_brownian"},
}
STARTS = {
    "M_G": {"name": "unbalanced", "scale": 0.1, "scale_of": "product", "imbalance": 1.0},
    "M_0": {"name": "balanced", "scale": 0.1, "scale_of": "product"},
}
BETA = 100.0


def plan(quick: bool) -> dict:
    """Grids: the full version B = 4096, h = 0.02, 0.01, 0.005 to T = 1 (first stretch T₁ = 0.1)."""
    if quick:
        return dict(replicas=64, lrs=[0.02, 0.01, 0.005], horizon=0.08, stretch=0.04)
    return dict(replicas=4096, lrs=[0.02, 0.01, 0.005], horizon=1.0, stretch=0.1)


def config(start: dict, model: dict, lr: float, replicas: int, horizon: float) -> dict:
    steps = int(round(horizon / lr))
    # log points: every step up to 100, else 52 (their even half lands on t = k·horizon/25 at every h)
    return {"task": {"name": "seed2x2"}, "model": {"depth": 3}, "init": dict(start),
            "optim": {"name": "langevin", "beta": BETA, "lr": lr, **model},
            "run": {"steps": steps, "stop_energy": 0.0, "log_points": steps + 1 if steps <= 100 else 52},
            "replicas": replicas, "seed": 0}


def band(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over replicas (axis 1, finite values) and the 95 % half-width Z95·se, per time."""
    n = np.isfinite(x).sum(1)
    mean = np.nanmean(x, 1)
    return mean, Z95 * np.nanstd(x, 1, ddof=1) / np.sqrt(n)


def initial_slopes(t: np.ndarray, y: np.ndarray, stretch: float) -> np.ndarray:
    """Each replica's least-squares slope of y (T, B) against t over t ≤ stretch, shape (B,)."""
    keep = t <= stretch + 1e-12
    tt = t[keep] - t[keep].mean()
    return (tt[:, None] * y[keep]).sum(0) / (tt @ tt)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the finite entries (replicas are independent; a slope is
    linear in the data, so its replica spread gives its standard error)."""
    x = x[np.isfinite(x)]
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def extrapolate(h: list[float], y: list[float], se: list[float]) -> tuple[float, float, float]:
    """y = a + b h by weighted least squares (weights 1/se²): (a, se(a), b), the h → 0 limit."""
    X = np.column_stack([np.ones(len(h)), h])
    w = 1 / np.square(se)
    cov = np.linalg.inv(X.T @ (w[:, None] * X))
    a, b = cov @ (X.T @ (w * np.asarray(y)))
    return float(a), float(math.sqrt(cov[0, 0])), float(b)


def verdict(rate: float, se: float) -> str:
    low, high = rate - Z95 * se, rate + Z95 * se
    return "towards balance" if high < 0 else ("away from balance" if low > 0 else "no detectable drift")


def measure(book: Notebook) -> None:
    grid = plan(book.quick)
    book.note(beta=BETA, models=MODELS, starts=STARTS, task="seed2x2", depth=3, **grid,
              rate="per-replica least-squares slope of ‖G‖² over t ≤ stretch, extrapolated linearly in h "
                   "by weighted least squares", trajectories="deleted after reading in the full version "
                   "(≈ 50 MB each); the curves are kept in curves.npz")
    rows, curves, limits, slopes = [], {}, [], {}
    for start_name, start in STARTS.items():
        for model_name, model in MODELS.items():
            rates, paired = [], []
            for lr in grid["lrs"]:
                summary = book.train(config(start, model, lr, grid["replicas"], grid["horizon"]))
                path = Path(summary["out_dir"])
                traj = load_run(path).trajectory
                t, G2, gap = traj["t"], traj["balancedness"] ** 2, traj["balance_gap"]
                diverged = int(np.sum(summary["final"]["diverged"]))
                G2_mean, G2_half = band(G2)
                gap_mean, gap_half = band(gap)
                slopes[model_name, lr] = initial_slopes(t, G2, grid["stretch"])
                rate, rate_se = mean_se(slopes[model_name, lr])
                # the same seed: every model sees the same Gaussian draws, so the difference from
                # isotropic is paired (common random numbers) and far sharper than either rate
                diff, diff_se = mean_se(slopes[model_name, lr] - slopes["isotropic", lr])
                rates.append((lr, rate, rate_se))
                paired.append((lr, diff, diff_se))
                curves[f"{start_name}|{model_name}|{lr:g}"] = np.stack([t, G2_mean, G2_half, gap_mean, gap_half])
                rows.append({"start": start_name, "model": model_name, "h": lr, "replicas": grid["replicas"],
                             "diverged": diverged, "G2_0": G2_mean[0], "G2_T": G2_mean[-1], "G2_T_ci95": G2_half[-1],
                             "gap_0": gap_mean[0], "gap_T": gap_mean[-1], "gap_T_ci95": gap_half[-1],
                             "rate_G2": rate, "rate_G2_se": rate_se,
                             "rate_minus_isotropic": diff, "rate_minus_isotropic_se": diff_se})
                if not book.quick:
                    (path / "trajectory.npz").unlink(missing_ok=True)
            a, a_se, b = extrapolate(*zip(*rates))
            limit = {"start": start_name, "model": model_name, "h": 0.0, "replicas": grid["replicas"],
                     "rate_G2": a, "rate_G2_se": a_se, "rate_slope_in_h": b, "verdict": verdict(a, a_se)}
            if model_name != "isotropic":
                d, d_se, _ = extrapolate(*zip(*paired))
                limit.update(rate_minus_isotropic=d, rate_minus_isotropic_se=d_se)
            limits.append(limit)
    book.table(rows + limits)
    np.savez_compressed(book.out / "curves.npz", **curves)
    book.say(f"Seed 2x2 task, depth 3, β = {BETA:g}, B = {grid['replicas']}, h = "
             + ", ".join(f"{h:g}" for h in grid["lrs"]) + f", t ≤ {grid['horizon']:g}: the initial rate "
             "d E‖G‖²/dt extrapolated to h → 0 (95 %), per start and noise model: "
             + "; ".join(f"{r['start']} {r['model']} {r['rate_G2']:.3g} ± {Z95 * r['rate_G2_se']:.2g} ({r['verdict']})"
                         for r in limits) + ".",
             rates_h0={f"{r['start']}|{r['model']}": [r["rate_G2"], r["rate_G2_se"]] for r in limits})
    book.say("Paired with isotropic noise (the same seed, so the same Gaussian draws), the difference of the "
             "initial rates at h → 0 (95 %): " + "; ".join(
                 f"{r['start']} {r['model']} {r['rate_minus_isotropic']:+.3g} "
                 f"± {Z95 * r['rate_minus_isotropic_se']:.2g}"
                 for r in limits if "rate_minus_isotropic" in r) + ".",
             rate_differences_h0={f"{r['start']}|{r['model']}":
                                  [r["rate_minus_isotropic"], r["rate_minus_isotropic_se"]]
                                  for r in limits if "rate_minus_isotropic" in r})
    last = [r for r in rows if r["h"] == min(grid["lrs"])]
    book.say(f"At t = {grid['horizon']:g}, h = {min(grid['lrs']):g}: E‖G‖² (95 %) "
             + "; ".join(f"{r['start']} {r['model']} {r['G2_0']:.3g} → {r['G2_T']:.3g} ± {r['G2_T_ci95']:.2g}"
                         for r in last)
             + ", and the balance gap E δ " + "; ".join(f"{r['start']} {r['model']} {r['gap_0']:.3g} → "
                                                         f"{r['gap_T']:.3g} ± {r['gap_T_ci95']:.2g}" for r in last)
             + ". Diverged replicas (overflowed moves, frozen and excluded): "
             + (", ".join(f"{r['start']} {r['model']} h={r['h']:g}: {r['diverged']}" for r in rows if r["diverged"])
                or "none") + ".")
    figure(book, rows, limits, curves, grid)


def figure(book: Notebook, rows, limits, curves, grid) -> None:
    fig, axes = slide_axes(2, 3, width=5.2, height=4.0)
    h = min(grid["lrs"])
    for i, start in enumerate(STARTS):
        for k, model in enumerate(MODELS):
            t, G2, G2_half, gap, gap_half = curves[f"{start}|{model}|{h:g}"]
            for ax, y, half in ((axes[i, 0], G2, G2_half), (axes[i, 1], gap, gap_half)):
                ax.plot(t, y, color=f"C{k}", label=model)
                ax.fill_between(t, y - half, y + half, color=f"C{k}", alpha=0.25)
            mine = [r for r in rows if r["start"] == start and r["model"] == model]
            hs = np.array([r["h"] for r in mine])
            ax = axes[i, 2]
            ax.errorbar(hs, [r["rate_G2"] for r in mine], yerr=[Z95 * r["rate_G2_se"] for r in mine],
                        fmt="o", color=f"C{k}", capsize=3)
            lim = next(r for r in limits if r["start"] == start and r["model"] == model)
            ax.errorbar([0.0], [lim["rate_G2"]], yerr=[Z95 * lim["rate_G2_se"]], fmt="s", color=f"C{k}", capsize=3)
            x = np.array([0.0, hs.max()])
            ax.plot(x, lim["rate_G2"] + lim["rate_slope_in_h"] * x, "--", color=f"C{k}", lw=1)
        axes[i, 0].set_ylabel(f"E‖G‖² from {start} (95 % band)")
        axes[i, 1].set_ylabel(f"E δ from {start} (95 % band)")
        axes[i, 2].set_ylabel(f"d E‖G‖²/dt at t≈0, from {start}")
        axes[i, 2].axhline(0, color="grey", lw=0.8)
        for ax in axes[i, :2]:
            ax.set_xlabel(f"time t (h = {h:g})")
        axes[i, 2].set_xlabel("step size h (squares: h → 0, linear fit)")
    axes[0, 0].legend(fontsize=9)
    axes[0, 0].set_title(f"balancedness, β = {BETA:g}")
    axes[0, 1].set_title("balance gap δ = Σ‖W_p‖² − N Σ s_i^{2/N}")
    axes[0, 2].set_title("initial rate, extrapolated to h → 0")
    fig.tight_layout()
    book.figure(fig)
