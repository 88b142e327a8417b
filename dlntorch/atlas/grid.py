"""Initial end-to-end matrices on 2-D slices of the 2x2 matrices, for phase portraits (problem 2).

A slice is W0(a, b) = a·P + b·Q (+ ε·R) over a square grid of (a, b) ∈ [−extent, extent]²; the
products go to a .pt file that init=file factors on their balanced fibres (one replica per grid
point). This stands in for an `init=grid` initial condition, which still needs wiring into
dlntorch/init.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SLICES = ("diagonal", "symmetric", "random")
DIAGONAL_NOISE = 1e-3     # ε: the diagonal plane is invariant, so a small generic tilt leaves it


def slice_directions(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, Q, ε·R) of a slice: diagonal diag(a, b) + ε·R (R Gaussian); symmetric [[a, b], [b, a]];
    random: a plane spanned by two orthonormal (Frobenius) Gaussian directions."""
    rng = np.random.default_rng(seed)
    zero = np.zeros((2, 2))
    if name == "diagonal":
        return np.diag([1.0, 0.0]), np.diag([0.0, 1.0]), DIAGONAL_NOISE * rng.standard_normal((2, 2))
    if name == "symmetric":
        return np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]]), zero
    if name == "random":
        basis, _ = np.linalg.qr(rng.standard_normal((4, 2)))
        return basis[:, 0].reshape(2, 2), basis[:, 1].reshape(2, 2), zero
    raise ValueError(f"slice={name!r} is not allowed: choose one of {', '.join(SLICES)}.")


def grid_products(name: str, points: int, extent: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, W0): the grid's coordinates (points², each) and products (points², 2, 2), a fastest."""
    P, Q, tilt = slice_directions(name, seed)
    axis = np.linspace(-extent, extent, points)
    b, a = np.meshgrid(axis, axis, indexing="ij")
    a, b = a.ravel(), b.ravel()
    return a, b, a[:, None, None] * P + b[:, None, None] * Q + tilt


def write_grid(path: str | Path, name: str, points: int, extent: float, seed: int = 0):
    """Write the slice's products as {'product': (points², 2, 2)} for init=file; return (a, b)."""
    a, b, W0 = grid_products(name, points, extent, seed)
    torch.save({"product": torch.as_tensor(W0, dtype=torch.float64)}, path)
    return a, b
