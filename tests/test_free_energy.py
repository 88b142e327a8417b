"""The free-energy flow dW/dt = −A_N(∇E − ∇S_N/β) (optim=free_energy): the entropy's gradient
against closed forms and autograd, its fixed points, its minimiser against a direct minimisation
of F_β over the singular values, and its wiring into the lab."""
from __future__ import annotations

import math

import pytest
import torch

from dlntorch.dynamics.free_energy import (
    entropy_gradient,
    entropy_singular_gradient,
    free_energy_gradient,
    free_energy_velocity,
    integrate_free_energy,
)
from dlntorch.errors import ConfigError
from dlntorch.geometry import entropy, f_inf, f_N, haar_orthogonal, metric_operator

torch.set_default_dtype(torch.float64)


def d1_log_f(x: float, y: float, N) -> float:
    """∂_x log f_N(x, y) by hand from f_N = (x² − y²)/(x^{2/N} − y^{2/N}), f_∞ = (x² − y²)/(2 log(x/y))."""
    if N == math.inf:
        return 2 * x / (x * x - y * y) - 1 / (x * math.log(x / y))
    a = 2 / N
    return 2 * x / (x * x - y * y) - a * x ** (a - 1) / (x ** a - y ** a)


@pytest.mark.parametrize("N", [2, 3, 5, math.inf])
def test_singular_gradient_against_closed_form(N):
    s = torch.tensor([[2.5, 1.1, 0.3]])
    got = entropy_singular_gradient(s, N)[0]
    for i in range(3):
        want = 0.5 * sum(d1_log_f(float(s[0, i]), float(s[0, j]), N) for j in range(3) if j != i)
        assert float(got[i]) == pytest.approx(want, rel=1e-12)   # no cancellation at separated s


def test_singular_gradient_at_repeated_values():
    """At s_i = s_j the pair's share is the diagonal limit ∂_1 log f_N(x, x) = (1 − 1/N)/x (half of
    d/dx log f_N(x, x) = d/dx log(N x^{2−2/N}), by symmetry); the closed form above is 0/0 there."""
    s = torch.tensor([[1.7, 1.7]])
    got = entropy_singular_gradient(s, 4)[0]
    assert torch.allclose(got, torch.full((2,), 0.5 * (1 - 1 / 4) / 1.7), rtol=1e-12, atol=0)


def test_entropy_gradient_is_autograd_of_the_entropy():
    """At a generic W (distinct singular values, where autograd through the SVD is well posed)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, 3, generator=gen)
    for N in (2, 3, 6):
        x = W.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(entropy(x, N).sum(), x)
        assert torch.allclose(entropy_gradient(W, N), want, rtol=0, atol=1e-11)   # rounding of two SVDs


def test_one_svd_velocity_is_the_metric_applied_to_the_gradient():
    """free_energy_velocity (one SVD, in W's frame) against metric_operator of ∇F_β (its own SVD)."""
    gen = torch.Generator().manual_seed(2)
    W, G = torch.randn(4, 3, 3, generator=gen), torch.randn(4, 3, 3, generator=gen)
    for N in (2, 5, math.inf):
        want = -metric_operator(W, free_energy_gradient(W, G, 3.0, N), N)
        assert torch.allclose(free_energy_velocity(W, G, 3.0, N), want, rtol=0, atol=1e-12)


def test_depth_one_has_no_entropic_force():
    W = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(entropy_gradient(W, 1), torch.zeros_like(W))


def spectral_setup(seed: int, t=(2.0, 0.7)):
    """E = ½‖W − Y‖², Y = U diag(t) V^T: at fixed singular values s, E is least (½Σ(s_i − t_i)², von
    Neumann's trace inequality) where W shares Y's singular vectors, and S_N depends on s alone, so
    argmin F_β = U diag(s*) V^T with s* = argmin_s ½Σ(s_i − t_i)² − S_N(s)/β. The start is Y plus a
    small perturbation (the same det sign as Y: the flow stays in Y's component of full rank)."""
    gen = torch.Generator().manual_seed(seed)
    U, V = haar_orthogonal(1, 2, generator=gen)[0], haar_orthogonal(1, 2, generator=gen)[0]
    Y = U @ torch.diag(torch.tensor(t)) @ V.T
    W0 = (Y + 0.1 * torch.randn(2, 2, generator=gen)).unsqueeze(0)
    return Y, W0, torch.tensor(t)


def flow_end(W0, Y, beta, N, T=40.0):
    """W at τ = N t = T of the free-energy flow (the clock in which its rates are O(1) at every N)."""
    path, _ = integrate_free_energy(W0, lambda W: W - Y, beta, [0.0, T], N, time_scale="per_depth",
                                    rtol=1e-11, atol=1e-13)
    return path[-1], lambda W: free_energy_gradient(W, W - Y, beta, N)


def minimise_over_singular_values(t: torch.Tensor, beta: float, N) -> torch.Tensor:
    """s* by LBFGS over log s (keeps s > 0), float64, an independent 2-D minimisation."""
    pair = f_inf if N == math.inf else (lambda x, y: f_N(x, y, N))
    z = t.log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=400, tolerance_grad=1e-15, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        s = z.exp()
        F = 0.5 * (s - t).square().sum() - 0.5 * torch.log(pair(s[0], s[1])) / beta
        F.backward()
        return F

    opt.step(closure)
    return z.detach().exp()


@pytest.mark.parametrize("N", [2, 3, 8, math.inf])
def test_fixed_point_and_minimiser(N):
    Y, W0, t = spectral_setup(seed=N if N != math.inf else 99)
    beta = 2.0
    W, grad = flow_end(W0, Y, beta, N)
    # at the flow's end ∇F_β vanishes (A_N is invertible at full rank, so a fixed point of the flow
    # is a critical point of F_β); the contraction rate is O(1), so T = 60 leaves e^{−60}
    assert float(grad(W).norm()) < 1e-10
    s_flow = torch.linalg.svdvals(W[0])
    s_star = minimise_over_singular_values(t, beta, N)
    assert torch.allclose(s_flow, s_star, rtol=0, atol=1e-8)   # LBFGS's own tolerance on a smooth 2-D F
    # the entropy pushes the singular values apart from t: not the energy's minimiser
    assert float((s_flow - t).abs().max()) > 1e-2


def lab_config(**optim):
    return {"task": {"name": "completion", "size": 2, "observations": 4, "spectrum": [2.0, 0.5]},
            "model": {"depth": 3}, "init": {"name": "gaussian", "scale": 1.0, "scale_of": "product"},
            "optim": {"name": "free_energy", "beta": 5.0, "lr": 0.25, **optim},
            "run": {"steps": 40, "stop_energy": 0.0, "log_points": 10, "progress": False},
            "replicas": 3, "seed": 0, "threads": 1, "device": "cpu"}


def test_lab_run_descends_the_free_energy(tmp_path):
    from dlntorch.analysis import load_run
    from dlntorch.train import run
    cfg = lab_config()
    cfg["run"]["out_dir"] = str(tmp_path / "run")
    trajectory = load_run(run(cfg)["out_dir"]).trajectory
    F = trajectory["free_energy"]                       # (T, B): E − S_3/β of the product
    assert bool((F[1:] <= F[:-1] + 1e-10).all())        # a gradient flow of F_β (solver tolerance)
    assert float((F[0] - F[-1]).min()) > 1e-3


@pytest.mark.parametrize("optim, key", [({"beta": 0.0}, "optim.beta"), ({"beta": -1.0}, "optim.beta"),
                                        ({"method": "euler"}, "optim.method"),
                                        ({"depth": "inf", "time_scale": "raw"}, "optim.time_scale")])
def test_bad_values_are_refused(optim, key):
    from dlntorch.config import as_config, validate
    with pytest.raises(ConfigError, match=key):
        validate(as_config(lab_config(**optim)))


def test_non_square_is_refused():
    from dlntorch.config import as_config, validate
    cfg = lab_config()
    cfg["task"] = {"name": "completion", "shape": [2, 3], "observations": 4, "rank": 1}
    with pytest.raises(ConfigError, match="square"):
        validate(as_config(cfg))


def test_composes_from_its_yaml_and_refuses_foreign_keys(make_cfg):
    """optim=free_energy from the command line: its yaml's keys with their defaults, typed by its
    own schema (a key of another optimiser is refused at composition), and a run from it."""
    from dlntorch.train import run
    cfg = make_cfg("optim=free_energy", "optim.beta=3", "task=completion", "task.size=2", "task.observations=4",
                   "task.spectrum=[2,0.5]", "replicas=2", "run.steps=4", "run.stop_energy=0")
    assert cfg.optim.name == "free_energy" and cfg.optim.beta == 3.0 and cfg.optim.method == "dopri5"
    summary = run(cfg)
    assert summary["status"] == "completed" and all(math.isfinite(x) for x in summary["final"]["free_energy"])
    with pytest.raises(Exception, match="noise"):
        make_cfg("optim=free_energy", "optim.noise=isotropic")
