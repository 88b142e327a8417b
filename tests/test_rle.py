"""The Riemannian Langevin equation (optim=rle) and Brownian motion on the balanced manifold
(optim.noise=balanced, d×d factors): stationary laws against densities computed here by quadrature
from the closed forms (not from dlntorch's f_N), the metric identities the scheme rests on, the
β → ∞ and N → ∞ limits, and the refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlntorch.errors import ConfigError
from dlntorch.network import balancedness_of, chain
from dlntorch.rle import Clock, balanced_step, chain_metric, rle_step

f64 = torch.float64
Y = torch.diag(torch.tensor([2.0, 0.5], dtype=f64))


def pair_sum(a: np.ndarray, b: np.ndarray, N: int) -> np.ndarray:
    """f_N(a^N, b^N) = Σ_{k<N} a^{2k} b^{2(N−1−k)} (the sum form: no 0/0 at a = b)."""
    return sum(a ** (2 * k) * b ** (2 * (N - 1 - k)) for k in range(N))


def sigma_density(N: int, beta: float, log_weight, top: float, nodes: int = 1201):
    """The stationary density of the RLE in σ = s^{1/N} on the ordered grid σ_1 ≥ σ_2 ≥ 0:
    p(σ) ∝ e^{−βE} |σ_1² − σ_2²| f_N(s_1, s_2)^{1/2} (dlntorch.rle's docstring), normalised by the
    trapezoid rule; log_weight(s1, s2) is −βE integrated over the singular vectors."""
    x = np.linspace(0, top, nodes)
    A, B = np.meshgrid(x, x, indexing="ij")
    logp = log_weight(A ** N, B ** N)
    p = np.abs(A ** 2 - B ** 2) * np.sqrt(pair_sum(A, B, N)) * np.exp(logp - logp.max())
    p[A < B] = 0
    w = np.full(nodes, x[1] - x[0])
    w[[0, -1]] /= 2
    p = p * w[:, None] * w[None, :]
    return x, p / p.sum()


def chi2_of(samples: np.ndarray, x: np.ndarray, marginal: np.ndarray, bins: int = 16) -> tuple[float, int]:
    """Pearson's χ² of samples against a marginal on the grid x, in `bins` bins of equal
    probability under the marginal (cut by its own CDF: no parameter fitted to the samples)."""
    cdf = np.cumsum(marginal)
    cdf /= cdf[-1]
    edges = np.interp(np.linspace(0, 1, bins + 1)[1:-1], cdf, x)
    observed = np.histogram(samples, np.concatenate([[-np.inf], edges, [np.inf]]))[0]
    expected = samples.size / bins
    return float(((observed - expected) ** 2 / expected).sum()), bins - 1


CHI2_999 = {15: 37.70}      # χ²'s 99.9 % quantile: a correct scheme fails the test with probability 0.001


def spectral_gradient(W: torch.Tensor) -> torch.Tensor:
    """∇E for the spectral energy E = ½ Σ_i (s_i − 1)²: U diag(s − 1) V^T."""
    U, s, Vh = torch.linalg.svd(W)
    return U @ ((s - 1).unsqueeze(-1) * Vh)


def positive_starts(B: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    W = torch.eye(2, dtype=f64) + 0.3 * torch.randn(B, 2, 2, generator=gen, dtype=f64)
    flip = torch.diag(torch.tensor([1.0, -1.0], dtype=f64))
    return torch.where(torch.linalg.det(W).view(-1, 1, 1) < 0, W @ flip, W)


def run_rle(W, gradient, N, beta, h, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    hits = torch.zeros(W.shape[0], dtype=torch.int64)
    for _ in range(steps):
        W, hit = rle_step(W, gradient(W), beta, h, Clock(N), torch.randn(W.shape, generator=gen, dtype=f64), 1e-6)
        hits += hit
    return W, hits


def test_the_chain_metric_of_m0_projects_to_the_downstairs_metric():
    """Eliminating the hidden frames of M_0's rotation chain (the Schur complement on its ends)
    gives g^N's rotation block J^T J/f_N(s_i, s_j), J = [[s_j, −s_i], [−s_i, s_j]], s = σ^N; and
    sqrt(det) of the chain is |σ_i² − σ_j²| f_N^{1/2} × 2^{(N−1)/2}, the volume the σ-density uses."""
    a, b = torch.tensor(1.3, dtype=f64), torch.tensor(0.4, dtype=f64)
    for N in (1, 2, 3, 5):
        M = chain_metric(a, b, N)
        ends, hidden = [0, N], list(range(1, N))
        schur = M[ends][:, ends]
        if hidden:
            schur = schur - M[ends][:, hidden] @ torch.linalg.solve(M[hidden][:, hidden], M[hidden][:, ends])
        si, sj = float(a) ** N, float(b) ** N
        f = float(pair_sum(np.float64(a), np.float64(b), N))
        J = torch.tensor([[sj, -si], [-si, sj]], dtype=f64)
        torch.testing.assert_close(schur.flip(0, 1), J.T @ J / f, rtol=1e-13, atol=0)   # (ω_0, ω_N) = (V, U)
        volume = abs(float(a) ** 2 - float(b) ** 2) * math.sqrt(f) * 2 ** ((N - 1) / 2)
        assert math.sqrt(float(torch.linalg.det(M))) == pytest.approx(volume, rel=1e-12)


def test_rle_spectral_energy_has_the_predicted_singular_value_law():
    """2x2, N = 3, β = 4, E = ½Σ(s_i − 1)² (spectral): after t = 4 (σ_2 = s_2^{1/3} relaxes slowest,
    t = 2 was measured short of it) the histogram of σ_k over 2000 replicas against the marginals of
    p(σ), χ² below its 99.9 % quantile for each k (fixed seeds)."""
    N, beta = 3, 4.0
    W, _ = run_rle(positive_starts(2000, 0), spectral_gradient, N, beta, 0.01, 400, seed=1)
    sigma = torch.linalg.svdvals(W).numpy() ** (1 / N)
    x, p = sigma_density(N, beta, lambda s1, s2: -beta * 0.5 * ((s1 - 1) ** 2 + (s2 - 1) ** 2), top=1.8)
    for k in range(2):
        chi2, dof = chi2_of(sigma[:, k], x, p.sum(axis=1 - k))
        assert chi2 < CHI2_999[dof], (k, chi2)


def bessel_log_weight(beta):
    """−βE for E = ½‖W − Y‖², Y = diag(y1, y2), integrated over U, V in the component det W > 0:
    ∫∫ e^{β tr(Y^T U S V^T)} dU dV ∝ I0(β(s1 + s2)(y1 + y2)/2) I0(β(s1 − s2)(y1 − y2)/2)."""
    y1, y2 = 2.0, 0.5

    def log_weight(s1, s2):
        return -beta * (s1 ** 2 + s2 ** 2) / 2 + np.log(np.i0(beta * (s1 + s2) * (y1 + y2) / 2)) \
            + np.log(np.i0(beta * (s1 - s2) * (y1 - y2) / 2))
    return log_weight


def test_rle_non_spectral_energy_moves_the_singular_vectors_right():
    """E = ½‖W − Y‖² (its value depends on U and V): the singular-value law after integrating the
    singular vectors out (two Bessel functions) is matched only if the rotations and their coupling
    to s are right. N = 2, β = 2, 2000 replicas to t = 4; χ² per σ_k below the 99.9 % quantile."""
    N, beta = 2, 2.0
    W, _ = run_rle(positive_starts(2000, 2), lambda W: W - Y, N, beta, 0.01, 400, seed=3)
    assert bool((torch.linalg.det(W) > 0).all())            # the reflection keeps det W's sign
    sigma = torch.linalg.svdvals(W).numpy() ** (1 / N)
    x, p = sigma_density(N, beta, bessel_log_weight(beta), top=2.2)
    for k in range(2):
        chi2, dof = chi2_of(sigma[:, k], x, p.sum(axis=1 - k))
        assert chi2 < CHI2_999[dof], (k, chi2)


def balanced_start(B: int, N: int, seed: int) -> list[torch.Tensor]:
    from dlntorch.geometry import balanced_factors
    return balanced_factors(positive_starts(B, seed), [2] * (N + 1), torch.Generator().manual_seed(seed))


def factor_gradients_of(factors, gradient):
    from dlntorch.network import factor_gradients
    return factor_gradients(factors, gradient)


def test_balanced_stays_on_m0_and_its_product_has_the_rle_law():
    """noise=balanced on 2x2 factors, N = 2, β = 2, E = ½‖W − Y‖²: every G_p = 0 to 1e-12 after
    400 steps, and the product's singular values have the RLE's law (the same χ² test as rle)."""
    N, beta, h = 2, 2.0, 0.01
    factors = balanced_start(2000, N, 4)
    gen = torch.Generator().manual_seed(5)
    for _ in range(400):
        factors, _ = balanced_step(factors, factor_gradients_of(factors, lambda W: W - Y), beta, h, gen)
    scale = max(float(f.square().sum((-2, -1)).max()) for f in factors)
    assert max(float(G.abs().max()) for G in balancedness_of(factors)) <= 1e-12 * scale
    sigma = torch.linalg.svdvals(chain(factors)).numpy() ** (1 / N)
    x, p = sigma_density(N, beta, bessel_log_weight(beta), top=2.2)
    for k in range(2):
        chi2, dof = chi2_of(sigma[:, k], x, p.sum(axis=1 - k))
        assert chi2 < CHI2_999[dof], (k, chi2)


def test_balanced_at_depth_three_keeps_m0_and_moves_the_hidden_frames():
    N = 3
    factors = balanced_start(64, N, 6)
    gen = torch.Generator().manual_seed(7)
    start = [f.clone() for f in factors]
    for _ in range(100):
        factors, _ = balanced_step(factors, factor_gradients_of(factors, lambda W: W - Y), 2.0, 0.01, gen)
    assert max(float(G.abs().max()) for G in balancedness_of(factors)) <= 1e-12
    # the hidden frame diffuses along the fibre: W_2 moves even where the product barely could
    assert float((factors[1] - start[1]).abs().max()) > 0.1


def test_at_large_beta_rle_follows_the_downstairs_flow():
    """β = 1e12: the noise (~1e-6 over t = 0.5) and the 1/β drift vanish, and rle's Euler steps
    follow the g^N gradient flow dW/dt = −A_N(∇E) to O(h): measured 3.8e-3 at h = 2e-3 and 1.9e-3
    at h = 1e-3 (N = 2); asserted below 1e-2, and halving with h (ratio in [0.4, 0.6])."""
    from dlntorch.dynamics.flows import integrate_downstairs
    W0 = positive_starts(16, 8)
    for N in (2, 3):
        path, _ = integrate_downstairs(W0, lambda W: W - Y, [0.0, 0.5], N)
        errors = []
        for h in (2e-3, 1e-3):
            W, _ = run_rle(W0, lambda W: W - Y, N, 1e12, h, round(0.5 / h), seed=9)
            errors.append(float((W - path[-1]).abs().max()))
        assert errors[0] < 1e-2 and 0.4 < errors[1] / errors[0] < 0.6, (N, errors)


def test_infinite_depth_is_the_limit_of_deep_rle_in_rescaled_time():
    """N = inf (F = f_∞, r = log s, τ = N t) against N = 400 and 800 in τ (F = f_N/N) with the same
    draws, 100 steps of h = 0.01: the distance falls like 1/N (measured 0.013 and 0.0066), the
    limit the N = inf scheme is."""
    W0 = positive_starts(8, 10)
    paths = []
    for clock in (Clock(math.inf), Clock(400, 1 / 400), Clock(800, 1 / 800)):
        gen, W = torch.Generator().manual_seed(11), W0
        for _ in range(100):
            W, _ = rle_step(W, W - Y, 2.0, 0.01, clock, torch.randn(W.shape, generator=gen, dtype=f64))
        paths.append(W)
    far, near = (float((paths[0] - W).abs().max()) for W in paths[1:])
    assert far < 2e-2 and 0.4 < near / far < 0.6, (far, near)
    assert float((paths[0] - W0).abs().max()) > 0.1          # it moved: the comparison is not vacuous


def lab(make_cfg, *overrides, out="run"):
    return make_cfg("optim=rle", "replicas=8", "run.steps=20", "run.stop_energy=0", "init.scale_of=product",
                    "init.scale=1", "task=completion", "task.size=2", "task.observations=4", "task.spectrum=[2,0.5]",
                    *overrides, out=out)


def test_rle_runs_from_its_yaml_and_counts_singular_hits(make_cfg):
    from dlntorch.analysis import load_run
    from dlntorch.train import run
    cfg = lab(make_cfg, "optim.beta=2", "optim.singular_threshold=0.05", "optim.lr=0.01", "run.steps=100")
    assert cfg.optim.name == "rle" and cfg.optim.time_scale == "auto"
    summary = run(cfg)
    hits = np.asarray(summary["final"]["singular_hits"])
    assert summary["status"] == "completed" and hits.shape == (8,)
    assert summary["singular_hits"] == int(hits.sum())
    trajectory = load_run(summary["out_dir"]).trajectory
    assert trajectory["singular_hits"].shape[1] == 8 and bool((np.diff(trajectory["singular_hits"], axis=0) >= 0).all())
    assert all(math.isfinite(x) for x in summary["final"]["free_energy"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(summary["out_dir"] + "/tb")
    events.Reload()
    assert {"singular_hits/mean", "singular_hits/replica_0"} <= set(events.Tags()["scalars"])
    inf = run(lab(make_cfg, "optim.depth=inf", out="inf"))
    assert inf["status"] == "completed"


@pytest.mark.parametrize("overrides, message", [
    (["optim.beta=0"], r"^optim.beta=0 is not allowed"),
    (["optim.beta=-1"], r"^optim.beta=-1 is not allowed"),
    (["optim.depth=inf", "optim.time_scale=raw"], r"^optim.time_scale='raw' is not allowed"),
    (["optim.singular_threshold=-1"], r"^optim.singular_threshold=-1 is not allowed"),
    (["+task.shape=[2,3]", "task.spectrum=null", "task.rank=1"],
     r"^optim.name='rle' is not allowed: the RLE of F_β is defined for square"),
    (["init=identity"], r"^optim=rle is not allowed from this start: .* repeated singular values"),
    (["init.scale=1e-300"], r"^optim=rle is not allowed from this start: .* rank-deficient"),
])
def test_rle_refuses_bad_values_in_one_sentence(make_cfg, overrides, message):
    from dlntorch.train import run
    with pytest.raises(ConfigError, match=message):
        run(lab(make_cfg, *overrides))


@pytest.mark.parametrize("overrides, message", [
    (["model.widths=[2,3,2]"], r"^optim.noise='balanced' is not allowed: it needs square factors of one width"),
    (["init=unbalanced", "init.imbalance=1"], r"^optim.noise=balanced is not allowed from an unbalanced start"),
    (["optim.weight_decay=0.1"], r"^optim.weight_decay=0.1 is not allowed"),
])
def test_balanced_refuses_bad_starts_and_shapes(make_cfg, overrides, message):
    from dlntorch.train import run
    cfg = make_cfg("optim=langevin", "optim.noise=balanced", "replicas=4", "run.steps=5", "init=balanced",
                   "init.scale_of=product", "task=completion", "task.size=2", "task.observations=4",
                   "task.spectrum=[2,0.5]", *overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_balanced_runs_from_the_config_and_reports_hits(make_cfg):
    from dlntorch.train import run
    summary = run(make_cfg("optim=langevin", "optim.noise=balanced", "optim.beta=2", "optim.lr=0.01", "replicas=8",
                           "run.steps=50", "init=balanced", "init.scale_of=product", "task=completion", "task.size=2",
                           "task.observations=4", "task.spectrum=[2,0.5]", "model.depth=3", "run.stop_energy=0"))
    assert summary["status"] == "completed" and len(summary["final"]["singular_hits"]) == 8
    assert max(summary["final"]["balancedness"]) < 1e-12


COMMON = ("run.stop_energy=0", "run.log_points=10", "run.steps=400", "run.checkpoint_every=100", "optim.lr=0.005",
          "optim.beta=2", "replicas=6", "init.scale_of=product", "task=completion", "task.size=2",
          "task.observations=4", "task.spectrum=[2,0.5]", "optim.singular_threshold=0.1")


@pytest.mark.parametrize("model", [("optim=rle",), ("optim=langevin", "optim.noise=balanced", "init=balanced")])
def test_a_killed_run_resumes_bit_identically_with_its_hit_counts(killed_and_resumed, model):
    whole, resumed = killed_and_resumed(*model, *COMMON)
    assert resumed["steps"] == whole["steps"] == 400
    assert resumed["final"]["singular_values"] == whole["final"]["singular_values"]
    assert resumed["final"]["singular_hits"] == whole["final"]["singular_hits"]
    assert whole["singular_hits"] > 0                       # the threshold 0.1 is reached: the count is exercised


def test_the_mean_step_is_the_ito_drift_written_in_w():
    """E[ΔW]/h of one step at a fixed W against the Itô drift in W's own entries (docs/noise.md),
    b = −A_N(∇E) + (1/β) U diag(h_i ∂S_N/∂s_i + (N − 1) s_i^{1−2/N}) V^T, built here from
    geometry.metric_operator (matrix powers) and ∂S_N/∂s_i by hand; 2x2, N = 3, β = 1, h = 1e-3,
    200000 draws: within 4 standard errors entrywise (se ≈ 0.15; the Itô part alone is ≈ 2, and
    the step's O(h) bias ≈ 1e-2)."""
    from dlntorch.geometry import metric_operator
    N, beta, h, M = 3, 1.0, 1e-3, 200_000
    W = torch.tensor([[1.2, 0.3], [-0.2, 0.6]], dtype=f64)
    U, s, Vh = torch.linalg.svd(W)
    x, y = float(s[0]), float(s[1])

    def d1_half_log_f(a, b):        # ½ ∂_a log f_N(a, b), f_N = (a² − b²)/(a^{2/N} − b^{2/N})
        return 0.5 * (2 * a / (a * a - b * b) - (2 / N) * a ** (2 / N - 1) / (a ** (2 / N) - b ** (2 / N)))
    dS = torch.tensor([d1_half_log_f(x, y), d1_half_log_f(y, x)], dtype=f64)
    hN = N * s ** (2 - 2 / N)
    entropic = U @ torch.diag((hN * dS + (N - 1) * s ** (1 - 2 / N)) / beta) @ Vh
    drift = -metric_operator(W.unsqueeze(0), (W - Y).unsqueeze(0), N)[0] + entropic
    gen = torch.Generator().manual_seed(12)
    batch = W.expand(M, 2, 2).clone()
    moved, _ = rle_step(batch, batch - Y, beta, h, Clock(N), torch.randn(M, 2, 2, generator=gen, dtype=f64))
    rate = (moved - batch) / h
    mean, se = rate.mean(0), rate.std(0) / math.sqrt(M)
    assert bool(((mean - drift).abs() <= 4 * se).all()), (mean, drift, se)
    assert float(entropic.abs().max()) > 10 * float(se.max())      # the test sees the 1/β terms
