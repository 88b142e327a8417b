"""edge_of_stability — gradient descent with step sizes across 2/λ, λ the sharpness at the flow's
minimiser.

Gradient descent is stable near a minimiser only while lr · λ_max < 2 (λ_max the top eigenvalue of
the Hessian of L in all factors: the observable `sharpness`, run.sharpness_iterations). The exact
flow from B replicas of the seed task (depth 3) finds one minimiser per replica, of sharpness
λ_b; the sweep runs plain gd from the same replicas at lr = c · 2/λ*, λ* the median of the λ_b,
for factors c below and above 1, and records per lr: the sharpness against t (beside 2/lr), the
balancedness ‖G‖ at the end (the flow conserves it; a large step changes it), and which replicas
diverge (non-finite), converge (E < run.converged_energy) or neither (bounded, oscillating).
12 Lanczos steps are exact here: the depth-3 2x2 network has 12 parameters.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..analysis import load_run
from .common import Notebook, slide_axes, standard_error, t975, wilson_interval

ITERATIONS = 12          # = the parameters of a depth-3 2x2 network: Lanczos is exact
FACTORS = (0.5, 0.8, 0.95, 1.05, 1.2, 1.5, 2.0, 2.5, 3.0)
QUICK_FACTORS = (0.8, 1.5, 3.0)
SHOWN = (0.5, 0.95, 1.05, 1.5, 2.0, 2.5, 3.0)   # the factors whose sharpness panel (a) draws (all in --quick)


def base(replicas: int, horizon: float) -> dict:
    return {"task": {"name": "seed2x2"}, "model": {"depth": 3},
            "init": {"name": "gaussian", "scale": 0.3, "scale_of": "layer"},
            "run": {"time": horizon, "stop_energy": 0.0, "log_points": 100, "sharpness_iterations": ITERATIONS},
            "replicas": replicas, "seed": 0}


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    x = values[np.isfinite(values)]
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), (t975(x.size - 1) * standard_error(x) if x.size > 1 else float("nan"))


def measure(book: Notebook) -> None:
    quick = book.quick
    replicas, horizon = (4, 20.0) if quick else (32, 60.0)
    factors = QUICK_FACTORS if quick else FACTORS
    flow_cfg = base(replicas, horizon)
    flow_cfg["optim"] = {"name": "flow", "lr": 0.05}
    flow = book.train(flow_cfg)
    lam = np.asarray(flow["final"]["sharpness"], dtype=float)        # λ_b at each replica's minimiser
    G_flow = np.asarray(flow["final"]["balancedness"], dtype=float)
    centre = float(np.median(lam))
    book.note(replicas=replicas, horizon=horizon, factors=list(factors), iterations=ITERATIONS,
              flow_sharpness=lam.tolist(), flow_sharpness_median=centre)
    rows, per_replica, curves = [], [], {}
    for c in factors:
        lr = float(c * 2 / centre)
        cfg = base(replicas, horizon)
        cfg["optim"] = {"name": "gd", "lr": lr}
        summary = book.train(cfg)
        final = summary["final"]
        diverged = np.asarray(final["diverged"], dtype=bool)
        energy = np.asarray(final["energy"], dtype=float)
        converged = ~diverged & (energy < summary["config"]["run"]["converged_energy"])
        sharp = np.where(diverged, np.nan, np.asarray(final["sharpness"], dtype=float))
        G = np.where(diverged, np.nan, np.asarray(final["balancedness"], dtype=float))
        trajectory = load_run(summary["out_dir"]).trajectory
        if c in SHOWN or quick:
            curves[lr] = (trajectory["t"], trajectory["sharpness"])
        k = int(diverged.sum())
        low, high = wilson_interval(k, replicas)
        G_mean, G_ci = mean_ci(G)
        rows.append({"factor": c, "lr": lr, "two_over_lr": 2 / lr, "flow_sharpness_median": centre,
                     "above_own_limit": int((lr > 2 / lam).sum()), "replicas": replicas,
                     "diverged": k, "diverged_low": low, "diverged_high": high,
                     "converged": int(converged.sum()), "oscillating": int((~diverged & ~converged).sum()),
                     "sharpness_final_median": float(np.nanmedian(sharp)) if np.isfinite(sharp).any() else np.nan,
                     "sharpness_times_lr_over_2_median": float(np.nanmedian(sharp * lr / 2))
                     if np.isfinite(sharp).any() else np.nan,
                     "balancedness_final_mean": G_mean, "balancedness_final_ci": G_ci,
                     "flow_balancedness_mean": float(G_flow.mean())})
        for b in range(replicas):
            per_replica.append({"lr": lr, "replica": b, "flow_sharpness": lam[b], "own_limit": 2 / lam[b],
                                "diverged": bool(diverged[b]), "converged": bool(converged[b]),
                                "sharpness_final": sharp[b], "balancedness_final": G[b]})
    book.table(rows)
    book.table(per_replica, "replicas.csv")
    say_findings(book, rows, per_replica, lam, G_flow)
    draw(book, rows, per_replica, curves, centre, G_flow)


def say_findings(book: Notebook, rows: list[dict], per_replica: list[dict], lam: np.ndarray,
                 G_flow: np.ndarray) -> None:
    book.say(f"At the flow's minimisers the sharpness is λ = {np.median(lam):.3g} (median; range "
             f"{lam.min():.3g}–{lam.max():.3g} over {lam.size} replicas), so 2/λ = {2 / np.median(lam):.3g}; "
             f"the flow keeps ‖G‖ at {G_flow.mean():.3g} (mean).", flow_sharpness_median=float(np.median(lam)))
    book.say("gd at lr = c·2/λ: " + "; ".join(
        f"c = {r['factor']:g} (lr {r['lr']:.3g}): {r['converged']} converged, {r['oscillating']} oscillating, "
        f"{r['diverged']} diverged of {r['replicas']} (diverged fraction 95 % [{r['diverged_low']:.2f}, "
        f"{r['diverged_high']:.2f}]), final sharpness·lr/2 {r['sharpness_times_lr_over_2_median']:.3g} (median), "
        f"‖G‖ {r['balancedness_final_mean']:.3g} ± {r['balancedness_final_ci']:.2g}" for r in rows) + ".",
        sweep=rows)
    # does a replica's own limit 2/λ_b at its flow minimiser predict its divergence?
    above = [r for r in per_replica if r["lr"] > r["own_limit"]]
    below = [r for r in per_replica if r["lr"] <= r["own_limit"]]

    def outcome(chosen: list[dict]) -> str:
        return (f"{sum(r['diverged'] for r in chosen)} of {len(chosen)} diverged, "
                f"{sum(r['converged'] for r in chosen)} converged")

    book.say(f"Replicas whose lr exceeds their own 2/λ_b (at the flow's minimiser): {outcome(above)}; "
             f"with lr ≤ 2/λ_b: {outcome(below)}.", above_own_limit_diverged=sum(r["diverged"] for r in above),
             below_own_limit_diverged=sum(r["diverged"] for r in below))


def draw(book: Notebook, rows: list[dict], per_replica: list[dict], curves: dict, centre: float,
         G_flow: np.ndarray) -> None:
    fig, axes = slide_axes(1, 3, width=5.2, height=4.2)
    ax = axes[0, 0]
    for k, (lr, (t, sharp)) in enumerate(curves.items()):
        with warnings.catch_warnings():      # all replicas diverged at some times: an all-NaN median
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(np.where(np.isfinite(sharp), sharp, np.nan), axis=1)
        ax.plot(t, median, color=f"C{k % 10}", label=f"lr {lr:.3g}")
        ax.axhline(2 / lr, color=f"C{k % 10}", ls="--", lw=1)
    ax.set_ylim(0, 1.6 * max(centre, 2 / min(curves)))
    ax.set_xlabel("time t (lr × steps)")
    ax.set_ylabel("sharpness λ_max (median over live replicas)")
    ax.set_title("(a) sharpness; dashed: 2/lr")
    ax.legend(fontsize=8, ncol=2)
    ax = axes[0, 1]
    lrs = [r["lr"] for r in rows]
    ax.errorbar(lrs, [r["balancedness_final_mean"] for r in rows],
                yerr=[np.nan_to_num(r["balancedness_final_ci"]) for r in rows], marker="o", capsize=3,
                label="gd, at the end (mean, 95 %)")
    ax.axhline(G_flow.mean(), color="black", lw=1.5, label="flow (conserved)")
    ax.axvline(2 / centre, color="grey", ls=":", label="2/λ at the flow's minimiser")
    ax.set_yscale("log")
    ax.set_xlabel("step size lr")
    ax.set_ylabel("balancedness ‖G‖_F at the end")
    ax.set_title("(b) large steps change the balance")
    ax.legend(fontsize=9)
    ax = axes[0, 2]
    styles = {"converged": ("o", "C0"), "oscillating": ("^", "C1"), "diverged": ("x", "C3")}
    for outcome, (marker, color) in styles.items():
        chosen = [r for r in per_replica if (r["diverged"] if outcome == "diverged" else
                                             r["converged"] if outcome == "converged" else
                                             not (r["diverged"] or r["converged"]))]
        ax.scatter([r["lr"] for r in chosen], [r["own_limit"] for r in chosen], marker=marker, color=color,
                   label=outcome, alpha=0.7)
    span = [min(lrs) / 1.2, max(lrs) * 1.2]
    ax.plot(span, span, color="grey", lw=1, label="lr = 2/λ_b")
    ax.set_xlabel("step size lr")
    ax.set_ylabel("2/λ_b at the replica's flow minimiser")
    ax.set_title("(c) which replicas diverge")
    ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
