"""How exactly do the lab's dynamics follow gradient flow, and at what cost?

On the seed 2x2 task (E = ½((W11 − 1)² + (W22 − 1)²)), depth 3, widths [2, 2, 2, 2], a fixed
batch of balanced initial conditions with small products (entries N(0, scale²), scale 1e-2),
integrate the upstairs gradient flow dW_p/dt = −∂L/∂W_p to time T (default 8: through the
escape from the small-init plateau; most replicas have reached the zero set, a few are still
leaving the saddle) with

  * plain gradient descent (GD) at several learning rates lr (t = lr · step),
  * fixed-step RK4 at several step sizes h,
  * adaptive Dormand–Prince (dopri5) at several tolerances (atol = 1e-2 · rtol),

and compare each final product W(T) with a tight-tolerance reference (dopri5, rtol 1e-13).
The error is the WORST replica's Frobenius error max_b ‖W_b(T) − W_b^ref(T)‖_F; the cost is the
number of ∇E evaluations (GD: one per step; RK4: four per step; dopri5: every stage, the initial
step selection and rejected steps included), as `dlntorch.dynamics.flows` counts them.

Performance claims of issue 3, measured here:
  1. at equal accuracy (error ≤ 1e-6 at T) the adaptive flow needs ≥ 100x fewer gradient
     evaluations than GD. GD's error is O(lr); the lr that reaches 1e-6 (≈ 3e-7, 2.4e7 steps,
     ~20 min here) is not affordable, so its cost is EXTRAPOLATED along the line fitted to
     the measured small-lr points (the fitted slope is printed: ≈ 1);
  2. at B = 1024 replicas the downstairs flow dW/dt = −A_3(∇E(W)) costs no more than a few
     times the upstairs flow per unit of t (same solver, same tolerances, same start; timed
     side by side in this process, best of a few repeats).

Writes into --out (default outputs/figures/): flow_accuracy.csv, flow_accuracy.json (table,
fits, claims, timings) and flow_accuracy.png (log-log error vs gradient evaluations).

    python scripts/flow_accuracy.py            # ~1 min on one core
    python scripts/flow_accuracy.py --quick    # smoke run, a few seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dlntorch.dynamics.flows import integrate_downstairs, integrate_upstairs  # noqa: E402
from dlntorch.init import balanced  # noqa: E402
from dlntorch.network import chain, factor_gradients  # noqa: E402
from dlntorch.optim import sgd_update_  # noqa: E402
from dlntorch.tasks import Seed2x2  # noqa: E402

WIDTHS = [2, 2, 2, 2]          # depth 3
TARGET_ERROR = 1e-6            # "equal accuracy" of the performance claim
TARGET_SAVING = 100.0          # GD evaluations / adaptive evaluations, at least
TARGET_COST_RATIO = 5.0        # "no more than a few times": downstairs / upstairs wall per unit t


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/figures"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: few replicas, few settings")
    parser.add_argument("--replicas", type=int, default=None, help="B for the accuracy study (64; quick 16)")
    parser.add_argument("--perf-replicas", type=int, default=None, help="B for the timing (1024; quick 256)")
    parser.add_argument("--time", type=float, default=8.0, help="the horizon T")
    parser.add_argument("--scale", type=float, default=1e-2, help="initial product entries ~ N(0, scale²)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats, best kept (3; quick 1)")
    return parser.parse_args(argv)


def initial_factors(B: int, scale: float, seed: int) -> list[torch.Tensor]:
    """What init=balanced init.scale=<scale> draws: W ~ N(0, scale²), factored in balance."""
    return balanced(WIDTHS, B, scale, "product", torch.Generator().manual_seed(seed))


def worst_error(W: torch.Tensor, reference: torch.Tensor) -> float:
    return float((W - reference).flatten(1).norm(dim=1).max())


def median_error(W: torch.Tensor, reference: torch.Tensor) -> float:
    return float((W - reference).flatten(1).norm(dim=1).median())


@torch.no_grad()
def gradient_descent(factors, grad_fn, lr: float, steps: int) -> list[torch.Tensor]:
    """W_p ← W_p − lr ∂L/∂W_p: the run loop's optim=gd, its chain rule and its kernel (one ∇E per step)."""
    factors = [f.clone() for f in factors]
    for _ in range(steps):
        sgd_update_(factors, factor_gradients(factors, grad_fn), lr, 0.0)
    return factors


def fit_power_law(x, y) -> tuple[float, float]:
    """log y = log C + slope · log x by least squares; returns (slope, C)."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(math.exp(intercept))


def accuracy_study(args, settings) -> tuple[list[dict], dict]:
    task = Seed2x2()
    T = args.time
    factors = initial_factors(args.replicas, args.scale, args.seed)
    times = [0.0, T]

    def upstairs(**solver):
        start = time.perf_counter()
        path, evaluations = integrate_upstairs(factors, task.gradient, times, **solver)
        return chain([w[-1] for w in path]), evaluations, time.perf_counter() - start

    reference, ref_evals, ref_wall = upstairs(rtol=settings["ref_rtol"], atol=settings["ref_rtol"] * 1e-2)
    check, _, _ = upstairs(rtol=settings["ref_rtol"] * 10, atol=settings["ref_rtol"] * 0.1)
    info = {"reference": {"method": "dopri5", "rtol": settings["ref_rtol"], "atol": settings["ref_rtol"] * 1e-2,
                          "evaluations": ref_evals, "wall_s": ref_wall,
                          "error_estimate": worst_error(check, reference)},
            "energy_at_T": {"median": float(task.energy(reference).median()),
                            "max": float(task.energy(reference).max())}}
    rows = []
    for lr in settings["gd_lr"]:
        steps = round(T / lr)
        if abs(steps * lr - T) > 1e-9 * T:
            raise ValueError(f"lr={lr} does not divide T={T}")
        start = time.perf_counter()
        W = chain(gradient_descent(factors, task.gradient, lr, steps))
        rows.append(dict(method="gd", parameter="lr", value=lr, evaluations=steps,
                         error=worst_error(W, reference),
                         median_error=median_error(W, reference), wall_s=time.perf_counter() - start))
    for h in settings["rk4_h"]:
        W, evaluations, wall = upstairs(method="rk4", step_size=h)
        rows.append(dict(method="rk4", parameter="h", value=h, evaluations=evaluations,
                         error=worst_error(W, reference),
                         median_error=median_error(W, reference), wall_s=wall))
    for tol in settings["dopri_rtol"]:
        W, evaluations, wall = upstairs(method="dopri5", rtol=tol, atol=tol * 1e-2)
        rows.append(dict(method="dopri5", parameter="rtol", value=tol, evaluations=evaluations,
                         error=worst_error(W, reference),
                         median_error=median_error(W, reference), wall_s=wall))
    return rows, info


def equal_accuracy_claim(rows, T: float, fit_points: int) -> dict:
    """GD evaluations to reach TARGET_ERROR (extrapolated along its fitted line) vs the cheapest
    measured RK4 / dopri5 run with error ≤ TARGET_ERROR."""
    gd = sorted((r for r in rows if r["method"] == "gd"), key=lambda r: r["value"])
    fit = gd[:fit_points]      # the smallest lr: the asymptotic O(lr) regime
    slope, C = fit_power_law([r["value"] for r in fit], [r["error"] for r in fit])
    lr_needed = (TARGET_ERROR / C) ** (1.0 / slope)
    gd_wall_per_step = sum(r["wall_s"] for r in gd) / sum(r["evaluations"] for r in gd)
    measured = [r for r in gd if r["error"] <= TARGET_ERROR]
    claim = {"target_error": TARGET_ERROR,
             "gd_fit": {"points": [r["value"] for r in fit], "slope": slope, "C": C,
                        "law": f"error ≈ {C:.3g} · lr^{slope:.3f}"},
             "gd_lr_needed": lr_needed,
             "gd_evaluations_needed": T / lr_needed,
             "gd_source": "measured" if measured else "extrapolated along the fitted line",
             "gd_wall_needed_s": T / lr_needed * gd_wall_per_step}
    if measured:
        claim["gd_evaluations_needed"] = min(r["evaluations"] for r in measured)
    for method in ("dopri5", "rk4"):
        ok = [r for r in rows if r["method"] == method and r["error"] <= TARGET_ERROR]
        best = min(ok, key=lambda r: r["evaluations"]) if ok else None
        claim[method] = None if best is None else {
            "setting": f"{best['parameter']}={best['value']:g}", "evaluations": best["evaluations"],
            "error": best["error"], "saving_vs_gd": claim["gd_evaluations_needed"] / best["evaluations"]}
    saving = claim["dopri5"]["saving_vs_gd"] if claim["dopri5"] else float("nan")
    claim["target_saving"] = TARGET_SAVING
    claim["holds"] = bool(saving >= TARGET_SAVING)
    return claim


def cost_study(args, settings) -> dict:
    """Wall time per unit t of the upstairs and downstairs (N = 3, raw t) flows, same start."""
    task = Seed2x2()
    T = args.time
    factors = initial_factors(args.perf_replicas, args.scale, args.seed + 1)
    W0 = chain(factors)
    out = {"replicas": args.perf_replicas, "T": T, "repeats": args.repeats, "solvers": []}
    for rtol in settings["perf_rtol"]:
        solver = dict(method="dopri5", rtol=rtol, atol=rtol * 1e-2)
        walls = {"upstairs": [], "downstairs": []}
        for _ in range(args.repeats):     # interleaved, best kept: the cores are shared
            start = time.perf_counter()
            path, up_evals = integrate_upstairs(factors, task.gradient, [0.0, T], **solver)
            walls["upstairs"].append(time.perf_counter() - start)
            start = time.perf_counter()
            down, down_evals = integrate_downstairs(W0, task.gradient, [0.0, T], len(factors), **solver)
            walls["downstairs"].append(time.perf_counter() - start)
        up, dn = min(walls["upstairs"]), min(walls["downstairs"])
        out["solvers"].append({
            **solver,
            "upstairs": {"evaluations": up_evals, "wall_s": up, "wall_per_t": up / T,
                         "wall_per_evaluation_us": 1e6 * up / up_evals},
            "downstairs": {"evaluations": down_evals, "wall_s": dn, "wall_per_t": dn / T,
                           "wall_per_evaluation_us": 1e6 * dn / down_evals},
            "ratio_per_t": dn / up,
            "ratio_per_evaluation": (dn / down_evals) / (up / up_evals),
            "max_product_distance": worst_error(chain([w[-1] for w in path]), down[-1]),
        })
    worst = max(s["ratio_per_t"] for s in out["solvers"])
    out.update(target_ratio=TARGET_COST_RATIO, worst_ratio_per_t=worst, holds=bool(worst <= TARGET_COST_RATIO))
    return out


def write_table(rows, out: Path) -> None:
    import csv
    with open(out / "flow_accuracy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, claim, T: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    styles = {"gd": ("GD (lr)", "o", "C0"), "rk4": ("RK4 (h)", "s", "C1"), "dopri5": ("dopri5 (rtol)", "^", "C2")}
    for method, (label, marker, colour) in styles.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["evaluations"])
        x, y = [r["evaluations"] for r in pts], [max(r["error"], 1e-16) for r in pts]
        ax.loglog(x, y, marker=marker, color=colour, label=label)
        offset = (-30, -8) if method == "dopri5" else (4, 4)    # dopri5 left of its line, others right
        for r in pts[:: max(1, len(pts) // 4)]:
            ax.annotate(f"{r['value']:g}", (r["evaluations"], max(r["error"], 1e-16)), fontsize=7,
                        textcoords="offset points", xytext=offset, color=colour)
    fit = claim["gd_fit"]
    gd_max = max(r["evaluations"] for r in rows if r["method"] == "gd")
    xs = np.geomspace(gd_max, claim["gd_evaluations_needed"] * 1.5, 20)
    ax.loglog(xs, fit["C"] * (T / xs) ** fit["slope"], "--", color="C0", alpha=0.6,
              label=f"GD extrapolated: {fit['law']}")
    ax.loglog([claim["gd_evaluations_needed"]], [TARGET_ERROR], "x", color="C0", ms=8)
    ax.axhline(TARGET_ERROR, color="grey", lw=0.8, ls=":")
    ax.text(ax.get_xlim()[0] * 1.2, TARGET_ERROR * 1.3, f"error {TARGET_ERROR:g}", color="grey", fontsize=8)
    if claim["dopri5"]:
        ax.set_title(f"seed 2x2, depth 3, T = {T:g}: dopri5 needs {claim['dopri5']['saving_vs_gd']:.3g}x "
                     f"fewer ∇E than GD at error {TARGET_ERROR:g}", fontsize=9)
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("worst-replica error ‖W(T) − W_ref(T)‖_F")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    if args.quick:
        args.replicas = args.replicas or 16
        args.perf_replicas = args.perf_replicas or 256
        args.repeats = args.repeats or 1
        settings = dict(ref_rtol=1e-12, gd_lr=[0.1, 0.05, 0.02, 0.01],
                        rk4_h=[0.2, 0.1, 0.05], dopri_rtol=[1e-4, 1e-6, 1e-8], perf_rtol=[1e-8])
    else:
        args.replicas = args.replicas or 64
        args.perf_replicas = args.perf_replicas or 1024
        args.repeats = args.repeats or 3
        settings = dict(ref_rtol=1e-13,
                        gd_lr=[0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5],
                        rk4_h=[0.4, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005],
                        dopri_rtol=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11],
                        perf_rtol=[1e-6, 1e-10])
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    rows, info = accuracy_study(args, settings)
    claim = equal_accuracy_claim(rows, args.time, fit_points=4)
    cost = cost_study(args, settings)

    print(f"seed 2x2, depth 3, B = {args.replicas} balanced starts (product scale {args.scale:g}), T = {args.time:g}")
    print(f"energy at T: median {info['energy_at_T']['median']:.2e}, worst replica {info['energy_at_T']['max']:.2e}")
    ref = info["reference"]
    print(f"reference: dopri5 rtol {ref['rtol']:g}, {ref['evaluations']} evaluations; "
          f"its error (vs rtol x10) ≈ {ref['error_estimate']:.1e}\n")
    print(f"{'method':8} {'setting':>12} {'∇E evals':>10} {'worst error':>12} {'median error':>13} {'wall s':>8}")
    for r in rows:
        print(f"{r['method']:8} {r['parameter'] + '=' + format(r['value'], 'g'):>12} {r['evaluations']:>10d} "
              f"{r['error']:>12.3e} {r['median_error']:>13.3e} {r['wall_s']:>8.3f}")
    fit = claim["gd_fit"]
    print(f"\nGD fit on lr ≤ {max(fit['points']):g}: {fit['law']}")
    print(f"Claim 1 (error ≤ {TARGET_ERROR:g} at T): GD needs lr ≈ {claim['gd_lr_needed']:.2e}, i.e. "
          f"{claim['gd_evaluations_needed']:.3g} evaluations ({claim['gd_source']}; ≈ "
          f"{claim['gd_wall_needed_s']:.0f} s here)")
    for method in ("dopri5", "rk4"):
        c = claim[method]
        if c:
            print(f"  {method:6}: {c['evaluations']} evaluations at {c['setting']} (error {c['error']:.1e}) "
                  f"→ {c['saving_vs_gd']:.3g}x fewer than GD")
    print(f"  target ≥ {TARGET_SAVING:g}x for the adaptive flow: {'HOLDS' if claim['holds'] else 'FAILS'}")
    print(f"\nClaim 2: wall time per unit t at B = {cost['replicas']}, dopri5, T = {cost['T']:g} "
          f"(best of {cost['repeats']}):")
    for s in cost["solvers"]:
        u, d = s["upstairs"], s["downstairs"]
        print(f"  rtol {s['rtol']:g}: upstairs {u['wall_per_t'] * 1e3:.1f} ms/t ({u['evaluations']} evals, "
              f"{u['wall_per_evaluation_us']:.0f} µs each), downstairs {d['wall_per_t'] * 1e3:.1f} ms/t "
              f"({d['evaluations']} evals, {d['wall_per_evaluation_us']:.0f} µs each): ratio {s['ratio_per_t']:.2f} "
              f"per t, {s['ratio_per_evaluation']:.2f} per evaluation; max ‖W_up − W_down‖ = "
              f"{s['max_product_distance']:.1e}")
    print(f"  target ≤ {TARGET_COST_RATIO:g}x: {'HOLDS' if cost['holds'] else 'FAILS'}")

    write_table(rows, args.out)
    plot(rows, claim, args.time, args.out / "flow_accuracy.png")
    result = {"date": time.strftime("%Y-%m-%d"), "task": "seed2x2", "widths": WIDTHS, "T": args.time,
              "replicas": args.replicas, "init": {"name": "balanced", "scale": args.scale, "scale_of": "product",
                                                   "seed": args.seed},
              "quick": args.quick, "error": "max over replicas of ‖W(T) − W_ref(T)‖_F",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              **info, "rows": rows, "equal_accuracy": claim, "cost": cost,
              "wall_s": time.perf_counter() - started}
    (args.out / "flow_accuracy.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}/flow_accuracy.csv, .json, .png in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
