"""p2_full_rank — problem 2: which initial end-to-end matrices of the seed 2x2 task flow to a
full-rank minimiser? Phase portraits over 2-D slices of initial products (init=grid: one
replica per grid point, each product factored on its balanced fibre; one run a portrait), exact
flow (optim=flow), coloured by the limit's det W (= 1 − W12·W21 there).

A grid point counts as converged once E < 1e-10 (each is held at the first logged time below it,
optim.hold_converged; the time cap is t = 1000, and a point still above it there is counted as
unconverged, grey in the portraits, never as full rank or rank one) and as full rank when then
σ2/σ1 ≥ 1e-2 (p1's threshold, the other side). The area fraction of full-rank limits is over
the converged points, with the binomial standard error √(p(1 − p)/n) and a Wilson 95 % interval,
and the unconverged count beside it. Invariant sets drawn: in the diagonal plane diag(a, b)
(tilted by ε = 1e-3 off it) the conformal line a = b (W = aI); in the symmetric plane
[[a, b], [b, a]] the diagonal line b = 0 (W = aI) and the lines a = ±b (rank one, on E's level
sets through 0).
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
# Cost: per-replica steps with every point held once E < 1e-10 (without holding, converged
# points stepped on to t = 1000 at their stability limit: 36 s against 6 s for one 32 × 32 run),
# and the chain rule on replica-last planes for many replicas (dynamics.flows), make a 256 × 256
# run 12–126 s here (2-core CPU shared with other jobs): the 18 runs took 16 min 43 s. Looser
# tolerances would halve that, but at rtol 1e-8 2–3 % of the symmetric plane's points at
# N = 2 change class (64 × 64 grids), so the flow's default rtol 1e-10 / atol 1e-12 is kept.
FULL_POINTS = 256


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
                # no TensorBoard histograms or saved products: points.csv below has every limit
                summary = book.train({"task": {"name": "seed2x2"}, "model": {"depth": depth}, "init": grid,
                                      "optim": {"name": "flow", "lr": 0.05, "hold_converged": True},
                                      "run": {"steps": 20000, "stop_energy": CONVERGED, "log_points": 20,
                                              "histogram_points": 0, "save_product": False},
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
                             "converged": n, "unconverged": points * points - n, "full_rank": k, "fraction": p,
                             "se": math.sqrt(p * (1 - p) / n) if n else math.nan,
                             "wilson_low": low, "wilson_high": high,
                             "wall_seconds": round(summary["wall_time"], 2)})
                portraits[(name, extent, depth)] = (a, b, np.where(converged, det, np.nan))
                grid_rows += [{"slice": name, "extent": extent, "depth": depth, "a": x, "b": y, "converged": bool(c),
                               "full_rank": bool(f), "det": d, "sigma_ratio": q}
                              for x, y, c, f, d, q in zip(a, b, converged, full, det, ratio)]
                print(f"{name} extent {extent:g} N={depth}: full rank {k}/{n}, {points * points - n} unconverged "
                      f"({summary['wall_time']:.1f} s)", flush=True)
    book.table(rows)
    book.table(grid_rows, "points.csv")        # every grid point's limit, for other plots
    book.say(f"Area fraction of the {points} × {points} grid flowing to a full-rank minimiser (σ2/σ1 ≥ 1e-2 once "
             "E < 1e-10, over the converged points; ± se; unconverged by t = 1000 in brackets): "
             + "; ".join(f"{r['slice']} extent {r['extent']:g} N={r['depth']}: {r['fraction']:.3f} ± {r['se']:.3f}"
                         + (f" [{r['unconverged']}]" if r["unconverged"] else "") for r in rows) + ".")
    plot(book, rows, portraits, depths, extents, points)


def plot(book, rows, portraits, depths, extents, points) -> None:
    from matplotlib import colormaps  # matplotlib only when a figure is drawn
    fig, axes = slide_axes(1, 4, width=4.6, height=4.4)
    depth, extent = depths[-1], extents[-1]
    for ax, name in zip(axes[0, :3], PLANES):
        _, _, det = portraits[(name, extent, depth)]
        cmap = colormaps["RdBu_r"].with_extremes(bad="darkgrey")  # grey: E ≥ 1e-10 at the end
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
