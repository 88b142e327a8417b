"""Conservation laws by the Lie-algebra method (Marcotte, Gribonval & Peyré 2023).

For a loss E(W) of the product, every per-sample gradient field is θ ↦ ∂φ(θ)^T Z for some
matrix Z (Z = ∇ℓ_x at the sample's residual), θ the flat vector of all factor entries and φ the
product map. The fields X_ij(θ) = ∂φ(θ)^T E_ij span that functional space. A function h is
conserved by every flow of every loss iff ∇h is orthogonal to the Lie algebra 𝔏 the X_ij generate
(their iterated brackets [X, Y] = DY·X − DX·Y), so the number of independent conservation laws
near a generic θ is D − dim 𝔏(θ), the dimension of the trace {X(θ) : X ∈ 𝔏} being computed at
a random point. Brackets are Jacobian-vector products (torch.func.jvp), nested as deep as needed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..network import chain

Field = Callable[[Tensor], Tensor]


def unflatten(theta: Tensor, widths: Sequence[int]) -> list[Tensor]:
    """The factors [W_1, …, W_N] (each d_p × d_{p−1}) from the flat parameter vector θ."""
    shapes = [(d_out, d_in) for d_in, d_out in zip(widths[:-1], widths[1:])]
    return [piece.reshape(shape) for piece, shape in zip(theta.split([a * b for a, b in shapes]), shapes)]


def parameter_count(widths: Sequence[int]) -> int:
    """D = Σ_p d_p d_{p−1}, the dimension upstairs."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def gradient_fields(widths: Sequence[int]) -> list[Field]:
    """X_ij(θ) = ∇_θ ⟨φ(θ), E_ij⟩, one per entry of the d_N × d_0 product."""
    m, n = widths[-1], widths[0]

    def field(i: int, j: int) -> Field:
        def entry(theta: Tensor) -> Tensor:
            return chain(unflatten(theta, widths))[i, j]
        return torch.func.grad(entry)
    return [field(i, j) for i in range(m) for j in range(n)]


def bracket(X: Field, Y: Field) -> Field:
    """[X, Y](θ) = DY(θ)·X(θ) − DX(θ)·Y(θ)."""
    def commutator(theta: Tensor) -> Tensor:
        return torch.func.jvp(Y, (theta,), (X(theta),))[1] - torch.func.jvp(X, (theta,), (Y(theta),))[1]
    return commutator


class _Span:
    """An orthonormal basis (Gram–Schmidt, twice) of vectors added one at a time."""

    def __init__(self, tol: float):
        self.tol, self.basis = tol, []

    def adds(self, v: Tensor) -> bool:
        """Add v if it leaves the span by more than tol (relative); say whether it did."""
        norm = v.norm()
        if not torch.isfinite(norm) or norm == 0:
            return False
        v = v / norm
        for _ in range(2):
            for q in self.basis:
                v = v - (q @ v) * q
        if v.norm() <= self.tol:
            return False
        self.basis.append(v / v.norm())
        return True


@dataclass
class LieResult:
    dimension: int          # dim of the trace of the generated Lie algebra at the point
    dimensions: list[int]   # that dimension after each bracket level (level 0: the X_ij)
    closed: bool            # no new field at the last level: the algebra is finite and complete
    fields: int             # functionally independent fields kept


def lie_algebra_dimension(widths: Sequence[int], seed: int = 0, points: int = 4, max_level: int = 6,
                          tol: float = 1e-8) -> LieResult:
    """dim 𝔏(θ) at a random Gaussian θ (float64), by levels: level k brackets each X_ij with the
    new fields of level k − 1 (right-nested brackets span the generated algebra). A field is kept
    if its values at `points` random points leave the span of the kept ones (that is functional
    independence, tested at finitely many points); the levels stop when the trace's dimension
    at the first point has not grown for one level, is D, or no new field appeared (closed)."""
    widths = [int(w) for w in widths]
    D = parameter_count(widths)
    gen = torch.Generator().manual_seed(seed)
    thetas = torch.randn(points, D, generator=gen, dtype=torch.float64)
    functions, kept_values = _Span(tol), []

    def keep(field: Field) -> bool:
        values = torch.stack([field(theta) for theta in thetas])      # (points, D)
        if functions.adds(values.flatten()):
            kept_values.append(values[0])
            return True
        return False

    def trace_dimension() -> int:
        if not kept_values:
            return 0
        V = torch.stack(kept_values)
        V = V / V.norm(dim=1, keepdim=True)
        s = torch.linalg.svdvals(V)
        return int((s > 1e-9 * s[0]).sum())

    generators = gradient_fields(widths)
    frontier = [X for X in generators if keep(X)]
    dimensions = [trace_dimension()]
    closed = False
    for _ in range(max_level):
        if dimensions[-1] == D:
            break
        frontier = [Z for X in generators for Y in frontier for Z in [bracket(X, Y)] if keep(Z)]
        dimensions.append(trace_dimension())
        if not frontier:
            closed = True
            break
        if dimensions[-1] == dimensions[-2]:
            break
    return LieResult(dimensions[-1], dimensions, closed, len(kept_values))


def lie_algebra_count(widths: Sequence[int], seed: int = 0, **options) -> int:
    """The number of independent conservation laws, D − dim 𝔏(θ)."""
    return parameter_count(widths) - lie_algebra_dimension(widths, seed, **options).dimension
