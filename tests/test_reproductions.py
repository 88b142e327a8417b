"""The reproductions (issue 14): the conventions they need (listed entries, a Frobenius-normalised
truth, per-fan-in init, the unobserved part's norm), the closed forms they compare with, and each
instrument's --quick run asserting one claim at small size."""
from __future__ import annotations

import math

import pytest
import torch
from test_atlas import check_outputs

from dlntorch.atlas import measure
from dlntorch.atlas.saxe2014 import half_time
from dlntorch.config import ConfigError
from dlntorch.tasks import build_task
from dlntorch.train import run

# ------------------------------------------------------------------ conventions


def test_listed_entries_are_the_completion_of_those_entries(make_cfg):
    cfg = make_cfg("task=completion", "task.size=2", "task.loss=mean", "task.entries=[[0,1,1.0],[1,0,1.0],[1,1,0.0]]")
    task = build_task(cfg.task, 0)
    W = torch.randn(5, 2, 2, dtype=torch.float64)
    expected = ((W[:, 0, 1] - 1) ** 2 + (W[:, 1, 0] - 1) ** 2 + W[:, 1, 1] ** 2) / 3   # mean over the observed
    torch.testing.assert_close(task.energy(W), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(task.observables(W)["hidden_norm"], W[:, 0, 0].abs(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("entries, message", [
    ("[[0,1,1.0],[0,1,2.0]]", "at most once"),
    ("[[0,2,1.0]]", r"0 ≤ j < 2.*\[0, 2, 1.0\]"),
    ("[[0,1]]", "it must list"),
])
def test_bad_listed_entries_are_refused_in_one_sentence(make_cfg, entries, message):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg("task=completion", "task.size=2", f"task.entries={entries}"))


def test_a_frobenius_normalised_truth_has_the_requested_norm_and_rank(make_cfg):
    cfg = make_cfg("task=completion", "task.size=12", "task.rank=3", "task.normalise=frobenius", "task.scale=12",
                   "task.observations=50")
    truth = build_task(cfg.task, 0).truth
    assert torch.linalg.matrix_norm(truth).item() == pytest.approx(12, rel=1e-14)
    assert torch.linalg.matrix_rank(truth).item() == 3


def test_fan_in_init_draws_every_factor_with_std_init_root_over_sqrt_width():
    """Arora et al.'s convention: std init^{1/N}/√d_{p−1} for every p. 4096·d entries per factor:
    the sample variance's relative standard error is √(2/n) < 0.5 %; allow 3 %."""
    from omegaconf import OmegaConf

    from dlntorch.init import initial_factors
    cfg = OmegaConf.create({"name": "gaussian", "scale": 1e-3, "scale_of": "fan_in", "det_sign": "any"})
    widths = [8, 16, 16, 8]
    for p, f in enumerate(initial_factors(cfg, widths, 256, seed=0)):
        std = 1e-3 ** (1 / 3) / math.sqrt(widths[p])
        assert f.var().item() == pytest.approx(std ** 2, rel=0.03)


def test_fan_in_is_gaussian_only(make_cfg):
    with pytest.raises(ConfigError, match="only init=gaussian draws per fan-in"):
        run(make_cfg("init=balanced", "init.scale_of=fan_in"))


def test_the_half_time_quadrature_against_mpmath():
    """t_½ = ∫_{u0}^{s/2} du / (N u^{2−2/N}(s − u)): Simpson in ln u against mpmath's quadrature
    (tanh-sinh to 15 digits) and, at N = 2, against the logistic's closed form."""
    mpmath = pytest.importorskip("mpmath")
    for depth, s, u0 in ((3, 3.0, 1e-3), (4, 1.0, 1e-3), (5, 2.0, 1e-2)):
        exact = mpmath.quad(lambda u, N=depth, s=s: 1 / (N * u ** (2 - mpmath.mpf(2) / N) * (s - u)), [u0, 0.01, s / 2])
        assert half_time(s, u0, depth) == pytest.approx(float(exact), rel=1e-9)
    exact = mpmath.quad(lambda u: 1 / (2 * u * (3 - u)), [1e-3, 1.5])
    assert half_time(3.0, 1e-3, 2) == pytest.approx(float(exact), rel=1e-12)


def test_the_authors_rmsprop_step_is_the_lab_group_rmsprop_with_lr_and_eps_over_root_p():
    """Arora et al.'s shared RMSProp divides by √(Σ_p ‖g_p‖²) + eps (a sum, not a mean, over the
    parameters): from v = 0 its first step, without the bias correction, is
    −lr g / (√((1 − α) Σ‖g‖²) + eps). The lab's group_rmsprop with `authors_rmsprop` must make
    exactly that step (float64: agreement to rounding)."""
    from dlntorch.atlas.arora2019 import AUTHORS_EPS, AUTHORS_LR, authors_rmsprop
    from dlntorch.optim import GroupRMSprop
    depth, n = 3, 5
    torch.manual_seed(0)
    factors = [torch.randn(2, n, n, dtype=torch.float64) for _ in range(depth)]
    grads = [1e-3 * torch.randn_like(f) for f in factors]      # small: eps matters in the step
    settings = authors_rmsprop(depth, n)
    params = [f.clone().requires_grad_(False) for f in factors]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    GroupRMSprop(params, lr=settings["lr"], alpha=settings["alpha"], eps=settings["eps"]).step()
    total = sum(g.pow(2).sum(dim=(1, 2)) for g in grads)       # Σ_p ‖g_p‖², per replica
    scale = ((1 - settings["alpha"]) * total).sqrt() + AUTHORS_EPS
    for p, f, g in zip(params, factors, grads):
        torch.testing.assert_close(p, f - AUTHORS_LR * g / scale.view(-1, 1, 1), rtol=1e-13, atol=0)


# ------------------------------------------------------------------ the instruments, --quick


@pytest.mark.slow
def test_saxe2014_first_mode_is_within_two_percent_of_the_closed_form(tmp_path):
    measure("saxe2014", out=tmp_path, quick=True)
    _, rows = check_outputs(tmp_path, "saxe2014", ["depth", "dynamics", "mode", "t_half_measured", "t_half_theory"])
    first = [r for r in rows if r["mode"] == "1"]
    assert {r["dynamics"] for r in first} == {"gd", "flow"} and len(first) == 4
    for r in first:
        assert abs(float(r["relative_error"])) < 0.02, r


@pytest.mark.slow
def test_razin2020_norm_grows_while_rank_falls_with_det_kept_positive(tmp_path):
    measure("razin2020", out=tmp_path, quick=True)
    _, rows = check_outputs(tmp_path, "razin2020", ["depth", "dtype", "det_kept_positive"])
    (row,) = rows
    assert int(row["det_kept_positive"]) == int(row["replicas"])   # depth 3, float64: no crossing
    # the loss is small but cannot be 0 (det W = −1 there): |W11| large, rank one to 1e-4
    assert float(row["final_abs_W11_median_kept"]) > 5 and float(row["final_effective_rank_median_kept"]) < 1 + 1e-4


@pytest.mark.slow
def test_shin_yun2025_a_diagonal_start_stays_diagonal_and_ends_at_full_rank(tmp_path):
    measure("shin_yun2025", out=tmp_path, quick=True)
    _, rows = check_outputs(tmp_path, "shin_yun2025", ["depth", "near_rank_one", "diagonal_max_offdiagonal"])
    for r in rows:
        assert float(r["diagonal_max_offdiagonal"]) <= 1e-12
        assert float(r["diagonal_final_effective_rank_min"]) > 2 - 1e-9
    # depth 2 is uncoupled: the order in which W11 and W22 are observed does not change the solution
    depth2 = next(r for r in rows if r["depth"] == "2")
    assert float(depth2["subset_then_all_hidden_norm_median"]) == pytest.approx(
        float(depth2["all_from_start_hidden_norm_median"]), rel=1e-9)


@pytest.mark.slow
def test_kleinman2024_depth_one_has_no_critical_period(tmp_path):
    """Depth 1: GD never moves an unobserved entry, so the final test error is the same for every
    T_switch (to rounding); the deeper networks are recorded beside it."""
    measure("kleinman2024", out=tmp_path, quick=True)
    _, rows = check_outputs(tmp_path, "kleinman2024", ["depth", "T_switch", "test_error_mean"])
    shallow = [float(r["test_error_mean"]) for r in rows if r["depth"] == "1"]
    assert max(shallow) - min(shallow) < 1e-12
    assert all(float(r["train_energy_max"]) < 1e-5 for r in rows)


@pytest.mark.slow
def test_arora2019_depth_three_and_four_recover_where_depth_two_does_not(tmp_path):
    """20x20 rank 2 from 160 entries, GD and the authors' shared RMSProp: measured 0.46 at N = 2,
    < 0.01 at N = 3, 4 for both (seeded)."""
    measure("arora2019", out=tmp_path, quick=True)
    _, rows = check_outputs(tmp_path, "arora2019", ["optimiser", "depth", "test_error_mean", "effective_rank_mean"])
    for optimiser in ("gd", "group_rmsprop"):
        mine = [r for r in rows if r["optimiser"] == optimiser]
        error = {r["depth"]: float(r["test_error_mean"]) for r in mine}
        assert error["3"] < 0.05 and error["4"] < 0.05 < 0.2 < error["2"], optimiser
        assert all(r["stopped_by"] == "stop_energy" for r in mine)
