"""The fibre φ⁻¹(W) upstairs, as the noise models of problems 3, 5 and 7 need it.

Factors 𝐖 = (W_1, …, W_N) with the Frobenius metric. The group GL(d_1) × ⋯ × GL(d_{N−1}) acts by
W_p ↦ g_p W_p g_{p−1}^{-1} (g_0 = g_N = I) and keeps the product; at full rank its orbit is the
fibre. Its infinitesimal action is the tangent map

    τ_𝐖(A) = (A_p W_p − W_p A_{p−1})_p,   A = (A_1, …, A_{N−1}), A_p ∈ gl(d_p), A_0 = A_N = 0,

whose image T_𝐖 is the tangent space of the fibre, and whose adjoint for the Frobenius inner
products is τ*(η)_p = η_p W_p^T − W_{p+1}^T η_{p+1} (p = 1 … N−1).

`fibre_frame` builds τ as a matrix (B, D, K), D = Σ d_p d_{p−1} factor entries, K = Σ d_p² generator
entries, and factors it by one batched SVD. The orthogonal projection P_𝐖 onto T_𝐖 and the
minimum-norm generator A with τ(A) = P_𝐖 ξ both come from it. The noise models call
`minimum_norm_generator` instead, which gets the same A from a batched Cholesky solve of the normal
equations wherever τ is injective and well conditioned, without forming τ (τ^T τ in closed form,
`tangent_gram`; for small generators in a batch-last layout: ~15x faster than the SVD at 2x2,
depth 3, B = 4096) and from the SVD elsewhere. The rule where A ↦ τ(A) is not
injective (hidden layers wider than their neighbours, low rank): singular values of τ below
`rtol` × the largest count as zero, so P_𝐖 projects onto the numerical range of τ and A is the
least-squares solution of minimum norm (the pseudo-inverse).

Indexing: Python lists are 0-based, so `factors[p]` is W_{p+1} and `generators[q]` is A_{q+1},
acting on the left of factors[q] and on the right of factors[q + 1].
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .geometry import fibre_move
from .tiny import planes_mm, planes_T, to_planes

RTOL = 1e-10   # relative cut on τ's singular values: float64 rounding of τ is ~1e-16 · its size


def tangent(factors: Sequence[Tensor], generators: Sequence[Tensor], layout: Layout | None = None) -> list[Tensor]:
    """τ_𝐖(A) = (A_p W_p − W_p A_{p−1})_p with A_0 = A_N = 0 (in `layout`: batch-first by default)."""
    mm = torch.matmul if layout is None else layout.mm
    N = len(factors)
    out = []
    for p, W in enumerate(factors):
        terms = ([mm(generators[p], W)] if p < N - 1 else []) + ([-mm(W, generators[p - 1])] if p > 0 else [])
        out.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(W))
    return out


def tangent_adjoint(factors: Sequence[Tensor], eta: Sequence[Tensor], layout: Layout | None = None) -> list[Tensor]:
    """τ*_𝐖(η)_q = η_q W_q^T − W_{q+1}^T η_{q+1}, q = 1 … N−1 (the Frobenius adjoint of τ)."""
    mm, T = (torch.matmul, lambda x: x.mT) if layout is None else (layout.mm, layout.T)
    return [mm(eta[q], T(factors[q])) - mm(T(factors[q + 1]), eta[q + 1]) for q in range(len(factors) - 1)]


def flatten(parts: Sequence[Tensor]) -> Tensor:
    """(B, Σ sizes): the parts' entries side by side, in order."""
    return torch.cat([x.flatten(1) for x in parts], dim=1)


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    sizes = [x[0].numel() for x in like]
    return [piece.reshape(x.shape) for piece, x in zip(flat.split(sizes, dim=1), like)]


def tangent_matrix(factors: Sequence[Tensor]) -> Tensor:
    """τ_𝐖 as a matrix (B, D, K): column (q, i, j) is τ(E_ij in A_q), flattened like `flatten`.

    E_ij in A_q (acting on factors[q] from the left and on factors[q+1] from the right) gives
    (E_ij W)[a, b] = δ_ai W[j, b] in factors[q] and −(W' E_ij)[a, b] = −W'[a, i] δ_jb in factors[q+1]."""
    N = len(factors)
    B = factors[0].shape[0]
    like = dict(dtype=factors[0].dtype, device=factors[0].device)
    columns = []
    for q in range(N - 1):
        d = factors[q].shape[-2]
        eye = torch.eye(d, **like)
        blocks = [torch.zeros(B, *f.shape[1:], d, d, **like) for f in factors]
        blocks[q] = torch.einsum("ai,bjc->bacij", eye, factors[q])      # (B, d, d_{q-1}, d, d)
        rows_next, cols_next = factors[q + 1].shape[-2:]
        blocks[q + 1] = -torch.einsum("bai,jc->bacij", factors[q + 1], torch.eye(cols_next, **like))
        columns.append(torch.cat([blk.reshape(B, -1, d * d) for blk in blocks], dim=1))
    return torch.cat(columns, dim=2)


@dataclass
class FibreFrame:
    """τ_𝐖 = U diag(s) V^T restricted to its numerical range (rank r per replica, masked)."""
    U: Tensor        # (B, D, K) left singular vectors; columns past the rank are masked out
    s: Tensor        # (B, K) singular values, 0 past the rank
    V: Tensor        # (B, K, K) right singular vectors
    mask: Tensor     # (B, K) True where the singular value is kept

    @property
    def rank(self) -> Tensor:
        """dim T_𝐖 per replica."""
        return self.mask.sum(-1)

    def project(self, flat: Tensor) -> Tensor:
        """P_𝐖 x for x (B, D): U_r U_r^T x."""
        coeff = (self.U.mT @ flat.unsqueeze(-1)).squeeze(-1) * self.mask
        return (self.U @ coeff.unsqueeze(-1)).squeeze(-1)

    def generator(self, flat: Tensor) -> Tensor:
        """The minimum-norm A (B, K) with τ(A) = P_𝐖 x: V_r diag(1/s_r) U_r^T x."""
        coeff = (self.U.mT @ flat.unsqueeze(-1)).squeeze(-1)
        inverse = torch.where(self.mask, 1.0 / torch.where(self.mask, self.s, torch.ones_like(self.s)),
                              torch.zeros_like(self.s))
        return (self.V @ (coeff * inverse).unsqueeze(-1)).squeeze(-1)


def fibre_frame(factors: Sequence[Tensor], rtol: float = RTOL) -> FibreFrame:
    """One batched SVD of τ_𝐖 (see the module docstring for the rank rule).

    A replica whose factors are not finite (a move that overflowed: near a rank-deficient product
    the minimum-norm generator is huge) gets a NaN frame, so its next move is NaN and the run loop
    counts and freezes it as diverged; LAPACK would otherwise refuse the whole batch."""
    tau = tangent_matrix(factors)
    bad = ~torch.isfinite(tau).flatten(1).all(1)
    U, s, Vh = torch.linalg.svd(torch.where(bad.view(-1, 1, 1), 0.0, tau), full_matrices=False)
    U = torch.where(bad.view(-1, 1, 1), torch.nan, U)
    mask = s > rtol * s[:, :1]
    return FibreFrame(U=U, s=torch.where(mask, s, torch.zeros_like(s)), V=Vh.mT, mask=mask)


def generators_from_flat(flat: Tensor, factors: Sequence[Tensor]) -> list[Tensor]:
    """A (B, K) as the list [A_1, …, A_{N−1}] of (B, d_p, d_p)."""
    B = flat.shape[0]
    sizes = [f.shape[-2] for f in factors[:-1]]
    return [piece.reshape(B, d, d) for piece, d in zip(flat.split([d * d for d in sizes], dim=1), sizes)]


# The normal equations are solved in one of two layouts. Batch-first (B, d, d'), as the factors
# come, with LAPACK's batched Cholesky: right for wide layers. Batch-last (d, d', B) for small
# ones, where every matrix entry is a contiguous vector over the replicas and a 2x2 product, a
# Kronecker block or a Cholesky column is a few elementwise ops on those vectors: LAPACK's batched
# routines and bmm pay ~1 µs of overhead per 2x2 or 8x8 matrix, more than the arithmetic, and
# this layout does not (at 2x2, depth 3, B = 4096 the projection solve got 3–5x faster, bench
# section 6, with τ^T τ in closed form). Same equations, same
# refinement; the layouts differ only in how a product of two small matrices is written.
SMALL_GENERATORS = 16   # K = Σ d_p² up to which the batch-last solve is used (on the CPU)


@dataclass(frozen=True)
class Layout:
    """How a batch of matrices is stored: `mm` multiplies, `T` transposes, `kron` forms P ⊗ Q
    (row-major vec: vec(P X Q^T) = (P ⊗ Q) vec X), `rows` the index of a matrix's row axis."""
    mm: Any
    T: Any
    kron: Any
    rows: int


def _kron_first(P: Tensor, Q: Tensor) -> Tensor:
    a, b = P.shape[-2:]
    c, e = Q.shape[-2:]
    return (P[..., :, None, :, None] * Q[..., None, :, None, :]).reshape(-1, a * c, b * e)


def _kron_last(P: Tensor, Q: Tensor) -> Tensor:
    a, b = P.shape[:2]
    c, e = Q.shape[:2]
    return (P[:, None, :, None] * Q[None, :, None, :]).reshape(a * c, b * e, -1)


BATCH_FIRST = Layout(mm=torch.matmul, T=lambda x: x.mT, kron=_kron_first, rows=-2)
BATCH_LAST = Layout(mm=planes_mm, T=planes_T, kron=_kron_last, rows=0)     # the planes of dlntorch.tiny


def tangent_gram(factors: Sequence[Tensor], layout: Layout = BATCH_FIRST) -> Tensor:
    """τ^T τ (B, K, K) in closed form, without τ: τ*τ(A)_q = A_q W_q W_q^T + W_{q+1}^T W_{q+1} A_q
    − W_q A_{q−1} W_q^T − W_{q+1}^T A_{q+1} W_{q+1} (with `factors[q]` as W_q here), so in the
    row-major vec the blocks are I ⊗ W_q W_q^T + W_{q+1}^T W_{q+1} ⊗ I on the diagonal and
    −W_q ⊗ W_q at (q, q−1), its transpose at (q − 1, q): block tridiagonal. (K, K, B) in the
    batch-last layout."""
    mm, T, kron = layout.mm, layout.T, layout.kron
    sizes = [f.shape[layout.rows] for f in factors[:-1]]
    offsets = [0]
    for d in sizes:
        offsets.append(offsets[-1] + d * d)
    like = dict(dtype=factors[0].dtype, device=factors[0].device)
    B, K = factors[0].shape[0 if layout.rows == -2 else -1], offsets[-1]
    # every entry is written once below (a zero-filled buffer would cost as much as the blocks)
    gram = torch.empty((B, K, K) if layout.rows == -2 else (K, K, B), **like)
    block = (lambda i, j: (slice(None), i, j)) if layout.rows == -2 else (lambda i, j: (i, j))
    for q, d in enumerate(sizes):
        if q > 1:       # blocks (q, r) and (r, q) with |q − r| ≥ 2 vanish
            here, far = slice(offsets[q], offsets[q + 1]), slice(0, offsets[q - 1])
            gram[block(here, far)] = 0.0
            gram[block(far, here)] = 0.0
        eye = torch.eye(d, **like) if layout.rows == -2 else torch.eye(d, **like)[..., None]
        left, right = mm(factors[q], T(factors[q])), mm(T(factors[q + 1]), factors[q + 1])
        here = slice(offsets[q], offsets[q + 1])
        gram[block(here, here)] = kron(eye, left) + kron(right, eye)
        if q > 0:
            before = slice(offsets[q - 1], offsets[q])
            coupling = -kron(factors[q], factors[q])
            gram[block(here, before)] = coupling
            gram[block(before, here)] = T(coupling)
    return gram


def _cholesky_last(M: Tensor) -> tuple[Tensor, Tensor]:
    """The Cholesky factor L (K, K, B) of M (K, K, B) (its lower triangle; the rest is left
    unset), column by column, each column a few vector ops over the replicas; and whether every
    pivot was positive (B,). A replica with a non-positive pivot gets a NaN-free L (its pivot
    clamped) and False."""
    K = M.shape[0]
    L = torch.empty_like(M)     # only the lower triangle is written, and only it is read
    ok = torch.ones(M.shape[-1], dtype=torch.bool, device=M.device)
    tiny = torch.finfo(M.dtype).tiny
    for j in range(K):
        pivot_sq = M[j, j] - L[j, :j].square().sum(0)
        ok = ok & (pivot_sq > 0)
        pivot = pivot_sq.clamp_min(tiny).sqrt()
        L[j, j] = pivot
        if j + 1 < K:
            L[j + 1:, j] = (M[j + 1:, j] - (L[j + 1:, :j] * L[j, :j]).sum(1)) / pivot
    return L, ok


def _cholesky_solve_last(L: Tensor, b: Tensor) -> Tensor:
    """x (K, B) with L L^T x = b: forward then back substitution, one row (a vector op) at a time."""
    K = L.shape[0]
    y = torch.empty_like(b)
    for i in range(K):
        y[i] = (b[i] - (L[i, :i] * y[:i]).sum(0)) / L[i, i]
    x = torch.empty_like(b)
    for i in reversed(range(K)):
        x[i] = (y[i] - (L[i + 1:, i] * x[i + 1:]).sum(0)) / L[i, i]
    return x


# Below this ratio of Cholesky pivots of τ^T τ (≈ 1/cond τ) the normal equations lose more than
# ~1e-8 relative accuracy (eps · cond²) before refinement: such replicas take the SVD.
PIVOT_RATIO = 1e-4


def _pieces(flat: Tensor, shapes: Sequence[tuple[int, ...]], layout: Layout) -> list[Tensor]:
    """A flat vector, (B, Σ sizes) batch-first or (Σ sizes, B) batch-last, as matrices of `shapes`
    (each with its batch axis), entries in the row-major order of `flatten`."""
    axis = 1 if layout.rows == -2 else 0
    sizes = [math.prod(shape) // flat.shape[1 - axis] for shape in shapes]
    return [piece.reshape(shape) for piece, shape in zip(flat.split(sizes, dim=axis), shapes)]


def _flat(parts: Sequence[Tensor], layout: Layout) -> Tensor:
    return flatten(parts) if layout.rows == -2 else torch.cat([x.reshape(-1, x.shape[-1]) for x in parts])


def _normal_solve(factors: Sequence[Tensor], x: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """A with τ^T τ A = τ^T x by Cholesky plus one step of iterative refinement (its error is then
    eps·cond τ, not eps·cond²), and whether the factorisation was good (positive pivots within
    1/PIVOT_RATIO of each other), per replica; in `layout`, with finite factors."""
    gram = tangent_gram(factors, layout)
    factor_shapes = [tuple(f.shape) for f in factors]
    if layout.rows == -2:
        generator_shapes = [(f.shape[0], f.shape[-2], f.shape[-2]) for f in factors[:-1]]
    else:
        generator_shapes = [(f.shape[0], f.shape[0], f.shape[-1]) for f in factors[:-1]]

    def adjoint(y: Tensor) -> Tensor:
        return _flat(tangent_adjoint(factors, _pieces(y, factor_shapes, layout), layout), layout)

    def tau(A: Tensor) -> Tensor:
        return _flat(tangent(factors, _pieces(A, generator_shapes, layout), layout), layout)

    if layout.rows == 0:
        L, ok = _cholesky_last(gram)
        pivots = torch.diagonal(L, dim1=0, dim2=1).mT                    # (K, B)
        spread = pivots.min(0).values > PIVOT_RATIO * pivots.max(0).values
        solve = lambda b: _cholesky_solve_last(L, b)                     # noqa: E731
    else:
        L, info = torch.linalg.cholesky_ex(gram)
        pivots = torch.diagonal(L, dim1=-2, dim2=-1)
        ok, spread = info == 0, pivots.min(-1).values > PIVOT_RATIO * pivots.max(-1).values
        solve = lambda b: torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)   # noqa: E731
    A = solve(adjoint(x))
    A = A + solve(adjoint(x - tau(A)))
    return A, ok & spread


def minimum_norm_generator(factors: Sequence[Tensor], flat: Tensor, rtol: float = RTOL) -> Tensor:
    """The minimum-norm A (B, K) with τ(A) = P_𝐖 x, for x (B, D) — what `FibreFrame.generator` gives,
    at a fraction of the cost where τ is injective and well conditioned (full rank, square layers):
    there A solves the normal equations τ^T τ A = τ^T x by a batched Cholesky factorisation, with one
    step of iterative refinement (`_normal_solve`). τ is never formed: τ^T τ comes from
    `tangent_gram`, τ^T and τ act by `tangent_adjoint` and `tangent` (products of the factors);
    small generators (K ≤ SMALL_GENERATORS) are solved in the batch-last layout on the CPU.
    Replicas where the factorisation fails or its pivots spread by more than 1/PIVOT_RATIO (τ not
    injective, or near a rank drop) take the SVD of `fibre_frame` and its rank rule; so do
    non-finite ones (NaN out).
    The fallback's test reads `good.all()` once per call (a device sync on CUDA)."""
    finite = torch.stack([torch.isfinite(f).flatten(1).all(1) for f in factors]).all(0)
    safe = [torch.where(finite.view(-1, 1, 1), f, 0.0) for f in factors]
    x = torch.where(finite.view(-1, 1), flat, 0.0)
    small = sum(f.shape[-2] ** 2 for f in factors[:-1]) <= SMALL_GENERATORS
    # the batch-last solve trades LAPACK's per-matrix overhead for ~10² elementwise ops per
    # solve: a win on the CPU; on CUDA each op is a kernel launch (not measured there: batched LAPACK)
    if small and flat.device.type == "cpu":
        A, good = _normal_solve([to_planes(f) for f in safe], x.T.contiguous(), BATCH_LAST)
        A = A.T
    else:
        A, good = _normal_solve(safe, x, BATCH_FIRST)
    good = good & finite
    if not bool(good.all()):
        rest = (~good).nonzero().squeeze(1)
        frame = fibre_frame([f[rest] for f in factors], rtol)
        A = A.index_put((rest,), frame.generator(flat[rest]))
    return A


def _tangent_of(factors: Sequence[Tensor], A: Tensor) -> Tensor:
    """τ_𝐖(A) flattened, for generators A (B, K)."""
    return flatten(tangent(factors, generators_from_flat(A, factors)))


def project(factors: Sequence[Tensor], xi: Sequence[Tensor], rtol: float = RTOL) -> list[Tensor]:
    """P_𝐖 ξ, the orthogonal projection of ξ = (ξ_p) onto the fibre's tangent space: τ(A) for the
    minimum-norm generator A of P_𝐖 ξ."""
    return unflatten(_tangent_of(factors, minimum_norm_generator(factors, flatten(xi), rtol)), factors)


def tangential_part(factors: Sequence[Tensor], xi: Sequence[Tensor], kappa: float = 0.0,
                    rtol: float = RTOL) -> list[Tensor]:
    """P_𝐖 ξ + √κ (ξ − P_𝐖 ξ): the noise direction of the `tangential` model (κ = 1: ξ itself)."""
    flat = flatten(xi)
    along = _tangent_of(factors, minimum_norm_generator(factors, flat, rtol))
    return unflatten(along + kappa ** 0.5 * (flat - along), factors)


def fibre_brownian_step(factors: Sequence[Tensor], xi: Sequence[Tensor], scale: float,
                        rtol: float = RTOL) -> list[Tensor]:
    """One step of the Stratonovich SDE d𝐖 = σ P_𝐖 ∘ dB by exact group moves (scale = σ√h).

    The generator is taken at the midpoint: a = A(𝐖), 𝐖_½ = e^{a/2}·𝐖, then 𝐖' = e^{A(𝐖_½)}·𝐖, with
    A(𝐗) = scale · (the minimum-norm generator of P_𝐗 ξ), the same ξ both times. Why this limit:
    e^{sA}·𝐖 is the exact flow of the vector field 𝐗 ↦ τ_𝐗(A), so 𝐖' = 𝐖 + τ_𝐖(a_½) + ½ τ_{τ_𝐖(a)}(a)
    + O(h^{3/2}); expanding a_½ = a + ½ DA[τ_𝐖(a)] + O(h) turns that into 𝐖 + V + ½ DV[V], V = P_𝐖 ξ
    scale — the one-step expansion of the Stratonovich solution (the Itô one lacks ½ DV[V]).
    Taking A at 𝐖 alone would converge to another diffusion (the random walk of the group,
    `gl_walk`-like). Every move is a group action, so the product never changes (to rounding)."""
    noise = flatten(xi)

    def generator_at(point: Sequence[Tensor]) -> list[Tensor]:
        return generators_from_flat(scale * minimum_norm_generator(point, noise, rtol), point)

    half = [0.5 * a for a in generator_at(factors)]
    midpoint = fibre_move(factors, half)
    return fibre_move(factors, generator_at(midpoint))
