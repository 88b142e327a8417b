"""p2_full_rank — problem 2: which initial end-to-end matrices of the seed 2x2 task flow to a
full-rank minimiser? Phase portraits over 2-D slices of initial products (init=grid: one
replica per grid point, each product factored on its balanced fibre; one run a portrait), exact
flow (optim=flow), coloured by the limit's det W (= 1 − W12·W21 there).

A grid point counts as converged once E < 1e-10 (the run stops when all are, or at t = 1000) and
as full rank when then σ2/σ1 ≥ 1e-2 (p1's threshold, the other side). The area fraction of full-
rank limits carries the binomial standard error √(p(1 − p)/n) over the grid's n points and a
Wilson 95 % interval. Invariant sets drawn: in the diagonal plane diag(a, b) (tilted by ε = 1e-3
off it) the conformal line a = b (W = aI); in the symmetric plane [[a, b], [b, a]] the diagonal
line b = 0 (W = aI) and the lines a = ±b (rank one, on E's level sets through 0).
"""
from __future__ import annotations

import math

import numpy as np

from ..init import PLANES, grid_axes
from .common import Notebook, slide_axes, wilson_interval

THRESHOLD, CONVERGED = 1e-2, 1e-10
# the diagonal plane is an invariant set of the flow: a small generic tilt ε·R lets the portrait
# show where nearby starts go; the symmetric and random planes are drawn as they are
TILT = {"diagonal": 1e-3, "symmetric": 0.0, "random": 0.0}
# Per-replica steps (optim.step_control=per_replica) make a run cost about the sum of its grid
# points' own steps: the 18 runs (3 planes × 2 extents × 3 depths) took 247 s at 32 × 32 (4–25 s a
# run, 2-core CPU shared with other jobs); 64 × 64 would take about a quarter of an hour, and the
# issue's 256 × 256 (64 times 32 × 32) about four and a half hours, which does not fit.
FULL_POINTS = 32


def measure(book: Notebook) -> None:
    quick = book.quick
    points = 8 if quick else FULL_POINTS
    depths = [2, 3] if quick else [2, 3, 4]
    extents = [1.0] if quick else [0.1, 1.0]
    book.note(points=points, depths=depths, extents=extents, slices=list(PLANES), threshold=THRESHOLD,
              converged_below=CONVERGED, tilt=TILT,
              grid="init=grid: a, b ∈ [−extent, extent], W0 = a P + b Q + ε R (dlntorch.init.grid_products)")
    rows, portraits, grid_rows = [], {}, []
    for name in PLANES:
        for extent in extents:
            grid = {"name": "grid", "plane": name, "points": points, "a_range": [-extent, extent],
                    "b_range": [-extent, extent], "epsilon": TILT[name], "seed": 0}
            a, b = (x.numpy() for x in grid_axes(points, grid["a_range"], grid["b_range"]))
            for depth in depths:
                summary = book.train({"task": {"name": "seed2x2"}, "model": {"depth": depth}, "init": grid,
                                      "optim": {"name": "flow", "lr": 0.05},
                                      "run": {"steps": 20000, "stop_energy": CONVERGED, "log_points": 20},
                                      "replicas": points * points, "seed": 0})
                final = summary["final"]
                energy, ratio = np.asarray(final["energy"], float), np.asarray(final["sigma_ratio"], float)
                det = np.asarray(final["det"], float)
                converged = np.isfinite(energy) & (energy < CONVERGED)
                full = converged & (ratio >= THRESHOLD)
                n, k = int(converged.sum()), int(full.sum())
                p = k / n if n else math.nan
                low, high = wilson_interval(k, n)
                rows.append({"slice": name, "depth": depth, "extent": extent, "points": points * points,
                             "converged": n, "full_rank": k, "fraction": p,
                             "se": math.sqrt(p * (1 - p) / n) if n else math.nan,
                             "wilson_low": low, "wilson_high": high,
                             "wall_seconds": round(summary["wall_time"], 2)})
                portraits[(name, extent, depth)] = (a, b, np.where(converged, det, np.nan))
                grid_rows += [{"slice": name, "extent": extent, "depth": depth, "a": x, "b": y, "converged": bool(c),
                               "full_rank": bool(f), "det": d, "sigma_ratio": q}
                              for x, y, c, f, d, q in zip(a, b, converged, full, det, ratio)]
                print(f"{name} extent {extent:g} N={depth}: full rank {k}/{n} "
                      f"({summary['wall_time']:.1f} s)", flush=True)
    book.table(rows)
    book.table(grid_rows, "points.csv")        # every grid point's limit, for other plots
    book.say("Area fraction of the grid flowing to a full-rank minimiser (σ2/σ1 ≥ 1e-2 once E < 1e-10; ± se): "
             + "; ".join(f"{r['slice']} extent {r['extent']:g} N={r['depth']}: {r['fraction']:.3f} ± {r['se']:.3f}"
                         for r in rows) + ".")
    plot(book, rows, portraits, depths, extents, points)


def plot(book, rows, portraits, depths, extents, points) -> None:
    fig, axes = slide_axes(1, 4, width=4.6, height=4.4)
    depth, extent = depths[-1], extents[-1]
    for ax, name in zip(axes[0, :3], PLANES):
        _, _, det = portraits[(name, extent, depth)]
        cmap = __import__("matplotlib").colormaps["RdBu_r"].with_extremes(bad="darkgrey")  # grey: E ≥ 1e-10 at the end
        image = ax.imshow(det.reshape(points, points), origin="lower", cmap=cmap, vmin=-1.5, vmax=1.5,
                          extent=(-extent, extent, -extent, extent))
        line = np.array([-extent, extent])
        if name == "diagonal":
            ax.plot(line, line, "k--", lw=1, label="a = b (W = aI)")
        if name == "symmetric":
            ax.plot(line, 0 * line, "k--", lw=1, label="b = 0 (W = aI)")
            ax.plot(line, line, "k:", lw=1, label="a = ±b (rank one)")
            ax.plot(line, -line, "k:", lw=1)
        if name != "random":
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel("a (coordinate along P)")
        ax.set_ylabel("b (coordinate along Q)")
        ax.set_title(f"{name} plane, N = {depth}", fontsize=12)
    fig.colorbar(image, ax=axes[0, 2], label="det W at the limit (grey: not converged)")
    ax = axes[0, 3]
    for i, name in enumerate(PLANES):
        for extent, style in zip(extents, ("-o", "--s")):
            mine = [r for r in rows if r["slice"] == name and r["extent"] == extent]
            ax.errorbar([r["depth"] for r in mine], [r["fraction"] for r in mine],
                        yerr=[1.96 * r["se"] for r in mine], fmt=style, color=f"C{i}", capsize=3,
                        label=f"{name}, extent {extent:g}")
    ax.set_xlabel("depth N")
    ax.set_ylabel("area fraction → full rank (± 1.96 se)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    book.figure(fig)
