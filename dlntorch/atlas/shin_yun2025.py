"""shin_yun2025 — the seed problem's own reference: on the 2x2 completion observing
W11 = W22 = 1 (zero set {[[1, a], [b, 1]]}, rank-one minimisers on the hyperbola ab = 1), depth
couples the entries and promotes low rank; the uncoupled (diagonal) dynamics do not.

Three measurements, plain GD:
1. depth promotes low rank: from small Gaussian factors, the fraction of replicas ending near
   rank one (effective rank < run.rank_one_tol = 1.2), with Wilson intervals, against depth;
2. diagonal starts stay diagonal: factors diagonal with positive entries (init=file) keep
   W12 = W21 = 0 exactly (∇E is diagonal, and products of diagonal factors are diagonal), and
   end at W = I, full rank;
3. loss of plasticity: observe W11 alone for the first half of the run, then both (task.schedule
   over task.entries, nested), against observing both from the start: the fraction near rank one
   and the size of the unobserved part ‖(W12, W21)‖ at the end, against depth.
"""
from __future__ import annotations

import numpy as np
import torch

from ..analysis import load_run
from .common import Notebook, slide_axes, wilson_interval

SEED_ENTRIES = [[0, 0, 1.0], [1, 1, 1.0]]


def base(depth: int, steps: int, replicas: int) -> dict:
    return {"experiment": "shin_yun2025", "model": {"depth": depth},
            "init": {"name": "gaussian", "scale": 0.1, "scale_of": "layer"},
            "optim": {"name": "gd", "lr": 0.05},
            "run": {"steps": steps, "stop_energy": 0.0, "log_points": 100},
            "replicas": replicas, "seed": 0}


def diagonal_factors(path, depth: int, replicas: int, seed: int) -> None:
    """Diagonal factors with entries |N(0, 1)|·0.5 + 0.05 (positive: every mode grows to 1)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for p in range(1, depth + 1):
        d = 0.5 * torch.randn(replicas, 2, generator=gen, dtype=torch.float64).abs() + 0.05
        factors[f"factor_{p}"] = torch.diag_embed(d)
    torch.save(factors, path)


def measure(book: Notebook) -> None:
    quick = book.quick
    depths = [1, 2, 3] if quick else [1, 2, 3, 4, 5]
    steps, replicas = (4000, 16) if quick else (20000, 128)
    book.note(depths=depths, steps=steps, replicas=replicas, lr=0.05, init_scale=0.1, rank_one_tol=1.2)
    rows = []
    for depth in depths:
        row = {"depth": depth}
        # 1. small Gaussian start on the seed task
        summary = book.train({**base(depth, steps, replicas), "task": {"name": "seed2x2"}})
        k = summary["near_rank_one"]
        row.update(near_rank_one=k, replicas=replicas, near_rank_one_low=wilson_interval(k, replicas)[0],
                   near_rank_one_high=wilson_interval(k, replicas)[1])
        # 2. diagonal start
        init_file = book.out / f"diagonal_N{depth}.pt"
        diagonal_factors(init_file, depth, replicas, seed=depth)
        cfg = base(depth, steps, replicas)
        cfg.update(task={"name": "seed2x2"}, init={"name": "file", "file": str(init_file)})
        tr = load_run(book.train(cfg)["out_dir"]).trajectory
        row["diagonal_max_offdiagonal"] = float(np.nanmax(np.abs([tr["w12"], tr["w21"]])))
        row["diagonal_final_effective_rank_min"] = float(tr["effective_rank"][-1].min())
        row["diagonal_final_energy_max"] = float(tr["energy"][-1].max())
        # 3. loss of plasticity: W11 first, both from the middle of the run
        later = [{"at": 0, "observations": 1}, {"at": steps // 2, "observations": 2}]
        for name, schedule in (("all_from_start", None), ("subset_then_all", later)):
            cfg = base(depth, steps, replicas)
            cfg["task"] = {"name": "completion", "size": 2, "entries": SEED_ENTRIES, "loss": "half_sum",
                           "schedule": schedule}
            summary = book.train(cfg)
            live = ~np.asarray(summary["final"]["diverged"])
            row[f"{name}_near_rank_one"] = summary["near_rank_one"]
            row[f"{name}_hidden_norm_median"] = float(np.median(np.asarray(summary["final"]["hidden_norm"])[live]))
            row[f"{name}_energy_max"] = float(np.max(np.asarray(summary["final"]["energy"])[live]))
        rows.append(row)
    book.table(rows)
    offdiagonal = max(r["diagonal_max_offdiagonal"] for r in rows)
    book.say("Near rank one at the end (of " + str(replicas) + "): " + ", ".join(
        f"N={r['depth']}: {r['near_rank_one']} [{r['near_rank_one_low']:.2f}, {r['near_rank_one_high']:.2f}]"
        for r in rows)
        + f"; diagonal starts: off-diagonal ≤ {offdiagonal:.1e} and final effective "
        f"rank ≥ {min(r['diagonal_final_effective_rank_min'] for r in rows):.4f}.",
        diagonal_max_offdiagonal=offdiagonal)
    book.say("Loss of plasticity (W11 alone, then both at step " + str(steps // 2) + "): near rank one " + ", ".join(
        f"N={r['depth']}: {r['subset_then_all_near_rank_one']} vs {r['all_from_start_near_rank_one']} from the start, "
        f"‖(W12, W21)‖ {r['subset_then_all_hidden_norm_median']:.3g} vs {r['all_from_start_hidden_norm_median']:.3g}"
        for r in rows) + ".")
    plot(book, rows, replicas)


def plot(book: Notebook, rows: list[dict], replicas: int) -> None:
    fig, axes = slide_axes(1, 2, width=5.5, height=4.5)
    depth = [r["depth"] for r in rows]
    ax = axes[0, 0]
    p = np.array([r["near_rank_one"] / replicas for r in rows])
    err = np.array([[p[i] - r["near_rank_one_low"], r["near_rank_one_high"] - p[i]] for i, r in enumerate(rows)]).T
    ax.errorbar(depth, p, yerr=err, marker="o", capsize=3, label="small Gaussian start")
    ax.plot(depth, [r["subset_then_all_near_rank_one"] / replicas for r in rows], "s--", label="W11 first, then both")
    ax.set_xlabel("depth N")
    ax.set_ylabel("fraction near rank one")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=9)
    ax = axes[0, 1]
    ax.plot(depth, [r["all_from_start_hidden_norm_median"] for r in rows], "o-", label="both from the start")
    ax.plot(depth, [r["subset_then_all_hidden_norm_median"] for r in rows], "s--", label="W11 first, then both")
    ax.set_xlabel("depth N")
    ax.set_ylabel("median ‖(W12, W21)‖ at the end")
    ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
