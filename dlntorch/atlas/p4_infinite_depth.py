"""p4_infinite_depth — problem 4: as the depth N grows, does training converge, in rescaled time
τ = N t, to one infinite-depth flow?

Three flows from one initial product W0, on one grid of τ (scripts/depth_limit.py measured the
downstairs ones alone):

    upstairs at depth N:  dW_p/dt = −∂L/∂W_p from a balanced factorisation of W0 (the exact flow
                          of optim=flow), its product read at t = τ/N;
    downstairs g^N:       dW/dτ = −(A_N/N)(∇E(W))   (optim=downstairs, time_scale=per_depth);
    g^∞:                  dW/dτ = −A_∞(∇E(W)).

A balanced upstairs flow's product follows the g^N flow exactly (Riemannian submersion), so the
first distance is the solvers' tolerance; the second is O(1/N), since f_N/N = f_∞(1 − log(xy)/N +
O(1/N²)) (depth_limit.py's gap table). Measured per replica: max_τ ‖W_N^up − W_N^down‖, max_τ
‖W_N − W_∞‖ (trajectories) and ‖W_N(T) − W_∞(T)‖ at the horizon T, where E has fallen below
1e-8 on the seed task (its limits; the table keeps E there, since the completion flows are still
moving at T); their rates in N by a log-log fit over N ≥ FIT_MIN_DEPTH with a 95 % interval.
Beside them, at each depth-N limit: the fibre's dimension (the rank of the tangent map of the
GL(d)^{N−1} action, (N−1)d² at full rank; the balanced fibre, an O(d)^{N−1} orbit, has (N−1)d(d−1)/2)
and its log-volume, the entropy S_N (geometry.entropy). Tasks: the seed 2x2 task and a 5x5 rank-2
completion (15 of 25 entries observed). The flows are the lab's integrators
(dlntorch.dynamics.flows), dopri5 at rtol 1e-10, called directly so that the three share the τ grid.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..dynamics.flows import integrate_downstairs, integrate_upstairs
from ..fibre import tangent_matrix
from ..geometry import balanced_factors, entropy, log_orbit_volume
from ..network import chain
from ..tasks import build_task
from .common import Notebook, fit_loglog, interval, slide_axes

RTOL, ATOL = 1e-10, 1e-12
FIT_MIN_DEPTH = 5          # the 1/N law is asymptotic: the fit leaves out N = 2, 3
SEED_W0 = [[0.3, 0.1], [0.4, 0.2]]   # depth_limit.py's start: det 0.02, no symmetry


def tasks(quick: bool) -> dict[str, dict]:
    seed = {"name": "seed2x2"}
    completion = {"name": "completion", "size": 5, "rank": 2, "observations": 15, "seed": 0}
    return {"seed2x2": seed} if quick else {"seed2x2": seed, "completion": completion}


def task_config(task: dict):
    from omegaconf import OmegaConf

    from ..config import TaskConfig
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), task)


def starts(name: str, d: int, replicas: int, seed: int = 0) -> torch.Tensor:
    """Initial products: the seed task's W0 of depth_limit.py and small perturbations of it;
    for completion Gaussian matrices with entries N(0, 0.3²/d) (moderate: from a tiny W0 deep
    flows sit on the plateau at 0 for a long τ)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(replicas, d, d, generator=gen, dtype=torch.float64)
    if name == "seed2x2":
        W0 = torch.tensor(SEED_W0, dtype=torch.float64).expand(replicas, d, d).clone()
        W0[1:] += 0.05 * noise[1:]
        return W0
    return (0.3 / math.sqrt(d)) * noise


def balanced_fibre_dimension(factors: list[torch.Tensor]) -> torch.Tensor:
    """The rank of the tangent map restricted to skew generators A_p = −A_p^T: the dimension of
    the O(d_1) × ⋯ × O(d_{N−1}) orbit through a balanced point (its volume is exp S_N)."""
    tangent = tangent_matrix(factors)                       # (B, D, K), generators flattened p by p
    blocks = []
    for f in factors[:-1]:
        d = f.shape[-2]
        i, j = torch.triu_indices(d, d, offset=1)
        skew = torch.zeros(d * d, i.numel(), dtype=tangent.dtype)
        skew[i * d + j, torch.arange(i.numel())] = 1.0
        skew[j * d + i, torch.arange(i.numel())] = -1.0
        blocks.append(skew)
    return torch.linalg.matrix_rank(tangent @ torch.block_diag(*blocks), rtol=1e-10)


def measure_task(name: str, task: dict, depths: list[int], replicas: int, horizon: float, points: int) -> dict:
    problem = build_task(task_config(task), 0)
    d = problem.shape[0]
    W0 = starts(name, d, replicas)
    taus = torch.linspace(0.0, horizon, points, dtype=torch.float64)
    solver = dict(method="dopri5", rtol=RTOL, atol=ATOL)
    infinite, _ = integrate_downstairs(W0, problem.gradient, taus, math.inf, time_scale="per_depth", **solver)
    rows, curves = [], {"tau": taus.numpy(), "inf": infinite.numpy()}
    for N in depths:
        widths = [d] * (N + 1)
        factors = balanced_factors(W0, widths, generator=torch.Generator().manual_seed(N))
        path, up_calls = integrate_upstairs(factors, problem.gradient, taus / N, **solver)
        upstairs = torch.stack([chain([w[k] for w in path]) for k in range(points)])       # (T, B, d, d)
        downstairs, down_calls = integrate_downstairs(W0, problem.gradient, taus, N, time_scale="per_depth",
                                                      **solver)
        gap_up = (upstairs - downstairs).flatten(2).norm(dim=2).amax(0)          # (B,)
        gap_inf = (downstairs - infinite).flatten(2).norm(dim=2)
        limit = [w[-1] for w in path]
        energy = problem.energy(downstairs[-1])
        fibre = torch.linalg.matrix_rank(tangent_matrix(limit), rtol=1e-10)
        S = entropy(downstairs[-1], N)
        rows.append({"task": name, "depth": N, "replicas": replicas, "d": d,
                     "up_down_max": float(gap_up.max()), "up_down_mean": float(gap_up.mean()),
                     "trajectory_distance_mean": float(gap_inf.amax(0).mean()),
                     "trajectory_distance_max": float(gap_inf.amax(0).max()),
                     "limit_distance_mean": float(gap_inf[-1].mean()),
                     "limit_distance_max": float(gap_inf[-1].max()),
                     "energy_end_max": float(energy.max()),
                     "fibre_dimension": int(fibre.min()), "fibre_dimension_formula": (N - 1) * d * d,
                     "balanced_fibre_dimension": int(balanced_fibre_dimension(limit).min()),
                     "balanced_fibre_dimension_formula": (N - 1) * d * (d - 1) // 2,
                     "entropy_mean": float(S.mean()), "entropy_min": float(S.min()), "entropy_max": float(S.max()),
                     # S_N less the (N−1) log c_d of the O(d)^{N−1} frames: ½ Σ_{i<j} log f_N(s_i, s_j)
                     "entropy_excess_mean": float(S.mean()) - (N - 1) * log_orbit_volume(d),
                     "upstairs_evaluations": up_calls, "downstairs_evaluations": down_calls})
        curves[N] = downstairs.numpy()
        print(f"{name} N={N}: up−down {rows[-1]['up_down_max']:.2g}, ‖W_N − W_∞‖ max_τ "
              f"{rows[-1]['trajectory_distance_mean']:.3g}, at T {rows[-1]['limit_distance_mean']:.3g}, "
              f"S_N {rows[-1]['entropy_mean']:.3g}", flush=True)
    return {"rows": rows, "curves": curves, "energy_inf_end": float(problem.energy(infinite[-1]).max())}


def rates(rows: list[dict]) -> dict[str, dict]:
    """log-log fits over N ≥ FIT_MIN_DEPTH of the mean distances (trajectory and limit)."""
    deep = [r for r in rows if r["depth"] >= FIT_MIN_DEPTH]
    return {key: fit_loglog([r["depth"] for r in deep], [r[f"{key}_distance_mean"] for r in deep])
            for key in ("trajectory", "limit")}


def measure(book: Notebook) -> None:
    quick = book.quick
    depths = [2, 5, 10, 20] if quick else [2, 3, 5, 8, 12, 20, 30, 50]
    replicas = 2 if quick else 8
    horizon, points = (30.0, 61) if quick else (60.0, 241)
    book.note(depths=depths, replicas=replicas, horizon_tau=horizon, tau_points=points, rtol=RTOL, atol=ATOL,
              fit_min_depth=FIT_MIN_DEPTH, tasks=tasks(quick), seed_W0=SEED_W0,
              starts="seed2x2: W0 and W0 + 0.05·N(0, 1) perturbations; completion: N(0, 0.3²/d) entries",
              balanced_factorisation="geometry.balanced_factors, Haar hidden frames seeded by N")
    rows, curves, fits = [], {}, {}
    for name, task in tasks(quick).items():
        result = measure_task(name, task, depths, replicas, horizon, points)
        rows += result["rows"]
        curves[name] = result["curves"]
        fits[name] = rates(result["rows"])
        fits[name]["energy_inf_end"] = result["energy_inf_end"]
    book.table(rows)
    book.table([{"task": t, "distance": k, **{q: f[k][q] for q in ("slope", "low", "high", "se", "n")}}
                for t, f in fits.items() for k in ("trajectory", "limit")], "fits.csv")
    worst = max(r["up_down_max"] for r in rows)
    book.say(f"Upstairs (balanced start, exact flow) against downstairs g^N in τ = N t: the largest distance "
             f"max_τ ‖W_N^up − W_N^down‖_F over every depth ({depths[0]} … {depths[-1]}), task and replica is "
             f"{worst:.1g} (dopri5 at rtol {RTOL:g}): the product follows the g^N flow to the solvers' tolerance.",
             up_down_max=worst)
    book.say("Distance of the g^N flow to g^∞ against N (mean over replicas, log-log slope over N ≥ "
             f"{FIT_MIN_DEPTH}, 95 %): " + "; ".join(
                 f"{t}: trajectories max_τ ‖W_N − W_∞‖ {interval(f['trajectory'])}, end points at τ = {horizon:g} "
                 f"{interval(f['limit'])} (E ≤ {max(r['energy_end_max'] for r in rows if r['task'] == t):.2g} there"
                 f", {f['energy_inf_end']:.2g} for g^∞)" for t, f in fits.items())
             + " (the expected rate is −1; an end point is a limit only where E has reached 0).", fits=fits)
    book.say("The fibre of the depth-N limit has dimension " + "; ".join(
        f"{t}: " + ", ".join(f"{r['fibre_dimension']}" for r in rows if r["task"] == t) for t in fits)
        + f" at N = {', '.join(map(str, depths))} (formula (N−1)d²: the limits are full rank); its balanced part "
        "(an O(d)^{N−1} orbit) " + "; ".join(f"{t}: " + ", ".join(f"{r['balanced_fibre_dimension']}" for r in rows
                                                            if r["task"] == t) for t in fits)
        + " ((N−1)d(d−1)/2), whose log-volume S_N (mean) is " + "; ".join(
            f"{t}: " + ", ".join(f"{r['entropy_mean']:.3g}" for r in rows if r["task"] == t) for t in fits)
        + ": S_N grows linearly in N, by (N−1) log c_d; the rest, ½ Σ log f_N(s_i, s_j), is " + "; ".join(
            f"{t}: " + ", ".join(f"{r['entropy_excess_mean']:.3g}" for r in rows if r["task"] == t) for t in fits)
        + ".")
    plot(book, rows, curves, fits, depths)


def plot(book, rows, curves, fits, depths) -> None:
    from matplotlib import colormaps, ticker  # matplotlib only when a figure is drawn
    names = list(curves)
    fig, axes = slide_axes(1, 4, width=4.8, height=4.3)
    ax = axes[0, 0]
    curve = curves[names[0]]
    cmap = colormaps["viridis"]
    for i, N in enumerate(depths):
        ax.plot(curve["tau"], curve[N][:, 0, 0, 1], color=cmap(i / len(depths)), lw=1.2, label=f"N = {N}")
    ax.plot(curve["tau"], curve["inf"][:, 0, 0, 1], color="crimson", lw=2.2, label="N = ∞")
    ax.set_xlabel("rescaled time τ = N t")
    ax.set_ylabel("W12(τ), replica 0")
    ax.set_title(f"{names[0]}: g^N flows in τ", fontsize=12)
    ax.legend(fontsize=8, ncol=2)
    ax = axes[0, 1]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        x = [r["depth"] for r in mine]
        for key, marker in (("trajectory", "o-"), ("limit", "s--")):
            fit = fits[name][key]
            ax.plot(x, [r[f"{key}_distance_mean"] for r in mine], marker, color=f"C{i}",
                    label=f"{name} {key}: {fit['slope']:.2f} [{fit['low']:.2f}, {fit['high']:.2f}]")
        ax.plot(x, [max(r["up_down_max"], 1e-16) for r in mine], "x:", color=f"C{i}",
                label=f"{name}: upstairs − g^N (max)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [str(N) for N in depths], minor=False)
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("depth N")
    ax.set_ylabel("distance ‖·‖_F (mean over replicas)")
    ax.set_title("‖W_N − W_∞‖ against N (slopes, 95 %)", fontsize=12)
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        ax.plot([r["depth"] for r in mine], [r["fibre_dimension"] for r in mine], "o-", color=f"C{i}",
                label=f"{name}: fibre (GL orbit)")
        ax.plot([r["depth"] for r in mine], [r["balanced_fibre_dimension"] for r in mine], "s--", color=f"C{i}",
                label=f"{name}: balanced fibre (O orbit)")
    ax.set_xlabel("depth N")
    ax.set_ylabel("dimension at the limit")
    ax.set_title("fibre dimension", fontsize=12)
    ax.legend(fontsize=8)
    ax = axes[0, 3]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        ax.errorbar([r["depth"] for r in mine], [r["entropy_mean"] for r in mine],
                    yerr=[[r["entropy_mean"] - r["entropy_min"] for r in mine],
                          [r["entropy_max"] - r["entropy_mean"] for r in mine]], fmt="o-", color=f"C{i}",
                    capsize=3, label=f"{name}: S_N (bars: min–max)")
        ax.plot([r["depth"] for r in mine], [r["entropy_excess_mean"] for r in mine], "s--", color=f"C{i}",
                label=f"{name}: S_N − (N−1) log c_d")
    ax.set_xlabel("depth N")
    ax.set_ylabel("entropy S_N at the limit (log volume)")
    ax.set_title("balanced fibre's log-volume S_N", fontsize=12)
    ax.legend(fontsize=8)
    fig.tight_layout()
    book.figure(fig)
    np.savez_compressed(book.out / "trajectories.npz", **{f"{name}_{key}": value for name, c in curves.items()
                                                          for key, value in c.items()})
