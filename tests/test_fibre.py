"""The fibre's tangent map, its projection, and the noise directions built on them (problem 7).

References built independently here: the Jacobian of φ by autograd (its null space is the fibre's
tangent space at full rank), second derivatives of φ by nested jvp, and for the fibre's Brownian
motion the arc-length heat kernel on the hyperbola w_1 w_2 = const by Gauss–Hermite quadrature.
"""
import math

import numpy as np
import pytest
import torch
from torch.func import jvp

from dlntorch.fibre import (
    BATCH_FIRST,
    BATCH_LAST,
    _normal_solve,
    fibre_brownian_step,
    fibre_frame,
    flatten,
    generators_from_flat,
    minimum_norm_generator,
    project,
    tangent,
    tangent_adjoint,
    tangent_gram,
    tangent_matrix,
    tangential_part,
    unflatten,
)
from dlntorch.geometry import fibre_move
from dlntorch.network import chain

f64 = torch.float64


def random_factors(widths, B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d_out, d_in, generator=gen, dtype=f64) for d_in, d_out in zip(widths[:-1], widths[1:])]


def product_jacobian(factors):
    """J (B, m·n, D): the derivative of 𝐖 ↦ φ(𝐖) by autograd, one replica at a time."""
    out = []
    for b in range(factors[0].shape[0]):
        point = torch.cat([f[b].flatten() for f in factors])
        shapes = [f.shape[1:] for f in factors]
        sizes = [f[0].numel() for f in factors]

        def phi(flat, shapes=shapes, sizes=sizes):
            parts = [piece.reshape(1, *s) for piece, s in zip(flat.split(sizes), shapes)]
            return chain(parts).flatten()

        out.append(torch.autograd.functional.jacobian(phi, point))
    return torch.stack(out)


WIDTHS = [[2, 2, 2, 2], [3, 2, 4], [2, 3, 3, 2], [1, 1, 1]]


@pytest.mark.parametrize("widths", WIDTHS)
def test_the_tangent_matrix_is_the_tangent_map_and_the_adjoint_is_its_transpose(widths):
    F = random_factors(widths)
    gen = torch.Generator().manual_seed(1)
    A = [torch.randn(4, d, d, generator=gen, dtype=f64) for d in widths[1:-1]]
    eta = [torch.randn(f.shape, generator=gen, dtype=f64) for f in F]
    M = tangent_matrix(F)
    a = torch.cat([x.flatten(1) for x in A], dim=1)
    # both sides are a handful of products of O(1) entries: rounding ~1e-15
    torch.testing.assert_close((M @ a.unsqueeze(-1)).squeeze(-1), flatten(tangent(F, A)), rtol=0, atol=1e-13)
    inner_up = (flatten(tangent(F, A)) * flatten(eta)).sum(1)
    inner_down = (a * flatten(tangent_adjoint(F, eta))).sum(1)
    torch.testing.assert_close(inner_up, inner_down, rtol=0, atol=1e-12)


@pytest.mark.parametrize("widths", WIDTHS)
def test_the_projection_is_onto_the_null_space_of_the_product_derivative(widths):
    """At full rank T_𝐖 = ker Dφ: its dimension is D − rank J, and P ξ is killed by J while
    ξ − P ξ is orthogonal to every fibre direction."""
    F = random_factors(widths)
    J = product_jacobian(F)
    D = J.shape[-1]
    frame = fibre_frame(F)
    rank_J = torch.linalg.matrix_rank(J)
    assert torch.equal(frame.rank, D - rank_J)
    gen = torch.Generator().manual_seed(2)
    xi = [torch.randn(f.shape, generator=gen, dtype=f64) for f in F]
    P = flatten(project(F, xi))
    # J P ξ = 0: P ξ changes the product only at second order (entries O(1): 1e-12 is rounding)
    assert (J @ P.unsqueeze(-1)).abs().max() < 1e-12
    # P is a projection: P P ξ = P ξ, and the rest is normal to the fibre (τ* kills it)
    torch.testing.assert_close(flatten(project(F, unflatten(P, F))), P, rtol=0, atol=1e-12)
    normal = unflatten(flatten(xi) - P, F)
    assert flatten(tangent_adjoint(F, normal)).abs().max() < 1e-12


def test_where_tau_is_not_injective_the_generator_is_the_pseudo_inverse_solution():
    """[1, 3, 1]: K = 9 generator entries, but the orbit (= ker Dφ, D − 1 = 5) has dimension 5:
    A ↦ τ(A) has a 4-dimensional kernel; the rule is the minimum-norm (pseudo-inverse) generator."""
    F = random_factors([1, 3, 1])
    frame = fibre_frame(F)
    assert torch.equal(frame.rank, torch.full((4,), 5))
    gen = torch.Generator().manual_seed(3)
    xi = torch.randn(4, 6, generator=gen, dtype=f64)
    A = frame.generator(xi)
    reference = (torch.linalg.pinv(tangent_matrix(F), rtol=1e-10) @ xi.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(A, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(flatten(tangent(F, generators_from_flat(A, F))), frame.project(xi),
                               rtol=0, atol=1e-12)


def test_kappa_zero_is_tangential_and_kappa_one_is_isotropic():
    F = random_factors([2, 2, 2, 2])
    gen = torch.Generator().manual_seed(4)
    xi = [torch.randn(f.shape, generator=gen, dtype=f64) for f in F]
    J = product_jacobian(F)
    along = flatten(tangential_part(F, xi, kappa=0.0))
    # orthogonal to every direction that changes the product: the rows of J span them
    assert (J @ along.unsqueeze(-1)).abs().max() < 1e-10
    torch.testing.assert_close(flatten(tangential_part(F, xi, kappa=1.0)), flatten(xi), rtol=0, atol=1e-13)
    half = flatten(tangential_part(F, xi, kappa=0.25))      # P ξ + ½ (ξ − P ξ)
    torch.testing.assert_close(half, along + 0.5 * (flatten(xi) - along), rtol=0, atol=1e-13)


@pytest.mark.parametrize("widths", WIDTHS + [[1, 3, 1]])
def test_the_cholesky_generator_is_the_svd_pseudo_inverse_generator(widths):
    """minimum_norm_generator (normal equations where τ is injective and well conditioned, the SVD
    elsewhere: [1, 3, 1] has a non-injective τ, [3, 2, 4] a rank-deficient product) against
    FibreFrame.generator (the SVD pseudo-inverse) on the same x; one replica is made nearly
    rank-deficient (σ_min of W_1 at 1e-7) so the fallback is taken inside a mixed batch.
    Tolerance 1e-10: the refined normal-equation solve errs by eps·cond(τ) ≤ 1e-12 · |A| here."""
    F = random_factors(widths, B=5, seed=11)
    U, s, Vh = torch.linalg.svd(F[0][2], full_matrices=False)
    s[-1] = 1e-7 * s[0]
    F[0][2] = U @ torch.diag(s) @ Vh
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, sum(f[0].numel() for f in F), generator=gen, dtype=f64)
    want = fibre_frame(F).generator(x)
    got = minimum_norm_generator(F, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def batch_last(F):
    return [f.permute(1, 2, 0).contiguous() for f in F]


@pytest.mark.parametrize("widths", WIDTHS + [[5, 5, 5], [2, 2, 2, 2, 2]])
def test_the_closed_form_gram_matrix_is_tau_transpose_tau_in_both_layouts(widths):
    """tangent_gram (blocks of Kronecker products, τ never formed) against τ^T τ of the explicit
    tangent matrix; [2, 2, 2, 2, 2] has a vanishing block (q, q ± 2). Rounding of sums of a few O(1)
    products: 1e-13."""
    F = random_factors(widths)
    tau = tangent_matrix(F)
    want = tau.mT @ tau
    torch.testing.assert_close(tangent_gram(F), want, rtol=0, atol=1e-13)
    torch.testing.assert_close(tangent_gram(batch_last(F), BATCH_LAST).permute(2, 0, 1), want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("widths", [[2, 2, 2, 2], [3, 2, 4], [2, 2, 2, 2, 2], [5, 5, 5]])
def test_the_batch_last_solve_is_the_lapack_solve(widths):
    """The hand-written Cholesky of the batch-last layout (used for K ≤ 16) and LAPACK's
    (batch-first) solve the same normal equations: the same A to 1e-12 relative (both err by
    eps·cond τ after refinement), and the same verdict on which replicas are good; [5, 5, 5]
    (K = 25) is the size minimum_norm_generator gives to LAPACK, checked against the SVD there."""
    F = random_factors(widths, B=6, seed=13)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(6, sum(f[0].numel() for f in F), generator=gen, dtype=f64)
    first, good_first = _normal_solve(F, x, BATCH_FIRST)
    last, good_last = _normal_solve(batch_last(F), x.T.contiguous(), BATCH_LAST)
    assert torch.equal(good_first, good_last) and bool(good_first.all())
    torch.testing.assert_close(last.T, first, rtol=0, atol=1e-12 * float(first.abs().max()))
    want = fibre_frame(F).generator(x)
    torch.testing.assert_close(minimum_norm_generator(F, x), want, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_a_non_finite_replica_gets_nan_moves_and_leaves_the_others_alone():
    """An overflowed replica must not stop the batch (LAPACK refuses non-finite input): its
    projection and fibre_brownian move are NaN (so the run loop freezes and counts it), and the
    other replicas get exactly what they get in a batch without it."""
    F = random_factors([2, 2, 2, 2], B=3, seed=7)
    gen = torch.Generator().manual_seed(8)
    xi = [torch.randn(f.shape, generator=gen, dtype=f64) for f in F]
    broken = [f.clone() for f in F]
    broken[1][1, 0, 0] = math.inf
    along, clean = flatten(project(broken, xi)), flatten(project(F, xi))
    assert bool(torch.isnan(along[1]).all())
    torch.testing.assert_close(along[[0, 2]], clean[[0, 2]], rtol=0, atol=1e-14)
    moved = flatten(fibre_brownian_step(broken, xi, 0.1))
    assert bool(torch.isnan(moved[1]).any()) and bool(torch.isfinite(moved[[0, 2]]).all())


def second_derivative_of_product(factors, e):
    """D²φ(e, e) by nested forward-mode derivatives (independent of any formula)."""
    def phi(*fs):
        return chain(list(fs))

    def first(*fs):
        return jvp(phi, tuple(fs), tuple(e))[1]

    return jvp(first, tuple(factors), tuple(e))[1]


def test_tangential_ito_noise_moves_the_product_along_the_mean_curvature():
    """κ = 0, one Euler–Maruyama step of size h without gradient: ΔW = φ(𝐖 + σ√h P ξ) − φ(𝐖).
    Dφ(P ξ) = 0, so E[ΔW]/h = ½ σ² Σ_i D²φ(e_i, e_i) + O(h) over an orthonormal basis e_i of T_𝐖 —
    here built from the null space of the autograd Jacobian, not from τ."""
    base = random_factors([2, 2, 2], B=1, seed=5)
    J = product_jacobian(base)[0]
    _, s, Vh = torch.linalg.svd(J)
    basis = Vh[(s > 1e-10 * s[0]).sum():]                       # (dim T, D): the null space
    sigma, h = 1.0, 1e-6
    expected = 0.5 * sigma ** 2 * sum(second_derivative_of_product(base, unflatten(e[None], base))[0]
                                      for e in basis)
    B = 200_000
    F = [f.expand(B, -1, -1).clone() for f in base]
    gen = torch.Generator().manual_seed(6)
    xi = [torch.randn(f.shape, generator=gen, dtype=f64) for f in F]
    step = tangential_part(F, xi, kappa=0.0)
    moved = [f + sigma * math.sqrt(h) * d for f, d in zip(F, step)]
    rate = (chain(moved) - chain(F)) / h                         # (B, 2, 2)
    mean, se = rate.mean(0), rate.std(0) / math.sqrt(B)
    # the O(h) bias is ~1e-6 against a standard error ~1e-2: the test is 4 standard errors
    assert ((mean - expected).abs() <= 4 * se).all(), (mean, expected, se)
    assert expected.abs().max() > 10 * se.max()                  # the drift is really there


def test_fibre_moves_keep_the_product_exactly_over_a_thousand_steps():
    F = random_factors([2, 3, 2, 2], B=8, seed=7)
    W = chain(F)
    gen = torch.Generator().manual_seed(8)
    walked, brownian = F, F
    for _ in range(1000):
        walked = fibre_move(walked, [0.05 * torch.randn(8, d, d, generator=gen, dtype=f64) for d in (3, 2)])
        brownian = fibre_brownian_step(brownian, [torch.randn(f.shape, generator=gen, dtype=f64) for f in F], 0.05)
    # 1000 exact moves, each exact to rounding: the error of a product is ~1e-16 × Π‖W_p‖ (the size
    # of the terms that cancel), summed over the steps; the GL walk's factors grow (the orbit is
    # non-compact), so the error is measured against the factors' sizes, not W's
    for moved in (walked, brownian):
        size = torch.stack([f.flatten(1).norm(dim=1) for f in moved]).prod(0).max()
        assert (chain(moved) - W).abs().max() / size < 1e-12
    assert (flatten(brownian) - flatten(F)).abs().max() > 0.1   # it did move along the fibre


def arc_length(u):
    """s(u) = ∫_0^u |d(e^v, e^{−v})/dv| dv on the hyperbola w_1 w_2 = 1, by the trapezoid rule."""
    return np.concatenate([[0.0], np.cumsum(0.5 * np.diff(u) * (np.sqrt(2 * np.cosh(2 * u[1:]))
                                                                  + np.sqrt(2 * np.cosh(2 * u[:-1]))))])


def heat_kernel_mean(f, u0, variance):
    """E f(u(t)) for Brownian motion in arc length on the hyperbola: s(t) = s0 + N(0, variance)."""
    grid = np.linspace(-12, 12, 400_001)
    s = arc_length(grid) - np.interp(0.0, grid, arc_length(grid))
    s0 = np.interp(u0, grid, s)
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    u = np.interp(s0 + math.sqrt(variance) * nodes, s, grid)
    return float((weights * f(u)).sum() / weights.sum())


@pytest.mark.parametrize("h", [0.02, 0.005])
def test_fibre_brownian_motion_on_the_scalar_depth_two_fibre_is_brownian_motion_in_arc_length(h):
    """N = 2, 1x1 factors: the fibre of w = w_1 w_2 = 1 is the hyperbola, and the intrinsic Brownian
    motion (Stratonovich, d𝐖 = σ P ∘ dB) is Brownian motion in its arc length. E[u(t)], u = log w_1,
    at t = 1 against the heat-kernel quadrature, at two step sizes, within 4 standard errors; the
    naive scheme (generator taken at the start of each step, no midpoint) is many errors off."""
    u0, t, B = 0.5, 1.0, 40_000
    start = [torch.full((B, 1, 1), math.exp(u0), dtype=f64), torch.full((B, 1, 1), math.exp(-u0), dtype=f64)]
    gen = torch.Generator().manual_seed(9)
    midpoint, naive = start, start
    for _ in range(round(t / h)):
        xi = [torch.randn(B, 1, 1, generator=gen, dtype=f64) for _ in range(2)]
        midpoint = fibre_brownian_step(midpoint, xi, math.sqrt(h))
        a = generators_from_flat(math.sqrt(h) * fibre_frame(naive).generator(flatten(xi)), naive)
        naive = fibre_move(naive, a)
    exact = heat_kernel_mean(lambda u: u, u0, t)
    for factors, close in ((midpoint, True), (naive, False)):
        u = torch.log(factors[0].flatten())
        mean, se = float(u.mean()), float(u.std()) / math.sqrt(B)
        if close:
            assert abs(mean - exact) <= 4 * se, (h, mean, exact, se)
        else:
            assert abs(mean - exact) > 8 * se, (h, mean, exact, se)
