"""Step-based dynamics against exact identities and closed forms (float64)."""
import math

import pytest
import torch

from dlntorch.dynamics import StepDynamics
from dlntorch.network import DeepLinearNetwork, balancedness_of, chain, factor_gradients
from dlntorch.tasks import build_task
from dlntorch.train import run


def lab(make_cfg, *overrides, factors=None):
    cfg = make_cfg(*overrides)
    task = build_task(cfg.task, 0)
    widths = [task.shape[1]] + [max(task.shape)] * (cfg.model.depth - 1) + [task.shape[0]] \
        if cfg.model.widths is None else list(cfg.model.widths)
    net = DeepLinearNetwork(widths, cfg.replicas)
    gen = torch.Generator().manual_seed(7)
    net.set_factors(factors or [0.6 * torch.randn(cfg.replicas, o, i, generator=gen)
                                for i, o in zip(widths[:-1], widths[1:])])
    return StepDynamics(cfg, net, task, seed=0), task


def test_gd_changes_balancedness_by_exactly_eta_squared_terms(make_cfg):
    """G_p(k+1) − G_p(k) = η² (D_{p+1}^T D_{p+1} − D_p D_p^T): the first-order terms cancel
    identically, so the identity holds to rounding at every step."""
    lr = 0.03
    dyn, task = lab(make_cfg, "task=completion", "task.size=4", "task.rank=2", "task.observations=10",
                    "model.depth=4", "replicas=3", f"optim.lr={lr}")
    worst = 0.0
    for _ in range(200):
        factors = [f.clone() for f in dyn.factors()]
        D = factor_gradients(factors, task.gradient(chain(factors)))
        before = balancedness_of(factors)
        dyn.advance(1)
        after = balancedness_of(dyn.factors())
        for p in range(len(before)):
            predicted = lr ** 2 * (D[p + 1].mT @ D[p + 1] - D[p] @ D[p].mT)
            worst = max(worst, (after[p] - before[p] - predicted).abs().max().item())
    # G entries are O(1): float64 rounding of a few products of O(1) matrices
    assert worst < 1e-12


def test_balancedness_drift_over_fixed_time_is_first_order_in_the_step(make_cfg):
    """Σ_k η² (…) over T/η steps: the drift ‖G(T) − G(0)‖ is O(η)."""
    drifts = []
    for lr in (0.02, 0.01, 0.005):
        dyn, _ = lab(make_cfg, "model.depth=3", "replicas=4", f"optim.lr={lr}")
        G0 = balancedness_of(dyn.factors())
        dyn.advance(round(2.0 / lr))
        G = balancedness_of(dyn.factors())
        drifts.append(sum((g - g0).pow(2).sum() for g, g0 in zip(G, G0)).sqrt().item())
    for coarse, fine in zip(drifts, drifts[1:]):
        # halving η halves the drift up to O(η²) corrections
        assert abs(fine / coarse - 0.5) < 0.05


def test_depth_one_gd_tracks_the_exact_exponential(make_cfg):
    """E = ½‖W − Y‖² at depth 1: gradient flow W(t) = Y + e^{−t}(W0 − Y); GD gives
    Y + (1 − η)^k (W0 − Y) exactly, so the error at t is O(η)."""
    errors = []
    for lr in (0.02, 0.01):
        cfg = ("task=completion", "task.size=3", "task.rank=3", "task.observations=9", "model.depth=1",
               "replicas=2", f"optim.lr={lr}")
        dyn, task = lab(make_cfg, *cfg)
        W0, Y = chain(dyn.factors()).clone(), task.values
        steps = round(1.0 / lr)
        dyn.advance(steps)
        W = chain(dyn.factors())
        discrete = Y + (1 - lr) ** steps * (W0 - Y)
        torch.testing.assert_close(W, discrete, rtol=0, atol=1e-13)   # rounding over 100 steps
        errors.append((W - (Y + math.exp(-1.0) * (W0 - Y))).abs().max().item())
    assert errors[0] < 0.02 and abs(errors[1] / errors[0] - 0.5) < 0.02   # first order in η


def test_langevin_stationary_variance_is_one_over_beta(make_cfg):
    """Depth 1, E = ½‖W − Y‖²: dW = −(W − Y)dt + sqrt(2/β)dB has stationary variance 1/β. The
    Euler–Maruyama chain's own stationary variance is 1/(β(1 − η/2)) (an OU recursion): we
    compare with that and check it is within 0.3 % of 1/β."""
    beta, lr, B = 50.0, 0.005, 4096
    dyn, task = lab(make_cfg, "task=completion", "task.size=2", "task.rank=2", "task.observations=4",
                    "model.depth=1", f"replicas={B}", "optim=langevin", f"optim.beta={beta}", f"optim.lr={lr}")
    dyn.advance(round(8.0 / lr))            # burn-in: 8 relaxation times, e^{-16} of the start left
    samples = (chain(dyn.factors()) - task.values).flatten()
    variance = samples.var().item()
    expected = 1 / (beta * (1 - lr / 2))
    standard_error = expected * math.sqrt(2 / (samples.numel() - 1))   # of a Gaussian sample variance
    assert abs(variance - expected) < 4 * standard_error
    assert abs(expected * beta - 1) < 3e-3


def test_langevin_is_reproducible_from_its_seed(make_cfg):
    a = run(make_cfg("optim=langevin", "replicas=4", "run.steps=300", out="a"))
    b = run(make_cfg("optim=langevin", "replicas=4", "run.steps=300", out="b"))
    c = run(make_cfg("optim=langevin", "replicas=4", "run.steps=300", "seed=1", out="c"))
    assert a["final"]["energy"] == b["final"]["energy"] != c["final"]["energy"]


@pytest.mark.parametrize("optim", ["gd", "sgd", "momentum", "adam", "langevin"])
@pytest.mark.parametrize("task", ["seed2x2", "completion", "sensing", "regression"])
def test_every_dynamics_runs_every_task(make_cfg, optim, task):
    summary = run(make_cfg(f"optim={optim}", f"task={task}", "replicas=3", "run.steps=60",
                           "run.log_points=10", "task.size=4", "task.observations=10"))
    assert summary["steps"] == 60 and summary["diverged_count"] == 0
    assert all(math.isfinite(e) for e in summary["final"]["energy"])


def test_weight_decay_shrinks_the_factors(make_cfg):
    plain = run(make_cfg("replicas=4", "run.steps=500", "run.stop_energy=0", out="a"))
    decayed = run(make_cfg("replicas=4", "run.steps=500", "run.stop_energy=0", "optim.weight_decay=0.1", out="b"))
    assert decayed["aggregates"]["product_norm"]["mean"] < plain["aggregates"]["product_norm"]["mean"]


def test_sgd_minibatches_are_unbiased(make_cfg):
    """E over minibatch draws of the minibatch gradient equals the full gradient."""
    cfg = make_cfg("task=completion", "task.size=3", "task.rank=1", "task.observations=6")
    task = build_task(cfg.task, 0)
    W = torch.randn(1, 3, 3)
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    weights = task.minibatch(draws, 2, gen)                    # (draws, 3, 3)
    mean = task.gradient(W.expand(draws, 3, 3), weights).mean(0)
    # each entry averages 20000 draws of a bounded variable: standard error ≈ 1 % of its scale
    torch.testing.assert_close(mean, task.gradient(W)[0], rtol=0, atol=0.05 * task.gradient(W).abs().max().item())


def test_fibre_noise_moves_the_factors_along_the_fibre_and_not_the_product(make_cfg):
    """At a zero-gradient point (W = I for the seed task, E = 0) Langevin with fibre noise is a pure
    random walk on the GL orbit of the factors: the product stays I to rounding while the
    balancedness moves; isotropic noise moves the product by O(sqrt(lr/β)) per step."""
    moved = {}
    for noise in ("fibre", "isotropic"):
        dyn, _ = lab(make_cfg, "model.depth=3", "replicas=8", "optim=langevin", "optim.beta=100",
                     "optim.lr=0.01", f"optim.noise={noise}", factors=[torch.eye(2).expand(8, 2, 2).clone()] * 3)
        dyn.advance(100)
        W, G = chain(dyn.factors()), balancedness_of(dyn.factors())
        moved[noise] = ((W - torch.eye(2)).abs().max().item(), max(g.abs().max().item() for g in G))
    # 100 exact fibre moves of O(0.01) factors: rounding of a few products and matrix exponentials
    assert moved["fibre"][0] < 1e-13 and moved["fibre"][1] > 0.05
    assert moved["isotropic"][0] > 0.05


def test_fibre_noise_needs_a_fibre(make_cfg):
    from dlntorch.config import ConfigError
    with pytest.raises(ConfigError, match=r"^optim.noise='fibre' is not allowed: depth 1 has no fibre"):
        run(make_cfg("optim=langevin", "optim.noise=fibre", "model.depth=1"))


def test_fibre_noise_resumes_bit_identically(make_cfg):
    args = ("model.depth=3", "replicas=4", "optim=langevin", "optim.noise=fibre", "optim.beta=1e3")
    whole, _ = lab(make_cfg, *args)
    whole.advance(300)
    first, _ = lab(make_cfg, *args)
    first.advance(150)
    saved = first.state_dict()
    second, _ = lab(make_cfg, *args)
    second.load_state_dict(saved)
    second.advance(150)
    assert all(torch.equal(a, b) for a, b in zip(whole.factors(), second.factors()))
