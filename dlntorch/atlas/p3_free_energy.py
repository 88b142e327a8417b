"""p3_free_energy — problem 3: where the free energy F_β = E − S_N/β has its minimisers, and the
stationary law the entropy predicts.

(a) The free-energy flow (optim=free_energy, dW/dt = −A_N(∇E − ∇S_N/β), in τ = N t) run to
rest from a few Gaussian starts, for a spectral energy (task=completion, every entry of a 2x2 truth
with singular values t = (2, 0.5) observed: E = ½‖W − Y‖², whose minimiser over W at fixed
singular values shares Y's singular vectors) and for the seed 2x2 task, against 1/β, per depth N.
The lowest F_β among the replicas' end points is taken as argmin F_β; for the spectral energy
it is checked against a direct LBFGS minimisation of ½Σ(s_i − t_i)² − S_N(s)/β over s. For the
seed task F_β is unbounded below (on the zero-energy set W11 = W22 = 1 the off-diagonal entries are
free and S_N grows like (1 − 1/N) log s_max), so the flow has no end point: the table reports where it
is at τ = T/2 and τ = T. (b) `optim.noise=balanced` (1x1 factors, N = 3, E = ½(w − 1)²) run to
stationarity: the histogram of w over replicas at the last time against the density the entropy
formula predicts, p(w) ∝ e^{−βE(w) + S_N} dvol_{g^N} ∝ e^{−βE(w)} |w|^{1/N − 1} (S_N is constant for
d = 1, and g^N = dw²/(N |w|^{2−2/N})), with Pearson's χ² over bins of expected count ≥ 5.
(b′) the same for 2x2 products: optim=rle (the Riemannian Langevin equation of F_β on the
product) and optim.noise=balanced on 2x2 factors (Brownian motion on M_0), both at N = 2, β = 2 on
the spectral task E = ½‖W − Y‖², from det > 0 starts: the histograms of σ_k = s_k^{1/N} against
the marginals of the predicted density p(σ) ∝ e^{−βE} |σ_1² − σ_2²| f_N(s_1, s_2)^{1/2}, with E
integrated over the singular vectors in the det > 0 component
(∝ e^{−β(s_1² + s_2²)/2} I0(β(s_1 + s_2)(y_1 + y_2)/2) I0(β(s_1 − s_2)(y_1 − y_2)/2)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..analysis import load_run
from ..geometry import f_N
from .common import Notebook, slide_axes

TARGET = (2.0, 0.5)          # the spectral energy's singular values t
SCALAR = dict(beta=4.0, depth=3, target=1.0)
MATRIX = dict(beta=2.0, depth=2)          # (b′): rle and balanced on 2x2, E = ½‖W − diag(TARGET)‖²


def plan(quick: bool) -> dict:
    if quick:
        return dict(depths=[2, 3], seed_depths=[2], inverse_betas=[0.5], replicas=4, horizon=20.0,
                    seed_horizon=5.0, scalar=dict(replicas=256, lr=0.01, steps=100),
                    matrix=dict(replicas=256, lr=0.01, steps=100))
    # the seed task's flow runs off to infinity, where it grows stiff (‖W‖ ~ (τ/β)^{N/2}, its
    # linearisation ~ ‖W‖^{2−2/N}): a shorter horizon, and N ≤ 4
    return dict(depths=[1, 2, 3, 4, 8, "inf"], seed_depths=[1, 2, 3, 4], inverse_betas=[0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
                replicas=8, horizon=40.0, seed_horizon=10.0, scalar=dict(replicas=8192, lr=0.002, steps=10000),
                # t = 6: the slowest mode (σ_2 near 0) was measured to need t ≈ 4 in tests/test_rle.py
                matrix=dict(replicas=8192, lr=0.01, steps=600))


def flow_config(task: dict, init: dict, N, beta: float, replicas: int, horizon: float, lr: float = 0.5) -> dict:
    return {"task": task, "model": {"depth": 3}, "init": init,
            "optim": {"name": "free_energy", "beta": beta, "depth": str(N), "lr": lr, "time_scale": "per_depth",
                      "rtol": 1e-9, "atol": 1e-11},
            "run": {"steps": int(round(horizon / lr)), "stop_energy": 0.0, "log_points": 20},
            "replicas": replicas, "seed": 0}


def spectral_minimiser(beta: float, N) -> np.ndarray:
    """argmin_s ½Σ(s_i − t_i)² − S_N(s)/β by LBFGS over log s (s > 0), float64; N = inf: S̃_∞."""
    import torch

    from ..dynamics.free_energy import pair_function
    t = torch.tensor(TARGET, dtype=torch.float64)
    pair = pair_function(math.inf if N == "inf" else int(N))
    z = t.log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=400, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = z.exp()
        F = 0.5 * (s - t).square().sum() - 0.5 * torch.log(pair(s[0], s[1])) / beta
        F.backward()
        return F

    opt.step(closure)
    return z.detach().exp().numpy()


def best(traj: dict, k: int = -1) -> int:
    """The replica with the lowest F_β at log row k (the entropy is observed at finite N; at N = 1
    and inf F_β differs from E by a constant, so E orders the replicas there)."""
    F = traj["free_energy"][k] if "free_energy" in traj else traj["energy"][k]
    return int(np.nanargmin(F))


def spectral_files(book: Notebook, replicas: int) -> tuple[dict, dict]:
    """The spectral task (every entry of Y = diag(t) observed) and its starts: products I + 0.3 Z
    (Z Gaussian, seed 0) with det > 0, in Y's component of the full-rank matrices (the flow does
    not cross det = 0, and the other component's infimum sits on its boundary s₂ = 0)."""
    task_file = book.out / "spectral_task.npz"
    np.savez(task_file, mask=np.ones((2, 2)), values=np.diag(TARGET), truth=np.diag(TARGET))
    return ({"name": "completion", "file": str(task_file), "shape": [2, 2]},
            positive_starts(book, replicas, "spectral_starts.npz"))


def positive_starts(book: Notebook, replicas: int, name: str) -> dict:
    """An init=file of products I + 0.3 Z (Z Gaussian, seed 0) with det > 0."""
    rng = np.random.default_rng(0)
    starts = []
    while len(starts) < replicas:
        W = np.eye(2) + 0.3 * rng.standard_normal((2, 2))
        if np.linalg.det(W) > 0:
            starts.append(W)
    np.savez(book.out / name, product=np.array(starts))
    return {"name": "file", "file": str(book.out / name)}


def minimisers(book: Notebook, grid: dict) -> list[dict]:
    rows = []
    spectral, spectral_init = spectral_files(book, grid["replicas"])
    gaussian = {"name": "gaussian", "scale": 1.0, "scale_of": "product"}
    for task_name, task, init, depths, horizon in (
            ("spectral", spectral, spectral_init, grid["depths"], grid["horizon"]),
            ("seed2x2", {"name": "seed2x2"}, gaussian, grid["seed_depths"], grid["seed_horizon"])):
        for N in depths:
            for inv in grid["inverse_betas"]:
                beta = 1 / inv
                summary = book.train(flow_config(task, init, N, beta, grid["replicas"], horizon))
                traj = load_run(summary["out_dir"]).trajectory
                b = best(traj)
                half = int(np.argmin(np.abs(traj["t"] - traj["t"][-1] / 2)))
                W_end = product_row(traj, -1, b)
                row = {"task": task_name, "N": N, "inverse_beta": inv, "tau": traj["t"][-1],
                       "s1": traj["singular_values"][-1, b, 0], "s2": traj["singular_values"][-1, b, 1],
                       "det": traj["det"][-1, b], "W12_W21": W_end, "energy": traj["energy"][-1, b],
                       "norm_half": traj["product_norm"][half, b], "norm_end": traj["product_norm"][-1, b]}
                if task_name == "spectral":
                    s_star = spectral_minimiser(beta, N)
                    row.update(s1_direct=s_star[0], s2_direct=s_star[1],
                               s_error=float(np.max(np.abs(np.array([row["s1"], row["s2"]]) - s_star))))
                rows.append(row)
    return rows


def product_row(traj: dict, k: int, b: int) -> float:
    """W12·W21 of replica b at log row k (the seed task logs w12 and w21; nan for other tasks)."""
    return float(traj["w12"][k, b] * traj["w21"][k, b]) if "w12" in traj else math.nan


def scalar_probabilities(edges: np.ndarray, beta: float, N: int, y: float, nodes: int = 200001) -> np.ndarray:
    """P(w in each bin) under p(w) ∝ e^{−β(w − y)²/2} |w|^{1/N − 1}, by the trapezoid rule in
    u = w^{1/N} (odd N: w = u^N is a bijection of ℝ and p(w) dw ∝ e^{−β(u^N − y)²/2} du, smooth,
    so the rule converges fast; the infinite outer edges are cut where the density is < e^{−60})."""
    reach = (abs(y) + math.sqrt(120 / beta)) ** (1 / N) + 1
    u = np.linspace(-reach, reach, nodes)
    density = np.exp(-beta * (u ** N - y) ** 2 / 2)
    cumulative = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(u))])
    cuts = np.sign(edges) * np.abs(edges) ** (1 / N)
    cuts = np.clip(np.where(np.isinf(edges), np.sign(edges) * reach, cuts), -reach, reach)
    mass = np.interp(cuts, u, cumulative)
    return np.diff(mass) / cumulative[-1]


def matrix_marginals(beta: float, N: int, nodes: int = 1201) -> tuple[np.ndarray, list[np.ndarray]]:
    """The marginal densities of σ_1 ≥ σ_2 (σ = s^{1/N}) under the RLE's stationary law for
    E = ½‖W − Y‖², Y = diag(TARGET), in the det > 0 component, on a grid x (trapezoid rule)."""
    y1, y2 = TARGET
    x = np.linspace(0, (abs(y1) + 3 / math.sqrt(beta)) ** (1 / N) * 1.3, nodes)
    A, B = np.meshgrid(x, x, indexing="ij")
    S1, S2 = A ** N, B ** N
    log_weight = -beta * (S1 ** 2 + S2 ** 2) / 2 + np.log(np.i0(beta * (S1 + S2) * (y1 + y2) / 2)) \
        + np.log(np.i0(beta * (S1 - S2) * (y1 - y2) / 2))
    f = f_N(torch.from_numpy(S1), torch.from_numpy(S2), N).numpy()     # f_N(σ_1^N, σ_2^N), finite at σ_1 = σ_2
    p = np.abs(A ** 2 - B ** 2) * np.sqrt(f) * np.exp(log_weight - log_weight.max())
    p[A < B] = 0
    w = np.full(nodes, x[1] - x[0])
    w[[0, -1]] /= 2
    p = p * w[:, None] * w[None, :]
    p /= p.sum()
    return x, [p.sum(axis=1) / w, p.sum(axis=0) / w]


def grid_probabilities(edges: np.ndarray, x: np.ndarray, density: np.ndarray) -> np.ndarray:
    """P(bin) of a density tabulated on x, by its trapezoid CDF (edges beyond x are clipped)."""
    cumulative = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    mass = np.interp(np.clip(edges, x[0], x[-1]), x, cumulative)
    return np.diff(mass) / cumulative[-1]


def chi2_test(samples: np.ndarray, probabilities, bins: int = 40) -> dict:
    """Pearson's χ² of the samples against a law given by `probabilities(edges)` (bin masses):
    `bins` equal-width bins over the central range, outer ones open, merged until every expected
    count is ≥ 5; p-value Q(k/2, χ²/2) by torch.special.gammaincc with k = bins − 1 degrees of
    freedom (no parameter is fitted)."""
    import torch
    low, high = np.quantile(samples, [0.002, 0.998])
    edges = np.concatenate([[-np.inf], np.linspace(low, high, bins + 1)[1:-1], [np.inf]])
    n = samples.size
    while True:
        expected = n * probabilities(edges)
        small = np.flatnonzero(expected < 5)
        if small.size == 0 or edges.size <= 3:
            break
        k = int(small[0])                          # merge the bin with a neighbour
        edges = np.delete(edges, k + 1 if k + 1 < edges.size - 1 else k)
    observed = np.histogram(samples, edges)[0]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = edges.size - 2
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(chi2 / 2, dtype=torch.float64)))
    return {"chi2": chi2, "dof": dof, "p_value": p, "edges": edges, "observed": observed, "expected": expected}


def stationary(book: Notebook, grid: dict) -> dict:
    """(b): noise=balanced on 1x1 factors from balanced Gaussian starts, w = the product at the
    last time (one independent sample per replica), against p(w)."""
    beta, N, y = SCALAR["beta"], SCALAR["depth"], SCALAR["target"]
    task_file = book.out / "scalar_task.npz"
    np.savez(task_file, mask=np.ones((1, 1)), values=np.full((1, 1), y))
    run = grid["scalar"]
    cfg = {"task": {"name": "completion", "file": str(task_file), "shape": [1, 1]}, "model": {"depth": N},
           "init": {"name": "balanced", "scale": 1.0, "scale_of": "product"},
           "optim": {"name": "langevin", "beta": beta, "lr": run["lr"], "noise": "balanced"},
           "run": {"steps": run["steps"], "stop_energy": 0.0, "log_points": 10},
           "replicas": run["replicas"], "seed": 0}
    summary = book.train(cfg)
    w = np.asarray(summary["final"]["singular_values"], dtype=float)[:, 0] * \
        np.sign(np.asarray(summary["final"]["det"], dtype=float))
    return {"samples": w, "time": run["lr"] * run["steps"],
            **chi2_test(w, lambda edges: scalar_probabilities(edges, beta, N, y))}


def matrix_laws(book: Notebook, grid: dict) -> dict[str, dict]:
    """(b′): optim=rle and noise=balanced (2x2 factors) on the spectral task from det > 0 starts;
    σ_k = s_k^{1/N} of the product at the last time (one sample per replica) against p(σ)."""
    beta, N, run = MATRIX["beta"], MATRIX["depth"], grid["matrix"]
    task, _ = spectral_files(book, 1)
    init = positive_starts(book, run["replicas"], "matrix_starts.npz")
    x, marginals = matrix_marginals(beta, N)
    laws = {}
    for model, optim in (("rle", {"name": "rle", "beta": beta, "lr": run["lr"], "depth": str(N)}),
                         ("balanced", {"name": "langevin", "noise": "balanced", "beta": beta, "lr": run["lr"]})):
        summary = book.train({"task": task, "model": {"depth": N}, "init": init, "optim": optim,
                              "run": {"steps": run["steps"], "stop_energy": 0.0, "log_points": 10},
                              "replicas": run["replicas"], "seed": 0})
        sigma = np.asarray(summary["final"]["singular_values"], dtype=float) ** (1 / N)
        tests = [chi2_test(sigma[:, k], lambda edges, k=k: grid_probabilities(edges, x, marginals[k]))
                 for k in range(2)]
        laws[model] = {"sigma": sigma, "tests": tests, "x": x, "marginals": marginals,
                       "hits": int(np.sum(summary["final"]["singular_hits"])), "time": run["lr"] * run["steps"]}
    return laws


def measure(book: Notebook) -> None:
    grid = plan(book.quick)
    book.note(target_singular_values=TARGET, scalar_model=SCALAR, **grid,
              argmin="the lowest F_β among the replicas' end points of the free-energy flow (τ = N t)")
    rows = minimisers(book, grid)
    law = stationary(book, grid)
    laws = matrix_laws(book, grid)
    book.table(rows)
    book.table([{"w_low": lo, "w_high": hi, "observed": o, "expected": e}
                for lo, hi, o, e in zip(law["edges"][:-1], law["edges"][1:], law["observed"], law["expected"])],
               "stationary.csv")
    spectral = [r for r in rows if r["task"] == "spectral"]
    book.say("Spectral energy ½‖W − Y‖², Y's singular values (2, 0.5): the free-energy flow's lowest end point "
             "matches the direct minimisation of F_β over the singular values to "
             f"{max(r['s_error'] for r in spectral):.1e} (largest error over N = "
             + ", ".join(map(str, grid["depths"])) + " and 1/β = " + ", ".join(f"{v:g}" for v in grid["inverse_betas"])
             + "); at the largest 1/β = " + f"{max(grid['inverse_betas']):g} the singular values move from (2, 0.5) to "
             + "; ".join(f"N={r['N']}: ({r['s1']:.3f}, {r['s2']:.3f})" for r in spectral
                         if r["inverse_beta"] == max(grid["inverse_betas"])) + ".",
             spectral_error=max(r["s_error"] for r in spectral))
    seed = [r for r in rows if r["task"] == "seed2x2"]
    book.say("Seed task: for N ≥ 2 F_β has no minimiser (unbounded below along W11 = W22 = 1; at N = 1 it is E), "
             "and the flow runs off: ‖W‖ at "
             f"τ = T/2 → T = {grid['seed_horizon']:g} at the largest 1/β: "
             + "; ".join(f"N={r['N']}: {r['norm_half']:.3g} → {r['norm_end']:.3g} (det {r['det']:.3g}, W12·W21 "
                         f"{r['W12_W21']:.3g})" for r in seed if r["inverse_beta"] == max(grid["inverse_betas"])) + ".")
    book.say(f"noise=balanced, 1x1 factors, N = {SCALAR['depth']}, β = {SCALAR['beta']:g}, E = ½(w − 1)², "
             f"{law['samples'].size} replicas at t = {law['time']:g}: χ² = {law['chi2']:.1f} on {law['dof']} "
             "degrees of "
             f"freedom against p(w) ∝ e^{{−βE}} |w|^{{1/N − 1}}, p-value {law['p_value']:.3g}.",
             chi2=law["chi2"], chi2_dof=law["dof"], chi2_p=law["p_value"])
    for model, result in laws.items():
        (one, two) = result["tests"]
        name = "optim=rle" if model == "rle" else "noise=balanced (2x2 factors)"
        book.say(f"{name}, N = {MATRIX['depth']}, β = {MATRIX['beta']:g}, E = ½‖W − Y‖², "
                 f"{result['sigma'].shape[0]} replicas at t = {result['time']:g}: σ_1: χ² = {one['chi2']:.1f} on "
                 f"{one['dof']} (p {one['p_value']:.3g}), σ_2: χ² = {two['chi2']:.1f} on {two['dof']} "
                 f"(p {two['p_value']:.3g}) against the RLE's predicted law; {result['hits']} singular hits.",
                 **{f"{model}_chi2_sigma1": one["chi2"], f"{model}_chi2_sigma2": two["chi2"],
                    f"{model}_p_sigma1": one["p_value"], f"{model}_p_sigma2": two["p_value"]})
    figure(book, rows, law, laws, grid)


def figure(book: Notebook, rows, law, laws, grid) -> None:
    fig, axes = slide_axes(2, 3, width=4.6, height=4.2)
    for k, N in enumerate(grid["depths"]):
        mine = [r for r in rows if r["task"] == "spectral" and r["N"] == N]
        x = [r["inverse_beta"] for r in mine]
        axes[0, 0].plot(x, [r["s1"] for r in mine], "o-", color=f"C{k}", label=f"N={N}")
        axes[0, 0].plot(x, [r["s2"] for r in mine], "s--", color=f"C{k}")
        axes[0, 0].plot(x, [r["s1_direct"] for r in mine], "k+", ms=8)
        axes[0, 0].plot(x, [r["s2_direct"] for r in mine], "k+", ms=8)
        axes[0, 1].plot(x, [r["det"] for r in mine], "o-", color=f"C{k}", label=f"N={N}")
        seed = [r for r in rows if r["task"] == "seed2x2" and r["N"] == N]   # empty where N is not run
        axes[0, 2].plot([r["inverse_beta"] for r in seed], [r["W12_W21"] for r in seed], "o-", color=f"C{k}",
                        label=f"N={N}")
        axes[0, 2].plot([r["inverse_beta"] for r in seed], [r["det"] for r in seed], "s--", color=f"C{k}")
    axes[0, 0].set(xlabel="temperature 1/β", ylabel="singular values of argmin F_β (o: s₁, □: s₂, +: direct)",
                   title="(a) spectral energy, t = (2, 0.5)")
    axes[0, 1].set(xlabel="temperature 1/β", ylabel="det argmin F_β (sign: Y's component)",
                   title="(a) spectral energy: det")
    axes[0, 2].set(xlabel="temperature 1/β", ylabel=f"at τ = {grid['seed_horizon']:g}: W12·W21 (o), det (□)",
                   title="(a) seed task: no minimiser, the flow at τ = T")
    axes[0, 0].legend(fontsize=9)
    axes[0, 2].legend(fontsize=9)
    ax = axes[1, 0]
    edges = law["edges"]
    finite = np.clip(edges, law["samples"].min(), law["samples"].max())
    widths = np.diff(finite)
    n = law["samples"].size
    ax.bar(finite[:-1], law["observed"] / (n * widths), widths, align="edge", alpha=0.5, label="histogram (replicas)")
    beta, N, y = SCALAR["beta"], SCALAR["depth"], SCALAR["target"]
    w = np.linspace(finite[0], finite[-1], 2001)
    w = w[np.abs(w) > 1e-3]
    # normalising constant of e^{−βE}|w|^{1/N−1}: N ∫ e^{−β(u^N − y)²/2} du (w = u^N, dw = N u^{N−1} du)
    u = np.linspace(-4, 4, 400001)
    norm = N * np.trapezoid(np.exp(-beta * (u ** N - y) ** 2 / 2), u)
    ax.plot(w, np.exp(-beta * (w - y) ** 2 / 2) * np.abs(w) ** (1 / N - 1) / norm, "k", lw=1.5,
            label="e^{−βE}|w|^{1/N−1}/Z")
    ax.set(xlabel="product w", ylabel="density", ylim=(0, 2.5),
           title=f"(b) balanced 1x1, N={N}, β={beta:g}: χ²={law['chi2']:.0f}/{law['dof']}")
    ax.legend(fontsize=9)
    for ax, (model, result) in zip(axes[1, 1:], laws.items()):
        for k, color in ((0, "C0"), (1, "C1")):
            ax.hist(result["sigma"][:, k], bins=60, density=True, alpha=0.45, color=color,
                    label=f"σ_{k + 1} (χ²={result['tests'][k]['chi2']:.0f}/{result['tests'][k]['dof']})")
            ax.plot(result["x"], result["marginals"][k], color=color, lw=1.5)
        ax.set(xlabel="σ_k = s_k^{1/N} of the product", ylabel="density",
               title=f"(b′) {model}, 2x2, N={MATRIX['depth']}, β={MATRIX['beta']:g}: hist. vs law (lines)")
        ax.legend(fontsize=9)
    fig.tight_layout()
    book.figure(fig)
