"""The classic convex baseline of matrix completion: the minimum nuclear norm matrix that agrees
with the observed entries (Candès & Recht 2009),

    minimise ‖X‖_*   subject to   |X_ij − M_ij| ≤ tol  for every observed (i, j)

(tol = 0: equality). Solved with cvxpy and an open conic solver (SCS or Clarabel), the optional
extra `pip install dlntorch[convex]`; the problem's data (which entries, which values) is plain
numpy so that it can be checked without the extra.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import fail, one_of

SOLVERS = ("SCS", "CLARABEL")


@dataclass(frozen=True)
class Observations:
    """The observed entries of an m x n matrix: rows[k], cols[k] carries values[k]."""
    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def observations(mask: np.ndarray, values: np.ndarray) -> Observations:
    """The entries where `mask` is nonzero and their values, in row-major order."""
    mask, values = np.asarray(mask), np.asarray(values, dtype=float)
    if mask.shape != values.shape or mask.ndim != 2:
        fail("mask", mask.shape, f"it must be a matrix of the values' shape {values.shape}")
    rows, cols = np.nonzero(mask)
    return Observations((int(mask.shape[0]), int(mask.shape[1])), rows, cols, values[rows, cols])


def have_cvxpy() -> bool:
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        return False
    return True


def nuclear_norm_completion(seen: Observations, tol: float = 0.0, solver: str = "SCS") -> np.ndarray:
    """argmin ‖X‖_* over the X within `tol` of every observed value (needs cvxpy)."""
    one_of("solver", solver, SOLVERS)
    if not tol >= 0:
        fail("tol", tol, "it must be a number ≥ 0")
    import cvxpy as cp
    X = cp.Variable(seen.shape)
    gap = X[seen.rows, seen.cols] - seen.values
    constraint = gap == 0 if tol == 0 else cp.abs(gap) <= tol
    problem = cp.Problem(cp.Minimize(cp.normNuc(X)), [constraint])
    problem.solve(solver=solver)
    if X.value is None:
        raise RuntimeError(f"the nuclear-norm completion was not solved ({solver}: {problem.status})")
    return np.asarray(X.value)
