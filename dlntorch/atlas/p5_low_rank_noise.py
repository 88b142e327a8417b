"""p5_low_rank_noise — problem 5: does noise carry the product onto the singular set?

Langevin from balanced factors of the product W0 = diag(1, ε) (init=file), close to rank one, on
the fully observed 2x2 task E = ½‖W − diag(1, 0)‖², whose minimiser is rank one, so the drift itself
heads for the singular set and the noise (and, downstairs, the entropy's repulsion −∇S_N/β) decides
whether the replicas get there. Per model, β, depth N and start ε:

- the fraction of replicas whose σ_min(W) fell below THRESHOLD at some logged time ≤ t (every step
  is logged, so a dip between steps is all that can be missed), and the fraction whose det W changed
  sign at a logged step (a crossing of the singular set that jumped over the threshold), with
  Wilson 95 % intervals;
- for the RLE models (optim=rle downstairs; optim.noise=balanced on 2x2 factors, whose product
  follows the same SDE), which count a *singular hit* at every step whose proposal has
  σ_min < THRESHOLD or crosses det W = 0 (where they reflect): the fraction of replicas with a hit by
  t (the first-hit time's distribution function, Wilson 95 %) and the mean number of hits per
  replica (with its standard error), at two step sizes h and h/4. The per-step count is not a
  step-independent quantity: it grows as h shrinks, like h^{−1/2} for a threshold below a step's
  noise (the zero-crossings of a discretised Brownian motion), like h^{−1} when the threshold band
  is wider than a step, where h × hits is the time spent below the threshold (`time_below`). The
  first-hit fraction is step-independent up to the discrete monitoring's misses of excursions
  between steps (an error that shrinks like h^{1/2}); the table shows both.

Models: isotropic; tangential κ = 0 (the product moves only by the drift and the Itô mean-curvature
term); rle; balanced.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analysis import load_run
from .common import Notebook, slide_axes, standard_error, wilson_interval

THRESHOLD = 1e-3
MODELS = {"isotropic": {"name": "langevin", "noise": "isotropic"},
          "tangential κ=0": {"name": "langevin", "noise": "tangential", "kappa": 0.0},
          "rle": {"name": "rle", "singular_threshold": THRESHOLD},
          "balanced": {"name": "langevin", "noise": "balanced", "singular_threshold": THRESHOLD}}
COUNTING = ("rle", "balanced")        # the models that count singular hits at every step
REFINE = 4                            # the counting models run at h and at h/REFINE (to the same t)


def plan(quick: bool) -> dict:
    if quick:
        return dict(betas=[5.0], depths=[3], starts=[0.03], replicas=64, lr=0.01, steps=30)
    return dict(betas=[10.0, 100.0, 1000.0], depths=[2, 3, 4], starts=[0.3, 0.1, 0.03], replicas=256,
                lr=0.005, steps=200)


def files(book: Notebook, eps: float) -> tuple[dict, dict]:
    task_file, init_file = book.out / "rank_one_task.npz", book.out / f"start_{eps:g}.npz"
    np.savez(task_file, mask=np.ones((2, 2)), values=np.diag([1.0, 0.0]), truth=np.diag([1.0, 0.0]))
    np.savez(init_file, product=np.diag([1.0, eps]))
    return ({"name": "completion", "file": str(task_file), "shape": [2, 2]}, {"name": "file", "file": str(init_file)})


def step_sizes(model_name: str, grid: dict) -> list[tuple[float, int]]:
    """(h, steps) pairs reaching the same t: h alone, or h and h/REFINE for the counting models."""
    refinements = (1, REFINE) if model_name in COUNTING else (1,)
    return [(grid["lr"] / k, grid["steps"] * k) for k in refinements]


def proportion(hit: np.ndarray, prefix: str) -> dict:
    """The count of True in hit (replicas,), its fraction and Wilson 95 % interval, keys prefixed."""
    k, n = int(hit.sum()), hit.size
    low, high = wilson_interval(k, n)
    return {f"{prefix}hit": k, f"{prefix}fraction": k / n, f"{prefix}wilson_low": low, f"{prefix}wilson_high": high}


def measure(book: Notebook) -> None:
    grid = plan(book.quick)
    book.note(threshold=THRESHOLD, models=MODELS, counting=COUNTING, refine=REFINE,
              task="E = ½‖W − diag(1, 0)‖² (every entry observed)", **grid)
    rows, curves = [], {}
    for model_name, optim in MODELS.items():
        for lr, steps in step_sizes(model_name, grid):
            for N in grid["depths"]:
                for beta in grid["betas"]:
                    for eps in grid["starts"]:
                        rows.append(one_run(book, grid, model_name, optim, lr, steps, N, beta, eps, curves))
    book.table(rows)
    report(book, grid, rows)
    plot(book, grid, curves)


def one_run(book, grid, model_name, optim, lr, steps, N, beta, eps, curves) -> dict:
    task, init = files(book, eps)
    cfg = {"task": task, "model": {"depth": N}, "init": init, "optim": {**optim, "beta": beta, "lr": lr},
           "run": {"steps": steps, "stop_energy": 0.0, "log_points": steps + 1},
           "replicas": grid["replicas"], "seed": 0}
    summary = book.train(cfg)
    traj = load_run(summary["out_dir"]).trajectory
    low = np.minimum.accumulate(np.nan_to_num(traj["sigma_min"], nan=np.inf), axis=0) < THRESHOLD
    sign = np.sign(traj["det"])
    crossed = np.logical_or.accumulate(sign != sign[:1], axis=0)
    row = {"model": model_name, "lr": lr, "N": N, "beta": beta, "start_sigma_min": eps, "t": traj["t"][-1],
           "replicas": grid["replicas"], **proportion(low[-1], ""), **proportion(crossed[-1], "crossed_")}
    curves[model_name, lr, N, beta, eps] = (traj["t"], low.mean(1))
    if model_name in COUNTING:
        hits = traj["singular_hits"]                       # (time, replicas): cumulative per replica
        # h × hits: the time spent below the threshold (at the steps), the count's step-independent limit
        row.update(proportion(hits[-1] > 0, "step_"), hits_per_replica=float(hits[-1].mean()),
                   hits_per_replica_se=standard_error(hits[-1]), time_below=lr * float(hits[-1].mean()),
                   time_below_se=lr * standard_error(hits[-1]))
        curves[model_name, lr, N, beta, eps] = (traj["t"], (hits > 0).mean(1))
    row.update(diverged=int(np.sum(summary["final"]["diverged"])),
               sigma_min_median_end=float(np.nanmedian(traj["sigma_min"][-1])))
    if not book.quick:      # every step logged: ≈ 12 MB a run at h; the table keeps what counts
        (Path(summary["out_dir"]) / "trajectory.npz").unlink(missing_ok=True)
    return row


def interval(row: dict, prefix: str = "") -> str:
    """'k/n [low, high]' of a row's proportion (keys prefixed), for the sentences."""
    low, high = row[prefix + "wilson_low"], row[prefix + "wilson_high"]
    return f"{row[prefix + 'hit']}/{row['replicas']} [{low:.2f}, {high:.2f}]"


def report(book: Notebook, grid: dict, rows: list[dict]) -> None:
    book.say(f"Fraction of replicas with σ_min(W) < {THRESHOLD:g} at a logged step by t = {rows[0]['t']:g} "
             f"(Wilson 95 %), and of those whose det W changed sign, at h = {grid['lr']:g}, per model, N, β, "
             "start σ_min: " + "; ".join(f"{r['model']} N={r['N']} β={r['beta']:g} ε={r['start_sigma_min']:g}: "
                                         f"{interval(r)}, crossed {r['crossed_hit']}"
                                         for r in rows if r["lr"] == grid["lr"]) + ".")
    coarse = {(r["model"], r["N"], r["beta"], r["start_sigma_min"]): r
              for r in rows if r["model"] in COUNTING and r["lr"] == grid["lr"]}
    pairs = [(coarse[r["model"], r["N"], r["beta"], r["start_sigma_min"]], r)
             for r in rows if r["model"] in COUNTING and r["lr"] != grid["lr"]]
    ratios = {}
    for h, fine in pairs:
        if h["hits_per_replica"] > 0:
            ratios[f"{h['model']} N={h['N']} β={h['beta']:g} ε={h['start_sigma_min']:g}"] = \
                fine["hits_per_replica"] / h["hits_per_replica"]
    book.say(f"Singular hits (a step's proposal with σ_min < {THRESHOLD:g} or crossing det W = 0), h = {grid['lr']:g} "
             f"→ h/{REFINE}: the fraction of replicas with a hit by t (Wilson 95 %) and the mean hits per replica: "
             + "; ".join(f"{h['model']} N={h['N']} β={h['beta']:g} ε={h['start_sigma_min']:g}: "
                         f"{interval(h, 'step_')} → {interval(fine, 'step_')}, "
                         f"{h['hits_per_replica']:.3g} → {fine['hits_per_replica']:.3g} "
                         f"(time below {h['time_below']:.2g} ± {h['time_below_se']:.1g} → "
                         f"{fine['time_below']:.2g} ± {fine['time_below_se']:.1g})"
                         for h, fine in pairs) + ".",
             hits_per_replica_ratio=ratios)
    pooled = {}
    for model_name in COUNTING:
        for lr, _ in step_sizes(model_name, grid):
            these = [r for r in rows if r["model"] == model_name and r["lr"] == lr]
            pooled[f"{model_name} h={lr:g}"] = {"first_hits": sum(r["step_hit"] for r in these),
                                                "replicas": sum(r["replicas"] for r in these),
                                                "hits": sum(r["hits_per_replica"] * r["replicas"] for r in these)}
    book.say("Over the whole grid (every N, β and start): " + "; ".join(
        f"{name}: {p['first_hits']}/{p['replicas']} replicas hit, {p['hits']:.0f} hits" for name, p in pooled.items())
        + ".", pooled=pooled)


def plot(book: Notebook, grid: dict, curves: dict) -> None:
    """Top: the fraction against t at the middle β and h, per model (the counting models' own hits);
    bottom: the counting models at h and h/REFINE, per N, at the smallest β (the most hits) and the
    closest start."""
    fig, axes = slide_axes(2, len(MODELS), width=5.0, height=4.0)
    beta_mid, h = grid["betas"][len(grid["betas"]) // 2], grid["lr"]
    label = {True: "fraction with a singular hit", False: f"fraction with σ_min < {THRESHOLD:g}"}
    for ax, model_name in zip(axes[0], MODELS):
        for k, N in enumerate(grid["depths"]):
            for style, eps in zip(("-", "--", ":"), grid["starts"]):
                t, fraction = curves[model_name, h, N, beta_mid, eps]
                ax.plot(t, fraction, style, color=f"C{k}", label=f"N={N}, ε={eps:g}")
        ax.set(xlabel="time t", ylabel=label[model_name in COUNTING], ylim=(-0.02, 1.02),
               title=f"{model_name}, β = {beta_mid:g}, h = {h:g}")
        ax.legend(fontsize=8)
    eps, beta_low = grid["starts"][-1], grid["betas"][0]
    for ax, model_name in zip(axes[1], COUNTING):
        for k, N in enumerate(grid["depths"]):
            for style, (lr, _) in zip(("-", "--"), step_sizes(model_name, grid)):
                t, fraction = curves[model_name, lr, N, beta_low, eps]
                ax.plot(t, fraction, style, color=f"C{k}", label=f"N={N}, h={lr:g}")
        ax.set(xlabel="time t", ylabel=label[True], ylim=(-0.02, 1.02),
               title=f"{model_name}, β = {beta_low:g}, ε = {eps:g}: h and h/{REFINE}")
        ax.legend(fontsize=8)
    for ax in axes[1][len(COUNTING):]:
        ax.axis("off")
    fig.tight_layout()
    book.figure(fig)
