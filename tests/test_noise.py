"""The noise models of problems 3, 5 and 7 as the run uses them (optim=langevin optim.noise=…).

The fibre geometry itself (projection, Stratonovich scheme, mean-curvature drift) is tested
against independent references in test_fibre.py; here: the models through the Langevin
optimiser, their refusals, and the balanced model's stationary law against quadrature.
"""
import math

import numpy as np
import pytest
import torch

from dlntorch.errors import ConfigError
from dlntorch.network import chain
from dlntorch.optim import Langevin
from dlntorch.train import run
from tests.test_fibre import product_jacobian, random_factors

f64 = torch.float64


def langevin(factors, noise, lr=0.01, beta=100.0, seed=0, kappa=None):
    params = [torch.nn.Parameter(f.clone()) for f in factors]
    return params, Langevin(params, lr=lr, beta=beta, noise=noise, kappa=kappa,
                            generator=torch.Generator().manual_seed(seed))


def noise_only_steps(params, optimizer, steps):
    """Steps with a zero gradient: the noise term alone."""
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()


def test_the_old_fibre_name_is_gl_walk_with_a_deprecation_warning(make_cfg):
    F = random_factors([2, 2, 2, 2], B=4)
    walks = {}
    for name in ("gl_walk", "fibre"):
        params, opt = langevin(F, name)
        noise_only_steps(params, opt, 20)
        walks[name] = [p.detach() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(walks["gl_walk"], walks["fibre"]))
    with pytest.warns(FutureWarning, match="optim.noise=fibre is deprecated.*gl_walk"):
        from dlntorch.config import validate
        validate(make_cfg("optim=langevin", "optim.noise=fibre"))


@pytest.mark.parametrize("noise", ["gl_walk", "fibre_brownian"])
def test_fibre_models_keep_the_product_through_the_optimiser(noise):
    F = random_factors([2, 2, 2, 2], B=4, seed=1)
    W = chain(F)
    params, opt = langevin(F, noise, lr=0.01, beta=10.0)
    noise_only_steps(params, opt, 1000)
    moved = [p.detach() for p in params]
    size = torch.stack([f.flatten(1).norm(dim=1) for f in moved]).prod(0).max()
    # exact group moves: rounding only, ~1e-16 × Π‖W_p‖ per step (see test_fibre)
    assert (chain(moved) - W).abs().max() / size < 1e-12
    assert max((a - b).abs().max() for a, b in zip(moved, F)) > 0.1


def test_tangential_increments_at_kappa_zero_do_not_change_the_product_to_first_order():
    F = random_factors([2, 3, 2], B=4, seed=2)
    params, opt = langevin(F, "tangential", kappa=0.0)
    noise_only_steps(params, opt, 1)
    step = torch.cat([(p.detach() - f).flatten(1) for p, f in zip(params, F)], dim=1)
    J = product_jacobian(F)
    # J·Δ = 0: every increment is tangent to the fibre (Δ ~ 0.1, rounding ~1e-16)
    assert (J @ step.unsqueeze(-1)).abs().max() < 1e-10
    assert step.abs().max() > 1e-2


def test_tangential_with_kappa_one_is_the_isotropic_model():
    F = random_factors([2, 2, 2], B=3, seed=3)
    (p_iso, o_iso), (p_tan, o_tan) = langevin(F, "isotropic", seed=4), langevin(F, "tangential", seed=4, kappa=1.0)
    noise_only_steps(p_iso, o_iso, 5)
    noise_only_steps(p_tan, o_tan, 5)
    # the same draws; P ξ + (ξ − P ξ) rounds to ξ within a few ulps per step
    for a, b in zip(p_iso, p_tan):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("overrides, message", [
    (["optim.noise=tangential", "optim.kappa=1.5"],
     r"^optim.kappa=1.5 is not allowed: it must be a number in \[0, 1\]"),
    (["optim.noise=isotropic", "optim.kappa=0.5"], r"^optim.kappa=0.5 is not allowed: it mixes normal noise"),
    # balanced now runs on d×d factors (tests/test_rle.py); from the default (unbalanced) start it is refused
    (["optim.noise=balanced"], r"^optim.noise=balanced is not allowed from an unbalanced start"),
    (["optim.noise=tangential", "model.depth=1"], r"^optim.noise='tangential' is not allowed: depth 1 has no fibre"),
    (["optim.noise=fibre_brownian", "init.scale=1e-300"],
     r"^optim.noise=fibre_brownian is not allowed from this start"),
    (["optim.beta=0"], r"^optim.beta=0 is not allowed"),
])
def test_bad_noise_settings_are_one_sentence_before_any_compute(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg("optim=langevin", "replicas=4", *overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_balanced_refuses_an_unbalanced_start():
    F = [torch.full((4, 1, 1), 1.0, dtype=f64), torch.full((4, 1, 1), 2.0, dtype=f64)]
    with pytest.raises(ConfigError, match="optim.noise=balanced is not allowed from an unbalanced start"):
        langevin(F, "balanced")


def test_every_noise_model_runs_from_the_config(make_cfg):
    for noise in ("tangential", "fibre_brownian", "gl_walk"):
        summary = run(make_cfg("optim=langevin", f"optim.noise={noise}", "replicas=8", "run.steps=50",
                               "init.scale=0.5", "optim.beta=1e3", out=noise))
        assert summary["status"] == "completed" and summary["steps"] == 50


def scalar_gradients(params, y):
    """∂L/∂w_p = (w − y) Π_{q≠p} w_q for E = ½(w − y)², w = w_1 ⋯ w_N (1x1 factors)."""
    w = torch.stack([p.detach() for p in params]).prod(0)
    for p_index, p in enumerate(params):
        others = torch.ones_like(w)
        for q_index, q in enumerate(params):
            if q_index != p_index:
                others = others * q.detach()
        p.grad = (w - y) * others


def test_balanced_noise_has_the_exact_stationary_law_of_the_scalar_rle():
    """1x1 factors, N = 3, E = ½(w − y)²: on M_0 (w_p = u) the SDE is du = −u²(u³ − y) dt +
    sqrt(2/(3β)) dB, whose stationary density is ∝ e^{−βE(u³)} du. Started from that law (inverse
    CDF of a quadrature), E[w] and E[w²] over t ∈ [0, 10] match the quadrature within 4 standard
    errors (computed from the replicas' time averages: replicas are independent). The step's own
    O(h) bias, measured at h = 0.002, is −3e-4, a tenth of the standard error."""
    N, y, beta, h, T, B = 3, 1.0, 4.0, 0.005, 10.0, 10_000
    u = np.linspace(-3, 3, 600_001)
    density = np.exp(-beta * 0.5 * (u ** N - y) ** 2)
    cdf = np.cumsum(density) / density.sum()
    exact = [float((density * u ** (N * k)).sum() / density.sum()) for k in (1, 2)]
    gen = torch.Generator().manual_seed(1)
    u0 = torch.from_numpy(np.interp(torch.rand(B, generator=gen, dtype=f64).numpy(), cdf, u)).view(B, 1, 1)
    params, opt = langevin([u0] * N, "balanced", lr=h, beta=beta, seed=0)
    samples = []
    for k in range(round(T / h)):
        scalar_gradients(params, y)
        opt.step()
        if k % 10 == 0:
            samples.append(torch.stack([p.detach() for p in params]).prod(0).flatten())
    w = torch.stack(samples)                       # (times, B)
    assert torch.equal(params[0].detach(), params[1].detach())   # the state stays on M_0
    for k, target in zip((1, 2), exact):
        per_replica = (w ** k).mean(0)
        mean, se = float(per_replica.mean()), float(per_replica.std()) / math.sqrt(B)
        assert abs(mean - target) <= 4 * se, (k, mean, target, se)


# -- what a stochastic run logs -----------------------------------------------------------------

STOCHASTIC_RUN = ["optim=langevin", "optim.beta=100", "optim.lr=0.01", "model.depth=3", "replicas=16",
                  "run.steps=200", "run.log_points=12", "run.stop_energy=0"]


@pytest.mark.parametrize("noise, moves", [("isotropic", True), ("gl_walk", False), ("fibre_brownian", False)])
def test_the_products_drift_is_zero_under_fibre_noise_and_positive_under_isotropic(make_cfg, tmp_path, noise, moves):
    """From W = I (a zero of the seed task: no gradient), ‖W(t) − W(0)‖ is the noise's own
    displacement of the product: exact group moves keep it to rounding (200 steps of ~1e-16 each on
    O(1) factors: 1e-12), isotropic noise moves it by ~σ√steps ≈ 0.3."""
    from dlntorch.analysis import load_run
    run(make_cfg(*STOCHASTIC_RUN, f"optim.noise={noise}", "init=identity", "init.scale=1"))
    drift = load_run(tmp_path / "run").trajectory["product_drift"]          # (T, B)
    assert drift.shape[1] == 16 and drift.shape[0] > 5 and np.all(drift[0] == 0)
    if moves:
        assert np.all(drift[1:] > 1e-3)
    else:
        assert np.all(drift <= 1e-12)


def test_tensorboard_and_the_summary_carry_95_percent_bands_of_the_logged_means(make_cfg, tmp_path):
    """Every observable TensorBoard shows with its mean gets name/ci95_low and name/ci95_high, the
    mean ± 1.96 s/√B over live replicas (s with ddof 1): against numpy on trajectory.npz's rows
    (TensorBoard stores float32: relative 1e-6). The layout groups them as margin charts; the
    summary's aggregates carry the band of the final row; S_N, F_β, δ and the drift are shown."""
    from dlntorch.analysis import load_run
    from tests.test_tensorboard import events, layout_of
    summary = run(make_cfg(*STOCHASTIC_RUN, "optim.noise=tangential", "optim.kappa=0.5", "init.scale=1"))
    out = tmp_path / "run"
    traj, reader = load_run(out).trajectory, events(out)
    tags = set(reader.Tags()["scalars"])
    for name in ("energy", "balancedness", "balancedness_1", "balancedness_2", "balance_gap", "product_drift",
                 "entropy", "free_energy", "sigma_1"):
        values = traj[name]                                                  # (T, B), no replica diverged
        mean = values.mean(1)
        half = 1.959963984540054 * values.std(1, ddof=1) / math.sqrt(values.shape[1])
        expected = {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}
        for tag, want in ((f"{name}/{agg}", value) for agg, value in expected.items()):
            assert tag in tags, tag
            got = np.array([e.value for e in reader.Scalars(tag)])
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
        final = summary["aggregates"][name]
        assert final["ci95_low"] == pytest.approx(mean[-1] - half[-1], rel=1e-12, abs=1e-15)
        assert final["ci95_high"] == pytest.approx(mean[-1] + half[-1], rel=1e-12, abs=1e-15)
    bands = next(c for c in layout_of(reader).category if c.title == "95 % bands of the mean over replicas")
    charts = {chart.title: [(s.value, s.lower, s.upper) for s in chart.margin.series] for chart in bands.chart}
    assert charts["product_drift (mean, 95 % band)"] == [("product_drift/mean", "product_drift/ci95_low",
                                                          "product_drift/ci95_high")]


def test_a_deterministic_run_has_no_bands_and_no_drift(make_cfg, tmp_path):
    from dlntorch.analysis import load_run
    from tests.test_tensorboard import events
    summary = run(make_cfg("model.depth=3", "replicas=4", "run.steps=50", "run.log_points=5"))
    assert "product_drift" not in load_run(tmp_path / "run").trajectory
    assert not any("ci95" in tag for tag in events(tmp_path / "run").Tags()["scalars"])
    assert "ci95_low" not in summary["aggregates"]["energy"]
    assert summary["converged_level"] == summary["config"]["run"]["converged_energy"]


def test_a_langevin_run_counts_as_converged_at_its_thermal_level(make_cfg):
    """At β = 1e4 the final E fluctuates at ~(observed entries)/(2β) ≈ 1e-4, never below
    run.converged_energy = 1e-6: the level is temperature-aware (+ m·n/β), so a run that reached
    equilibrium near the zero set counts as converged and prints no warning."""
    from dlntorch.report import not_converged_advice
    summary = run(make_cfg("optim=langevin", "optim.beta=1e4", "optim.lr=0.01", "model.depth=2", "replicas=32",
                           "run.steps=2000", "init.scale=1", "run.log_points=5"))
    assert summary["converged_level"] == pytest.approx(1e-6 + 4 / 1e4, rel=1e-12)
    energies = np.asarray(summary["final"]["energy"])
    assert np.all(energies > 1e-6)                      # the plain rule would call none converged
    assert summary["converged"] == int((energies < summary["converged_level"]).sum()) >= 24
    assert not_converged_advice(summary) is None
