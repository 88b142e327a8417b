"""p1_low_rank — problem 1: on the seed 2x2 task (observe W11 = W22 = 1), how often is the limit
of training rank one, against depth and initial scale?

A replica counts as converged once E < 1e-10 (the run stops when every replica is there, or at
t = 1000), and as rank one when, then, σ2/σ1 < THRESHOLD (1e-2; the table also has 1e-4, and
the figure the whole distribution of σ2/σ1). Fractions carry Wilson 95 % intervals. Initial
conditions: i.i.d. Gaussian factors (init=gaussian) sized per product (scale_of=product: the
product's typical entry is the scale) over five decades at every depth, and per layer
(scale_of=layer: each factor's entries have std = scale) where the product it makes lies in
[1e-5, 1] (smaller per-layer scales at large N start the flow so close to the saddle at 0 that
the escape, t ~ σ0^{−(N−2)/N}, outlasts the horizon; larger ones, at N ≥ 4, cost minutes a cell;
those cells are listed as skipped). The exact
flow (optim=flow) answers the gradient-flow question; gd at lr 0.05 stands beside it on the
product-sized cells. At the limit W11 = W22 = 1 to √(2E), so W12·W21 = 1 − det W there; both are
tabulated per depth.
Depth 1 is closed form: W(t) = W0 + (1 − e^{−t})(target − W0) on the observed entries, so the
limit is [[1, b], [c, 1]] with W0's off-diagonal b, c (the test checks the lab against it).
"""
from __future__ import annotations

import math

import numpy as np

from .common import Notebook, slide_axes, wilson_interval

THRESHOLD, STRICT = 1e-2, 1e-4
CONVERGED = 1e-10
# Each replica of the exact flow takes its own steps (optim.step_control=per_replica), so a cell
# costs about the sum of its replicas' own steps. Measured with 500 replicas (2-core CPU shared
# with other jobs, one thread): 2, 7, 7, 19 s at N = 2, 3, 4, 6 and product scale 1e-2; 5, 31, 60,
# 182 s at N = 2, 3, 4, 6 and scale 1; 243 s for per-layer std 1 at N = 4 (product ≈ 2.8) — the
# flow cells of N ≤ 6 alone took 17 minutes. The 2000 replicas a cell (four times that, plus
# N = 8 and gd) takes hours here; the full version is 300 replicas a cell, per-layer cells only
# where the product they make is between 1e-5 and 1: its flow cells up to N = 8, scale 0.1 took
# 9 minutes, but N = 8 at scale 1 alone ran over 9 minutes, so with gd it is half an hour or more.
FULL_REPLICAS = 300
LARGEST_PRODUCT = 1.0      # per-layer cells above it (N ≥ 4 at std 1) cost minutes each


def closed_form_depth1_ratio(W0: np.ndarray) -> np.ndarray:
    """σ2/σ1 of the depth-1 limit [[1, b], [c, 1]] (b, c the initial off-diagonal entries), (B,)."""
    limit = np.array(W0, dtype=float, copy=True)
    limit[:, 0, 0] = limit[:, 1, 1] = 1.0
    s = np.linalg.svd(limit, compute_uv=False)
    return s[:, 1] / s[:, 0]


def config(depth: int, scale: float, scale_of: str, optim: str, replicas: int, seed: int) -> dict:
    return {"task": {"name": "seed2x2"}, "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": scale, "scale_of": scale_of},
            "optim": {"name": optim, "lr": 0.05},
            "run": {"steps": 20000, "stop_energy": CONVERGED, "log_points": 20},
            "replicas": replicas, "seed": seed}


def product_scale(scale: float, depth: int) -> float:
    """The typical product entry a per-layer std `scale` makes: scale^N · 2^{(N−1)/2} at width 2."""
    return scale ** depth * 2 ** ((depth - 1) / 2)


def cell(book: Notebook, depth: int, scale: float, scale_of: str, optim: str, replicas: int) -> dict:
    summary = book.train(config(depth, scale, scale_of, optim, replicas, seed=0))
    final = summary["final"]
    energy = np.asarray(final["energy"], dtype=float)
    ratio = np.asarray(final["sigma_ratio"], dtype=float)
    det = np.asarray(final["det"], dtype=float)
    converged = np.isfinite(energy) & (energy < CONVERGED) & ~np.asarray(final["diverged"], dtype=bool)
    k, n = int((ratio[converged] < THRESHOLD).sum()), int(converged.sum())
    low, high = wilson_interval(k, n)
    off = 1 - det[converged]
    return {"optimiser": optim, "depth": depth, "scale_of": scale_of, "scale": scale,
            "product_scale": scale if scale_of == "product" else product_scale(scale, depth),
            "replicas": replicas, "converged": n, "rank_one": k, "fraction": k / n if n else math.nan,
            "wilson_low": low, "wilson_high": high,
            "rank_one_strict": int((ratio[converged] < STRICT).sum()),
            "det_median": float(np.median(det[converged])) if n else math.nan,
            "det_q10": float(np.quantile(det[converged], 0.1)) if n else math.nan,
            "det_q90": float(np.quantile(det[converged], 0.9)) if n else math.nan,
            "w12w21_median": float(np.median(off)) if n else math.nan,
            "t_end": summary["t"], "wall_seconds": round(summary["wall_time"], 2),
            "_ratio": ratio[converged], "_det": det[converged]}


def measure(book: Notebook) -> None:
    quick = book.quick
    depths = [1, 2] if quick else [1, 2, 3, 4, 6, 8]
    scales = [1e-2, 1.0] if quick else [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    replicas = 256 if quick else FULL_REPLICAS
    optims = ["flow"] if quick else ["flow", "gd"]
    book.note(depths=depths, scales=scales, replicas=replicas, threshold=THRESHOLD, strict_threshold=STRICT,
              converged_below=CONVERGED, optimisers=optims, gd_lr=0.05)
    rows, skipped = [], []
    for optim in optims:
        for depth in depths:
            for scale_of in ("product", "layer"):
                if depth == 1 and scale_of == "layer":
                    continue          # the same runs: at depth 1 the layer is the product
                if optim == "gd" and scale_of == "layer":
                    continue          # gd beside the flow on the product-sized cells only (the time budget)
                for scale in scales:
                    if scale_of == "layer" and not 1e-5 <= product_scale(scale, depth) <= LARGEST_PRODUCT:
                        skipped.append({"optimiser": optim, "depth": depth, "scale": scale})
                        continue
                    rows.append(cell(book, depth, scale, scale_of, optim, replicas))
                    r = rows[-1]
                    print(f"{optim} N={depth} {scale_of} {scale:g}: {r['rank_one']}/{r['converged']} rank one "
                          f"[{r['wilson_low']:.3f}, {r['wilson_high']:.3f}] ({r['wall_seconds']} s)", flush=True)
    book.note(skipped_cells=skipped)
    book.table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])

    flow = [r for r in rows if r["optimiser"] == "flow" and r["scale_of"] == "product"]
    smallest, largest = min(scales), max(scales)
    pick = lambda N, s: next(r for r in flow if r["depth"] == N and r["scale"] == s)  # noqa: E731
    book.say("Exact flow, Gaussian factors sized per product: the rank-one fraction (σ2/σ1 < "
             f"{THRESHOLD:g} once E < {CONVERGED:g}) at product scale {smallest:g} is " + "; ".join(
                 f"N={N}: {pick(N, smallest)['fraction']:.3f} [{pick(N, smallest)['wilson_low']:.3f}, "
                 f"{pick(N, smallest)['wilson_high']:.3f}]" for N in depths) + f", and at scale {largest:g} " +
             "; ".join(f"N={N}: {pick(N, largest)['fraction']:.3f} [{pick(N, largest)['wilson_low']:.3f}, "
                       f"{pick(N, largest)['wilson_high']:.3f}]" for N in depths) + ".")
    if 2 in depths:
        two = [pick(2, s) for s in scales]
        book.say("Depth 2 towards small initialisation (product scale " + ", ".join(f"{s:g}" for s in scales)
                 + "): rank-one fractions " + ", ".join(f"{r['fraction']:.3f}" for r in two)
                 + f"; median det W at the smallest scale {two[0]['det_median']:.3g} "
                 f"(10–90 %: {two[0]['det_q10']:.3g} … {two[0]['det_q90']:.3g}).")
    plot(book, rows, depths, scales)


def plot(book, rows, depths, scales) -> None:
    fig, axes = slide_axes(1, 3, width=5.5, height=4.5)
    for ax, scale_of, xkey in ((axes[0, 0], "product", "product_scale"), (axes[0, 1], "layer", "scale")):
        for i, depth in enumerate(depths):
            for optim, style in (("flow", "-o"), ("gd", ":x")):
                mine = [r for r in rows if r["depth"] == depth and r["optimiser"] == optim
                        and (r["scale_of"] == scale_of or depth == 1)]
                if not mine:
                    continue
                x = [r[xkey] if scale_of == "product" else r["scale"] for r in mine]
                y = np.array([r["fraction"] for r in mine])
                err = np.array([[r["fraction"] - r["wilson_low"] for r in mine],
                                [r["wilson_high"] - r["fraction"] for r in mine]])
                ax.errorbar(x, y, yerr=err, fmt=style, color=f"C{i}", capsize=3,
                            label=f"N={depth} {optim}" if scale_of == "product" else None)
        ax.set_xscale("log")
        ax.set_xlabel("initial product scale (typical entry)" if scale_of == "product"
                      else "initial per-layer std")
        ax.set_ylabel(f"fraction rank one (σ2/σ1 < {THRESHOLD:g}), 95 % Wilson")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"sized per {scale_of}")
    axes[0, 0].legend(fontsize=8, ncol=2)
    ax = axes[0, 2]
    mid = sorted(scales)[len(scales) // 2]
    for i, depth in enumerate(depths):
        r = next((r for r in rows if r["depth"] == depth and r["optimiser"] == "flow" and r["scale_of"] == "product"
                  and r["scale"] == mid), None)
        if r is not None and r["_det"].size:
            ax.hist(r["_det"], bins=60, histtype="step", color=f"C{i}", density=True, label=f"N={depth}")
    ax.set_xlabel(f"det W at the limit (flow, product scale {mid:g})")
    ax.set_ylabel("density")
    ax.set_title("det W = 1 − W12·W21 at the limit")
    ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
