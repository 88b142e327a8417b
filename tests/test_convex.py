"""The minimum nuclear-norm completion baseline (dlntorch.convex). Its data (which entries, which
values) is checked without cvxpy; the solve itself needs the optional extra dlntorch[convex], so
those tests skip without it (they are not the claim's test: the claim is arora2019's)."""
from __future__ import annotations

import numpy as np
import pytest

from dlntorch.config import ConfigError
from dlntorch.convex import nuclear_norm_completion, observations


def test_the_observations_are_the_masked_entries_in_row_major_order():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 6))
    mask = rng.random((4, 6)) < 0.4
    seen = observations(mask, values)
    listed = [(i, j, values[i, j]) for i in range(4) for j in range(6) if mask[i, j]]
    assert seen.shape == (4, 6)
    assert list(zip(seen.rows.tolist(), seen.cols.tolist(), seen.values.tolist())) == listed


def test_a_mask_of_another_shape_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match=r"mask=.*it must be a matrix of the values' shape \(3, 3\)"):
        observations(np.ones((2, 3)), np.zeros((3, 3)))


def test_an_unknown_solver_is_refused_before_any_compute():
    seen = observations(np.eye(2), np.eye(2))
    with pytest.raises(ConfigError, match="solver='MOSEK' is not allowed: choose one of SCS, CLARABEL"):
        nuclear_norm_completion(seen, solver="MOSEK")


def test_razins_two_by_two_has_its_closed_form_minimum():
    """Observing X12 = X21 = 1, X22 = 0: X = [[x, 1], [1, 0]] is symmetric with eigenvalues of
    product −1, so ‖X‖_* = |λ1| + |λ2| = √(x² + 4), least at x = 0 (value 2). Clarabel is an
    interior-point solver (accuracy ~1e-8); allow 1e-6."""
    pytest.importorskip("cvxpy")
    mask = np.array([[0, 1], [1, 1]])
    values = np.array([[0.0, 1.0], [1.0, 0.0]])
    X = nuclear_norm_completion(observations(mask, values), solver="CLARABEL")
    assert abs(X[0, 0]) < 1e-6
    assert np.linalg.svd(X, compute_uv=False).sum() == pytest.approx(2.0, abs=1e-6)


def test_the_solution_fits_the_observations_within_tol_and_is_no_larger_than_the_truth():
    """A rank-2 truth is feasible, so the minimum's nuclear norm is at most the truth's; every
    observed entry within tol (+ the solver's 1e-6 accuracy)."""
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(1)
    truth = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 8))
    mask = rng.random((8, 8)) < 0.6
    seen = observations(mask, truth)
    X = nuclear_norm_completion(seen, tol=1e-3, solver="CLARABEL")
    assert np.abs(X[seen.rows, seen.cols] - seen.values).max() <= 1e-3 + 1e-6
    nuclear = lambda A: np.linalg.svd(A, compute_uv=False).sum()
    assert nuclear(X) <= nuclear(truth) + 1e-6
