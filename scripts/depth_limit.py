"""Problem 4 (infinite depth): do the downstairs flows of depth N converge as N → ∞?

On the seed 2x2 task, from ONE initial product W0, integrate the downstairs Riemannian gradient
flow in rescaled time τ = N t,

    dW/dτ = −(A_N/N)(∇E(W))    (N = inf: dW/dτ = −A_∞(∇E(W))),

for N = 1, 2, 3, 5, 10, 20, 50, 100, 200, inf (time_scale=per_depth), on one grid of τ, with dopri5
at rtol 1e-10 (errors ≲ 1e-9, far below the distances measured). A_N grows like N, so only in τ
do depths converge; and f_N/N = (xy)^{−1/N} · (midpoint rule for f_∞) = f_∞ (1 − log(xy)/N + O(1/N²)),
so the gap is O(log(xy)/N): first order in 1/N but not uniform (it grows as a singular value
→ 0). Hence the expected rate: max_τ ‖W_N(τ) − W_∞(τ)‖ ~ C/N.

The initial condition (default W0 = [[0.3, 0.1], [0.4, 0.2]], det W0 = 0.02, no symmetry) is of
moderate size on purpose: from a tiny W0 the deep flows sit on the plateau for a very long τ,
since A_∞ ~ s² (A_N/N ~ s^{2−2/N}) near 0. From this W0 the N = 1 flow (Euclidean) never moves
the off-diagonal entries; every N ≥ 2 moves them and ends on the zero set near (not on) the
rank-one hyperbola W12·W21 = 1 — the end point, its distance to the hyperbola and the time it
takes all depend on N, and converge as N → ∞.

Writes into --out (default outputs/figures/): depth_limit.csv (one row per N), depth_limit.json
(the table, the fitted slope, the f_N/N gap table, the trajectories) and depth_limit.png
(W12, W21, the (W12, W21) plane with the hyperbola, singular values and effective rank vs τ,
distance vs N on log-log with the fitted slope).

    python scripts/depth_limit.py            # a few seconds
    python scripts/depth_limit.py --quick    # smoke run
    python scripts/depth_limit.py --W0 0.3,0.2,-0.1,0.4 --tau 30
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

from dlntorch.dynamics.flows import integrate_downstairs  # noqa: E402
from dlntorch.geometry import f_inf, f_N  # noqa: E402
from dlntorch.metrics import effective_rank  # noqa: E402
from dlntorch.tasks import Seed2x2  # noqa: E402

DEPTHS = "1,2,3,5,10,20,50,100,200,inf"
QUICK_DEPTHS = "1,2,5,10,50,inf"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/figures"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer depths, coarser grid")
    parser.add_argument("--W0", default="0.3,0.1,0.4,0.2", help="W11,W12,W21,W22 of the initial product")
    parser.add_argument("--tau", type=float, default=20.0, help="horizon in rescaled time τ = N t")
    parser.add_argument("--points", type=int, default=None, help="τ grid points (801; quick 201)")
    parser.add_argument("--depths", default=None, help=f"comma-separated N, 'inf' allowed ({DEPTHS})")
    parser.add_argument("--rtol", type=float, default=None, help="dopri5 rtol (1e-10; quick 1e-8); atol = rtol/100")
    parser.add_argument("--fit-min-depth", type=int, default=5, help="fit the slope on N ≥ this (finite N)")
    return parser.parse_args(argv)


def parse_depths(text: str) -> list[float | int]:
    depths = [math.inf if d.strip().lower() == "inf" else int(d) for d in text.split(",")]
    if math.inf not in depths:
        depths.append(math.inf)      # the reference every distance is measured to
    return sorted(depths)


def label(N) -> str:
    return "∞" if math.isinf(N) else str(N)


def f_gap_table(pairs=((2.0, 1.0), (1.0, 0.5), (0.5, 0.1), (0.1, 0.01), (2.0, 0.5)),
                depths=(10, 100, 1000)) -> list[dict]:
    """N · (f_N/N − f_∞)/f_∞ against −log(xy): the first-order gap, non-uniform in (x, y)."""
    rows = []
    for x, y in pairs:
        x_t, y_t = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        inf = float(f_inf(x_t, y_t))
        row = {"x": x, "y": y, "minus_log_xy": -math.log(x * y) + 0.0}
        for N in depths:
            row[f"N_times_rel_gap_N{N}"] = N * (float(f_N(x_t, y_t, N)) / N - inf) / inf
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    depths = parse_depths(args.depths or (QUICK_DEPTHS if args.quick else DEPTHS))
    points = args.points or (201 if args.quick else 801)
    rtol = args.rtol or (1e-8 if args.quick else 1e-10)
    w0 = [float(v) for v in args.W0.split(",")]
    if len(w0) != 4:
        raise SystemExit(f"--W0 needs 4 numbers W11,W12,W21,W22, got {args.W0!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    task = Seed2x2()
    W0 = torch.tensor(w0).view(1, 2, 2)
    taus = torch.linspace(0.0, args.tau, points)
    paths, evaluations, walls = {}, {}, {}
    for N in depths:
        start = time.perf_counter()
        path, evaluations[N] = integrate_downstairs(W0, task.gradient, taus, N, time_scale="per_depth",
                                                    method="dopri5", rtol=rtol, atol=rtol * 1e-2)
        paths[N], walls[N] = path[:, 0], time.perf_counter() - start     # (T, 2, 2)

    limit = paths[math.inf]
    rows = []
    for N in depths:
        W = paths[N]
        gap = (W - limit).flatten(1).norm(dim=1)
        s = torch.linalg.svdvals(W)
        energy = task.energy(W)
        below = (energy < 1e-6).nonzero()
        rows.append({
            "N": label(N), "max_distance": float(gap.max()), "argmax_tau": float(taus[gap.argmax()]),
            "final_distance": float(gap[-1]),
            "N_times_max_distance": float(N * gap.max()) if math.isfinite(N) else None,
            "W12_final": float(W[-1, 0, 1]), "W21_final": float(W[-1, 1, 0]),
            "hyperbola_distance_final": float((1 - W[-1, 0, 1] * W[-1, 1, 0]).abs()),
            "det_final": float(torch.linalg.det(W[-1])),
            "s1_final": float(s[-1, 0]), "s2_final": float(s[-1, 1]),
            "min_s2": float(s[:, 1].min()),
            "effective_rank_final": float(effective_rank(s[-1:])), "energy_final": float(energy[-1]),
            "tau_energy_below_1e-6": float(taus[below[0, 0]]) if len(below) else None,
            "evaluations": evaluations[N], "wall_s": walls[N],
        })
    finite = [(N, r["max_distance"]) for N, r in zip(depths, rows)
              if math.isfinite(N) and N >= args.fit_min_depth]
    if len(finite) >= 2:
        slope, intercept = np.polyfit(np.log([n for n, _ in finite]), np.log([d for _, d in finite]), 1)
        fit = {"min_depth": args.fit_min_depth, "depths": [n for n, _ in finite],
               "slope": float(slope), "C": float(math.exp(intercept))}
    else:
        fit = None
    gaps = f_gap_table()

    print(f"seed 2x2, downstairs flows in τ = N t from W0 = {w0} (det {float(torch.linalg.det(W0[0])):.3g}), "
          f"τ ∈ [0, {args.tau:g}] on {points} points, dopri5 rtol {rtol:g}")
    header = (f"{'N':>4} {'max‖W_N−W_∞‖':>13} {'at τ':>6} {'N·max':>7} {'W12(τ_end)':>10} {'W21(τ_end)':>10} "
              f"{'|1−W12W21|':>10} {'s2 end':>8} {'eff.rank':>8} {'τ(E<1e-6)':>9} {'evals':>6}")
    print(header)
    for r in rows:
        n_max = "" if r["N_times_max_distance"] is None else f"{r['N_times_max_distance']:.3f}"
        tau_e = "—" if r["tau_energy_below_1e-6"] is None else f"{r['tau_energy_below_1e-6']:.2f}"
        print(f"{r['N']:>4} {r['max_distance']:>13.3e} {r['argmax_tau']:>6.2f} {n_max:>7} {r['W12_final']:>10.4f} "
              f"{r['W21_final']:>10.4f} {r['hyperbola_distance_final']:>10.4f} {r['s2_final']:>8.4f} "
              f"{r['effective_rank_final']:>8.4f} {tau_e:>9} {r['evaluations']:>6d}")
    if fit:
        print(f"fit on N ≥ {fit['min_depth']}: max distance ≈ {fit['C']:.3g} · N^{fit['slope']:.3f} "
              "(expected slope −1)")
    print("\nf_N/N − f_∞ is first order in 1/N with coefficient −log(xy) (non-uniform):")
    print(f"{'x':>5} {'y':>5} {'−log(xy)':>9} " + " ".join(f"{'N·gap N=' + k.rsplit('N', 1)[1]:>13}"
                                                        for k in gaps[0] if k.startswith("N_times")))
    for g in gaps:
        print(f"{g['x']:>5g} {g['y']:>5g} {g['minus_log_xy']:>9.4f} "
              + " ".join(f"{v:>13.4f}" for k, v in g.items() if k.startswith("N_times")))

    write_csv(rows, args.out / "depth_limit.csv")
    plot(depths, paths, taus, rows, fit, w0, args.out / "depth_limit.png")
    result = {"date": time.strftime("%Y-%m-%d"), "task": "seed2x2", "W0": w0, "tau": args.tau, "points": points,
              "rtol": rtol, "atol": rtol * 1e-2, "quick": args.quick, "time_scale": "per_depth",
              "distance": "max over the τ grid of ‖W_N(τ) − W_∞(τ)‖_F",
              "rows": rows, "fit": fit, "f_gap": gaps,
              "trajectories": {"tau": taus.tolist(), **{label(N): paths[N].flatten(1).tolist() for N in depths}},
              "wall_s": time.perf_counter() - started}
    (args.out / "depth_limit.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}/depth_limit.csv, .json, .png in {result['wall_s']:.1f} s")
    return result


def write_csv(rows, path: Path) -> None:
    import csv
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(depths, paths, taus, rows, fit, w0, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [N for N in depths if math.isfinite(N)]
    cmap = plt.get_cmap("viridis")
    colour = {N: cmap(i / max(1, len(finite))) for i, N in enumerate(finite)}
    colour[math.inf] = "crimson"
    t = taus.numpy()
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    (a_w12, a_w21, a_plane), (a_sv, a_rank, a_dist) = axes
    for N in depths:
        W = paths[N].numpy()
        s = torch.linalg.svdvals(paths[N])
        kw = dict(color=colour[N], lw=2.2 if math.isinf(N) else 1.2, label=f"N = {label(N)}")
        a_w12.plot(t, W[:, 0, 1], **kw)
        a_w21.plot(t, W[:, 1, 0], **kw)
        a_plane.plot(W[:, 0, 1], W[:, 1, 0], color=colour[N], lw=kw["lw"])
        a_plane.plot(W[-1, 0, 1], W[-1, 1, 0], "o", color=colour[N], ms=4)
        a_sv.semilogy(t, s[:, 0].numpy(), **kw)
        a_sv.semilogy(t, s[:, 1].clamp_min(1e-16).numpy(), color=colour[N], lw=kw["lw"], ls="--")
        a_rank.plot(t, effective_rank(s).numpy(), **kw)
    a_w12.set(title="W12(τ)", xlabel="τ = N t", ylabel="W12")
    a_w21.set(title="W21(τ)", xlabel="τ = N t", ylabel="W21")
    a = np.linspace(0.3, 3.0, 200)
    a_plane.plot(a, 1 / a, "k:", lw=1, label="W12·W21 = 1 (rank one)")
    a_plane.plot(w0[1], w0[2], "kx", ms=8, label="W0")
    lo = min(min(float(paths[N][:, 0, 1].min()), float(paths[N][:, 1, 0].min())) for N in depths)
    hi = max(max(float(paths[N][:, 0, 1].max()), float(paths[N][:, 1, 0].max())) for N in depths)
    pad = 0.1 * (hi - lo)
    a_plane.set(title="(W12, W21) plane (dots: end points)", xlabel="W12", ylabel="W21",
                xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
    a_sv.set(title="singular values (solid s1, dashed s2)", xlabel="τ = N t")
    a_rank.set(title="effective rank (Roy–Vetterli)", xlabel="τ = N t")
    Ns = [N for N in finite]
    d = [r["max_distance"] for N, r in zip(depths, rows) if math.isfinite(N)]
    a_dist.loglog(Ns, d, "o-", color="k", label="max_τ ‖W_N(τ) − W_∞(τ)‖")
    if fit:
        xs = np.array([min(fit["depths"]), max(Ns)], dtype=float)
        a_dist.loglog(xs, fit["C"] * xs ** fit["slope"], "--", color="crimson",
                      label=f"fit N ≥ {fit['min_depth']}: {fit['C']:.2g}·N^{fit['slope']:.2f}")
    a_dist.set(title="distance to the N = ∞ flow", xlabel="N", ylabel="max over τ of ‖·‖_F")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    a_w12.legend(fontsize=7)
    a_plane.legend(fontsize=7, loc="upper left")
    a_dist.legend(fontsize=8)
    fig.suptitle(f"seed 2x2, downstairs g^N flows in τ = N t from W0 = [[{w0[0]:g}, {w0[1]:g}], "
                 f"[{w0[2]:g}, {w0[3]:g}]]", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
