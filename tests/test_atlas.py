"""The atlas: the shared statistics against closed forms, and each instrument's --quick run
(in this process) writing its three files with the schema the docs read and one checkable fact."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dlntorch.atlas import measure
from dlntorch.atlas.common import fit_loglog, fit_slope, standard_error, wilson_interval


def read_table(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_outputs(out, instrument, columns):
    """The three files exist; settings.json records the command, date, versions and every config;
    table.csv has the given columns; the figure is a PNG."""
    settings = json.loads((out / "settings.json").read_text())
    assert settings["instrument"] == instrument and settings["quick"] is True
    assert {"command", "date", "versions", "configs", "settings", "sentences"} <= set(settings)
    assert settings["versions"]["torch"] and settings["sentences"]
    rows = read_table(out / "table.csv")
    assert rows and set(columns) <= set(rows[0])
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return settings, rows


# ------------------------------------------------------------------------ statistics

def test_wilson_interval_closed_forms():
    # 0 of n: [0, z²/(n + z²)]; n/2 of n: symmetric about 1/2 (Wilson 1927's formula by hand)
    z = 1.959963984540054
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high, rel=1e-12) and high == pytest.approx(0.7634, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_wilson_interval_covers_at_its_level():
    """Coverage of the true p over 4000 binomial draws (n = 50, p = 0.1) is 95 % within 3.5
    standard errors of a proportion (√(0.95·0.05/4000) = 0.0034); Wilson's is known to be close."""
    rng = np.random.default_rng(0)
    k = rng.binomial(50, 0.1, size=4000)
    covered = np.mean([lo <= 0.1 <= hi for lo, hi in (wilson_interval(int(x), 50) for x in k)])
    assert abs(covered - 0.95) < 3.5 * math.sqrt(0.95 * 0.05 / 4000) + 0.01   # + discreteness at n = 50


def test_fitted_slopes():
    x = np.arange(6.0)
    exact = fit_slope(x, 3 * x - 1)
    assert exact["slope"] == pytest.approx(3) and exact["intercept"] == pytest.approx(-1)
    assert exact["high"] - exact["low"] == pytest.approx(0, abs=1e-9)
    power = fit_loglog([1, 10, 100], [2, 0.2, 0.02])
    assert power["slope"] == pytest.approx(-1)
    # noisy line: the 95 % interval covers the true slope in about 95 % of 400 draws
    rng = np.random.default_rng(1)
    hits = [(f["low"] <= 2 <= f["high"]) for f in (fit_slope(x, 2 * x + rng.normal(size=6)) for _ in range(400))]
    assert abs(np.mean(hits) - 0.95) < 3.5 * math.sqrt(0.95 * 0.05 / 400)
    assert standard_error([1.0, 2.0, 3.0, np.nan]) == pytest.approx(1 / math.sqrt(3))


# ------------------------------------------------------------------------ instruments

def test_p8_conservation_quick(tmp_path):
    out = tmp_path / "p8"
    book = measure("p8_conservation", out, quick=True)
    settings, rows = check_outputs(book.out, "p8_conservation",
                                   ["widths", "parameters", "jacobian_count", "lie_algebra_count"])
    row = next(r for r in rows if r["widths"] == "2-2-2")
    # G_1 is a symmetric 2x2: three independent entries, and the Lie algebra finds no other law
    assert int(row["parameters"]) == 8 and int(row["jacobian_count"]) == 3 == int(row["lie_algebra_count"])
    drift = read_table(out / "drift.csv")
    assert {r["optimiser"] for r in drift} == {"flow", "gd", "sgd", "momentum", "adam", "langevin"}
    # the exact flow keeps G to its tolerance, gd does not (lr·T·‖∇‖² ≫ 1e-8)
    flow = [float(r["drift_mean"]) for r in drift if r["optimiser"] == "flow"]
    gd = [float(r["drift_mean"]) for r in drift if r["optimiser"] == "gd"]
    assert max(flow) < 1e-8 < min(gd)
    assert len(settings["configs"]) == len(drift) + 2


@pytest.mark.slow
def test_command_line_writes_the_three_files(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "dlntorch.atlas", "p6_singular_varieties", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["command"].endswith(f"p6_singular_varieties --quick --out {out}")
    assert (out / "table.csv").is_file() and (out / "figure.png").is_file()


def test_p6_singular_varieties_quick(tmp_path):
    from dlntorch.atlas.p6_singular_varieties import full_rank_dimension
    book = measure("p6_singular_varieties", tmp_path / "p6", quick=True)
    _, rows = check_outputs(book.out, "p6_singular_varieties",
                            ["widths", "G", "product_rank", "tangent_dim", "fibre_tangent_dim", "singular"])
    for widths in ("2-2-2", "2-3-2"):
        assert (book.out / f"table_{widths}.csv").is_file()
        d = [int(w) for w in widths.split("-")]
        generic = next(r for r in rows if r["widths"] == widths and r["G"] == "nonzero"
                       and int(r["product_rank"]) == min(d))
        # the measured full-rank dimension is the docstring's formula: D − Σ_p c(d_p, d_{p−1} + d_{p+1})
        assert int(generic["tangent_dim"]) == full_rank_dimension(d) == {"2-2-2": 8 - 3, "2-3-2": 12 - 6}[widths]
    # equal widths d = 2, N = 2, G = 0, full rank: the fibre in M_0 is an O(2)-orbit, dimension 1
    balanced = next(r for r in rows if r["widths"] == "2-2-2" and r["G"] == "zero" and r["product_rank"] == "2")
    assert int(balanced["fibre_tangent_dim"]) == 1


def test_full_rank_dimension_formula_against_the_jacobian_count():
    """D − Σ_p c(d_p, d_{p−1} + d_{p+1}) against geometry's independent Jacobian-rank count of the
    G_p entries, including hidden widths wider than their two neighbours together (rank-capped G_p)."""
    from dlntorch.atlas.lie import parameter_count
    from dlntorch.atlas.p6_singular_varieties import full_rank_dimension
    from dlntorch.geometry import conservation_law_count
    for widths in ([2, 2, 2], [1, 3, 1], [1, 4, 1], [1, 5, 2], [2, 5, 1, 4], [3, 2, 3, 3], [1, 3, 2, 1]):
        assert full_rank_dimension(widths) == parameter_count(widths) - conservation_law_count(widths)


def test_p9_rank_jumps_quick(tmp_path):
    book = measure("p9_rank_jumps", tmp_path / "p9", quick=True)
    _, rows = check_outputs(book.out, "p9_rank_jumps", ["task", "depth", "scale", "t_mode1_median",
                                                         "t_mode1_theory", "jumps_up_mean"])
    fits = read_table(book.out / "fits.csv")
    # incremental learning: the larger mode (target 2) is learned before the smaller (target 1)
    assert all(float(r["t_mode1_median"]) < float(r["t_mode2_median"]) for r in rows)
    # N = 3: t_1 ∝ scale^{−1/3} to leading order; two scales and 3 replicas each leave ±0.1 for
    # the next order (the O(1) time from escape to half target) and the replica spread
    fit = next(f for f in fits if f["depth"] == "3" and f["mode"] == "1")
    assert abs(float(fit["fitted"]) - (-1 / 3)) < 0.1 and float(fit["theory"]) == pytest.approx(-1 / 3)


def test_p1_low_rank_quick_depth_one_is_the_closed_form(tmp_path):
    """The depth-1 rank-one fraction of the lab equals the closed-form linear flow's for the same
    initial conditions, drawn again here from the run's own config through the init module."""
    from dlntorch.atlas.p1_low_rank import THRESHOLD, closed_form_depth1_ratio
    from dlntorch.config import as_config, derive_seeds
    from dlntorch.init import initial_factors
    book = measure("p1_low_rank", tmp_path / "p1", quick=True)
    _, rows = check_outputs(book.out, "p1_low_rank", ["optimiser", "depth", "scale_of", "scale", "converged",
                                                       "rank_one", "fraction", "wilson_low", "wilson_high"])
    settings = json.loads((book.out / "settings.json").read_text())
    depth_one = [(r, c) for r, c in zip(rows, settings["configs"]) if r["depth"] == "1"]
    assert len(depth_one) == 2
    for row, cfg in depth_one:
        config = as_config(cfg)
        W0 = initial_factors(config.init, [2, 2], config.replicas, derive_seeds(config)["init"])[0]
        expected = int((closed_form_depth1_ratio(W0.numpy()) < THRESHOLD).sum())
        assert int(row["converged"]) == config.replicas and int(row["rank_one"]) == expected
        low, high = float(row["wilson_low"]), float(row["wilson_high"])
        assert low <= float(row["fraction"]) <= high
    # at the large scale some depth-1 limits [[1, b], [c, 1]] have bc ≈ 1: the check is not 0 == 0 only
    assert any(int(r["rank_one"]) > 0 for r, _ in depth_one)


def test_p2_full_rank_quick(tmp_path):
    book = measure("p2_full_rank", tmp_path / "p2", quick=True)
    _, rows = check_outputs(book.out, "p2_full_rank", ["slice", "depth", "extent", "fraction", "se"])
    points = read_table(book.out / "points.csv")
    # the diagonal plane: the balanced flow keeps the sign of det W (the rank cannot drop in finite
    # time), so exactly the grid points with a·b > 0 (tilt ε = 1e-3 does not flip a sign on this
    # grid, whose |a|, |b| ≥ 1/7) reach the full-rank minimiser I, and those with a·b < 0 rank one
    diagonal = [p for p in points if p["slice"] == "diagonal"]
    assert diagonal and all((p["full_rank"] == "True") == (float(p["a"]) * float(p["b"]) > 0) for p in diagonal)
    assert all(float(r["fraction"]) == 0.5 for r in rows if r["slice"] == "diagonal")


@pytest.mark.slow
def test_p7_balance_quick(tmp_path):
    """Every start × model × step size is a row; the h → 0 rows' rates are the weighted linear fit's
    intercept through the three per-h rates (recomputed here with numpy's polyfit as reference);
    from M_0 (G = 0) no model can lower ‖G‖², so its initial rates are ≥ 0 beyond their error."""
    book = measure("p7_balance", tmp_path / "p7", quick=True)
    _, rows = check_outputs(book.out, "p7_balance", ["start", "model", "h", "rate_G2", "rate_G2_se", "G2_T", "gap_T"])
    from dlntorch.atlas.p7_balance import MODELS, STARTS
    assert len(rows) == len(STARTS) * len(MODELS) * 4
    for start in STARTS:
        for model in MODELS:
            mine = [r for r in rows if r["start"] == start and r["model"] == model]
            steps = [r for r in mine if float(r["h"]) > 0]
            h = np.array([float(r["h"]) for r in steps])
            y = np.array([float(r["rate_G2"]) for r in steps])
            w = 1 / np.array([float(r["rate_G2_se"]) for r in steps])     # polyfit weights 1/σ
            intercept = np.polyfit(h, y, 1, w=w)[1]
            limit = next(r for r in mine if float(r["h"]) == 0)
            assert float(limit["rate_G2"]) == pytest.approx(intercept, rel=1e-9, abs=1e-12)
            if start == "M_0":
                assert float(steps[0]["G2_0"]) < 1e-20
                assert all(float(r["rate_G2"]) + 4 * float(r["rate_G2_se"]) > 0 for r in steps)


@pytest.mark.slow
def test_p3_free_energy_quick(tmp_path):
    """The flow's argmin F_β for the spectral energy equals the direct minimisation over s (to the
    flow's convergence at τ = 20: its rate is O(1) in τ), and the χ² row counts add up."""
    book = measure("p3_free_energy", tmp_path / "p3", quick=True)
    settings, rows = check_outputs(book.out, "p3_free_energy", ["task", "N", "inverse_beta", "s1", "s2", "det"])
    spectral = [r for r in rows if r["task"] == "spectral"]
    assert spectral and all(float(r["s_error"]) < 1e-5 for r in spectral)
    assert all(abs(float(r["s1"]) * float(r["s2"]) - float(r["det"])) < 1e-8 for r in spectral)   # det > 0 start
    bins = read_table(book.out / "stationary.csv")
    assert sum(int(b["observed"]) for b in bins) == settings["settings"]["scalar"]["replicas"]
    replicas = settings["settings"]["scalar"]["replicas"]
    assert sum(float(b["expected"]) for b in bins) == pytest.approx(replicas, rel=1e-6)
    # (b′): rle and balanced on 2x2 against the RLE's law (the law itself is tested in tests/test_rle.py)
    for model in ("rle", "balanced"):
        assert all(0 < settings["findings"][f"{model}_p_sigma{k}"] <= 1 for k in (1, 2))


@pytest.mark.slow
def test_p5_low_rank_noise_quick(tmp_path):
    """Each row's hit count is the number of replicas whose running minimum of σ_min crossed the
    threshold, recomputed here from the run's own trajectory, and lies inside its Wilson interval.
    The RLE models (rle, balanced) at h and h/4 reflect at det W = 0, so det W never changes sign,
    and they count a hit at every step whose proposal fell below the threshold, so each replica
    whose logged σ_min did is among those with a singular hit."""
    from dlntorch.analysis import load_run
    from dlntorch.atlas.p5_low_rank_noise import COUNTING, MODELS, REFINE, THRESHOLD
    book = measure("p5_low_rank_noise", tmp_path / "p5", quick=True)
    settings, rows = check_outputs(book.out, "p5_low_rank_noise", ["model", "lr", "N", "beta", "start_sigma_min",
                                                                   "hit", "fraction", "wilson_low", "wilson_high",
                                                                   "crossed_hit", "step_hit", "step_wilson_low",
                                                                   "step_wilson_high", "hits_per_replica"])
    assert len(rows) == len(settings["configs"]) == len(MODELS) + len(COUNTING)     # one start, N and β
    h = settings["settings"]["lr"]
    for row, cfg in zip(rows, settings["configs"]):
        trajectory = load_run(cfg["run"]["out_dir"]).trajectory
        sigma = trajectory["sigma_min"]
        low = np.nanmin(sigma, axis=0) < THRESHOLD
        assert int(row["hit"]) == int(low.sum())
        # 1e-12: the Wilson formula's rounding at 0 successes (centre − half ≈ 3e-18, not 0)
        assert float(row["wilson_low"]) - 1e-12 <= float(row["fraction"]) <= float(row["wilson_high"])
        if row["model"] in COUNTING:
            hits = trajectory["singular_hits"][-1]
            assert int(row["step_hit"]) == int((hits > 0).sum()) and np.all(hits[low] > 0)
            assert int(row["crossed_hit"]) == 0 and np.all(trajectory["det"] > 0)      # det W0 = ε > 0
            assert float(row["step_wilson_low"]) - 1e-12 <= int(row["step_hit"]) / int(row["replicas"]) \
                <= float(row["step_wilson_high"])
    assert {float(r["lr"]) for r in rows if r["model"] in COUNTING} == {h, h / REFINE}
    assert any(int(r["hit"]) > 0 for r in rows)      # at β = 5 the noise reaches the singular set
    assert any(int(r["crossed_hit"]) > 0 for r in rows if r["model"] == "isotropic")   # and crosses it


def test_p4_infinite_depth_quick(tmp_path):
    book = measure("p4_infinite_depth", tmp_path / "p4", quick=True)
    _, rows = check_outputs(book.out, "p4_infinite_depth", ["task", "depth", "up_down_max", "trajectory_distance_mean",
                                                             "limit_distance_mean", "fibre_dimension", "entropy_mean"])
    # a balanced upstairs flow's product is the g^N flow (Riemannian submersion): the two solvers
    # (dopri5, rtol 1e-10 on O(1) states, over τ ≤ 30) agree to far better than 1e-7
    assert all(float(r["up_down_max"]) < 1e-7 for r in rows)
    # the limits are full rank, so the fibre is a GL(2)^{N−1} orbit, (N − 1)·4-dimensional
    assert all(int(r["fibre_dimension"]) == 4 * (int(r["depth"]) - 1) for r in rows)
    # ‖W_N − W_∞‖ = O(1/N): the fitted rate over N = 5, 10, 20 is −1 to within 0.1 (the next
    # order, O(1/N²), bends it by a few hundredths there) and its interval covers −1
    fit = next(f for f in read_table(book.out / "fits.csv") if f["distance"] == "trajectory")
    assert abs(float(fit["slope"]) + 1) < 0.1 and float(fit["low"]) <= -1 <= float(fit["high"])
