"""p9_rank_jumps — problem 9: from a small start the rank of W(t) climbs in jumps between long
plateaus (saddle to saddle); how do the jump times scale with the initial scale and the depth?

Theory (aligned modes, E ≈ κ·½‖W − W*‖², a balanced start): mode k with target s_k and initial
size σ0 follows σ' = κ N σ^{2−2/N} (s_k − σ). Its escape time from σ0 is, to leading order as
σ0 → 0,
    N = 2:  t_k ≈ ln(1/σ0) / (2 κ s_k)                 (linear in log(1/scale), slope 1/(2κ s_k)),
    N ≥ 3:  t_k ≈ σ0^{−(N−2)/N} / (κ (N − 2) s_k)      (a power law, exponent −(N−2)/N).
κ = 1 for sensing with Gaussian sensors and the half_mean loss (E[⟨A, Δ⟩²] = ‖Δ‖²); for
completion with the half_sum loss κ is the observed fraction p. The lab measures, per replica
(exact flow, optim=flow), each mode's time to half its final value (events.learning_times), the
rank jumps and plateaus of the rank at scale 1e-2 (events.rank_jumps, events.plateaus), and fits
t against log(1/scale) at N = 2 and log t against log scale at N ≥ 3, theory beside the fit.
The scales of one depth are replicas of one run (init=file with per-replica products, factored
on their balanced fibres), the depths a loop of runs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..analysis import load_run
from ..events import learning_times, plateaus, rank_at_scale, rank_jumps
from .common import Notebook, fit_loglog, fit_slope, interval, slide_axes, standard_error

RANK_TOL = 1e-2
# N = 2 plateaus are short in log t (t_k grows only like ln(1/scale)), so a plateau here needs
# 0.1 decades of log t rather than the detector's default 0.25
MIN_DECADES = 0.1


def tasks(quick: bool) -> dict[str, dict]:
    """The two problems: sensing and completion of an 8 × 8 truth with singular values 4, 2, 1."""
    if quick:
        return {"sensing": {"name": "sensing", "size": 6, "spectrum": [2.0, 1.0], "observations": 72,
                            "loss": "half_mean"}}
    return {"sensing": {"name": "sensing", "size": 8, "spectrum": [4.0, 2.0, 1.0], "observations": 128,
                        "loss": "half_mean"},
            "completion": {"name": "completion", "size": 8, "spectrum": [4.0, 2.0, 1.0], "observations": 48,
                           "loss": "half_sum"}}


def curvature(task: dict) -> float:
    """κ of the theory: 1 for sensing (half_mean), the observed fraction for completion (half_sum)."""
    return task["observations"] / task["size"] ** 2 if task["name"] == "completion" else 1.0


def escape_time(s: float, sigma0: float, depth: int, kappa: float) -> float:
    """The leading-order escape time of the docstring."""
    if depth == 2:
        return math.log(s / sigma0) / (2 * kappa * s)
    return sigma0 ** (-(depth - 2) / depth) / (kappa * (depth - 2) * s)


def initial_products(path, size: int, scales: list[float], per_scale: int, seed: int) -> np.ndarray:
    """Gaussian products with N(0, scale²) entries, `per_scale` replicas per scale, saved for init=file."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(np.repeat(scales, per_scale), dtype=torch.float64)
    products = scale[:, None, None] * torch.randn(len(scale), size, size, generator=gen, dtype=torch.float64)
    torch.save({"product": products}, path)
    return scale.numpy()


def measure(book: Notebook) -> None:
    quick = book.quick
    scales = [1e-2, 1e-4] if quick else [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    depths = [2, 3] if quick else [2, 3, 4]
    per_scale = 3 if quick else 8
    book.note(scales=scales, depths=depths, replicas_per_scale=per_scale, rank_tol=RANK_TOL, min_decades=MIN_DECADES,
              tasks=tasks(quick), init="Gaussian product entries N(0, scale²) on balanced fibres (init=file)")
    rows, fits, staircases = [], [], {}
    for task_name, task in tasks(quick).items():
        kappa, spectrum = curvature(task), task["spectrum"]
        init_file = book.out / f"init_{task_name}.pt"
        scale_of = initial_products(init_file, task["size"], scales, per_scale, seed=1)
        for depth in depths:
            horizon = 3 * escape_time(min(spectrum), min(scales), depth, kappa) + 30 / (kappa * min(spectrum))
            cfg = {"task": {**task, "seed": 0}, "model": {"depth": depth},
                   "init": {"name": "file", "file": str(init_file)},
                   "optim": {"name": "flow", "lr": horizon / 20000},
                   # no stop on E: the modes the truth lacks decay only algebraically (σ' ≈ −κNσ^{3−2/N}),
                   # so E < 1e-10 would take far longer than the jumps
                   "run": {"time": horizon, "steps": 20000, "stop_energy": 0.0, "log_points": 400,
                           "stop_check_every": 200},
                   "replicas": len(scale_of), "seed": 0}
            summary = book.train(cfg)
            trajectory = load_run(summary["out_dir"]).trajectory
            t, s = trajectory["t"], trajectory["singular_values"][..., :len(spectrum)]
            learned = learning_times(t, s)                                   # (B, modes)
            rank = rank_at_scale(trajectory["singular_values"], RANK_TOL)
            jumps, runs = rank_jumps(t, rank, MIN_DECADES), plateaus(t, rank, MIN_DECADES)
            staircases[(task_name, depth)] = (t, trajectory["singular_values"][:, -1], len(spectrum))  # smallest scale
            for scale in scales:
                mine = np.flatnonzero(scale_of == scale)
                row = {"task": task_name, "depth": depth, "scale": scale, "replicas": mine.size,
                       "kappa": kappa, "learned_all_modes": int(np.isfinite(learned[mine]).all(1).sum())}
                for k, target in enumerate(spectrum, start=1):
                    times = learned[mine, k - 1]
                    row[f"t_mode{k}_median"] = float(np.nanmedian(times))
                    row[f"t_mode{k}_mean"] = float(np.nanmean(times))
                    row[f"t_mode{k}_se"] = standard_error(times)
                    row[f"t_mode{k}_theory"] = escape_time(target, scale, depth, kappa)
                ups = [[j for j in jumps[b] if j.rank_to > j.rank_from] for b in mine]
                row["jumps_up_mean"] = float(np.mean([len(u) for u in ups]))
                for k in range(1, len(spectrum) + 1):
                    found = [j.time for u in ups for j in u if j.rank_to == k]
                    row[f"jump_to_rank{k}_median"] = float(np.median(found)) if found else math.nan
                lengths = [math.log10(p.t_end / p.t_start) for b in mine for p in runs[b][1:-1]]
                row["inner_plateau_decades_mean"] = float(np.mean(lengths)) if lengths else math.nan
                rows.append(row)
            for k, target in enumerate(spectrum, start=1):
                x = np.log(1 / scale_of) if depth == 2 else scale_of
                y = learned[:, k - 1]
                fit = fit_slope(x, y) if depth == 2 else fit_loglog(x, y)
                theory = 1 / (2 * kappa * target) if depth == 2 else -(depth - 2) / depth
                fits.append({"task": task_name, "depth": depth, "mode": k, "target": target,
                             "law": "t vs ln(1/scale)" if depth == 2 else "log t vs log scale",
                             "fitted": fit["slope"], "low": fit["low"], "high": fit["high"], "theory": theory})
                print(f"{task_name} N={depth} mode {k}: fitted {interval(fit, 3)}, "
                      f"theory {theory:.3f} ({fits[-1]['law']})")
    book.table(rows)
    book.table(fits, "fits.csv")
    for task_name in tasks(quick):
        parts = [f"N={f['depth']} mode {f['mode']}: {f['fitted']:.3f} [{f['low']:.3f}, {f['high']:.3f}] "
                 f"vs {f['theory']:.3f}"
                 for f in fits if f["task"] == task_name]
        book.say(f"{task_name}: fitted slopes (t against ln(1/scale) at N = 2, log t against log scale at N ≥ 3; "
                 f"95 %) against the theory: " + "; ".join(parts) + ".")
    ups = {(r["task"], r["depth"]): r["jumps_up_mean"] for r in rows if r["scale"] == min(scales)}
    book.say(f"At scale {min(scales):g} each replica makes on average " + ", ".join(
        f"{v:.2f} upward rank jumps ({k[0]}, N={k[1]})" for k, v in ups.items()) + f" (rank at scale {RANK_TOL:g}).",
        fits=fits)
    plot(book, rows, fits, staircases, scales, depths)


def plot(book, rows, fits, staircases, scales, depths) -> None:
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    first = task_names[0]
    fig, axes = slide_axes(1, 3, width=5.5, height=4.5)
    ax = axes[0, 0]
    t, s, modes = staircases[(first, max(depths))]
    for k in range(s.shape[-1]):          # the truth's modes in colour, the rest (decaying) in grey
        ax.plot(t[1:], s[1:, k], color=f"C{k}" if k < modes else "lightgrey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time t")
    ax.set_ylabel("singular values of W(t)")
    ax.set_title(f"staircase ({first}, N = {max(depths)}, scale {min(scales):g})", fontsize=12)
    ax = axes[0, 1]
    for i, task_name in enumerate(task_names):
        mine = [r for r in rows if r["task"] == task_name and r["depth"] == 2]
        for k, marker in ((1, "o"), (2, "s")):
            ax.errorbar([math.log(1 / r["scale"]) for r in mine], [r[f"t_mode{k}_mean"] for r in mine],
                        yerr=[1.96 * r[f"t_mode{k}_se"] for r in mine], marker=marker, color=f"C{i}", capsize=3,
                        label=f"{task_name}, mode {k}")
            ax.plot([math.log(1 / r["scale"]) for r in mine], [r[f"t_mode{k}_theory"] for r in mine], ":",
                    color=f"C{i}")
    ax.set_xlabel("ln(1 / initial scale)")
    ax.set_ylabel("time to half target t_k")
    ax.set_title("N = 2: linear in ln(1/scale) (dotted: theory)", fontsize=12)
    ax.legend(fontsize=9)
    ax = axes[0, 2]
    for i, depth in enumerate(d for d in depths if d >= 3):
        for j, task_name in enumerate(task_names):
            mine = [r for r in rows if r["task"] == task_name and r["depth"] == depth]
            fit = next(f for f in fits if f["task"] == task_name and f["depth"] == depth and f["mode"] == 1)
            ax.errorbar([r["scale"] for r in mine], [r["t_mode1_mean"] for r in mine],
                        yerr=[1.96 * r["t_mode1_se"] for r in mine], marker="os"[j], color=f"C{i + 2}", capsize=3,
                        label=f"{task_name}, N={depth}: {fit['fitted']:.2f} (theory {fit['theory']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("initial scale (product entries' std)")
    ax.set_ylabel("time to half target t_1")
    ax.set_title("N ≥ 3: power law, fitted exponent", fontsize=12)
    ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
