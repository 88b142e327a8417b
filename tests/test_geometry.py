"""Geometry of the DLN against the formulas and identities of shared/PROBLEMS.md (float64)."""
import math

import mpmath
import pytest
import torch

from dlntorch.geometry import (
    balance_gap,
    balanced_factors,
    conservation_law_count,
    entropy,
    exp_pair,
    f_inf,
    f_N,
    fibre_move,
    free_energy,
    haar_orthogonal,
    log_orbit_volume,
    metric_norm,
    metric_operator,
    metric_operator_by_powers,
    orbit_volume,
)
from dlntorch.network import balancedness_of, chain

DT = torch.float64
INF = math.inf


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def with_spectrum(s, rows, cols, batch=2, seed=0):
    """(batch, rows, cols) matrices U diag(s) V^T with Haar U, V and the given singular values."""
    g = gen(seed)
    U = haar_orthogonal(batch, rows, generator=g, dtype=DT)
    V = haar_orthogonal(batch, cols, generator=g, dtype=DT)
    S = torch.zeros(rows, cols, dtype=DT)
    S[range(len(s)), range(len(s))] = torch.tensor(s, dtype=DT)
    return U @ S @ V.mT


def scalar(x):
    return torch.tensor(float(x), dtype=DT)


# ------------------------------------------------------------------------------------------ f_N


@pytest.mark.parametrize("N", [2, 3, 5, 8])
def test_f_N_matches_sum_and_quotient_forms(N):
    x = torch.tensor([0.3, 1.0, 2.5, 0.01, 7.0], dtype=DT)
    y = torch.tensor([1.7, 0.2, 0.9, 3.0, 6.0], dtype=DT)
    total = sum(x ** (2 * k / N) * y ** (2 * (N - 1 - k) / N) for k in range(N))
    quotient = (x**2 - y**2) / (x ** (2 / N) - y ** (2 / N))
    # well-separated arguments: both forms are accurate to a few ulp
    torch.testing.assert_close(f_N(x, y, N), total, rtol=1e-13, atol=0)
    torch.testing.assert_close(f_N(x, y, N), quotient, rtol=1e-13, atol=0)
    torch.testing.assert_close(f_N(y, x, N), f_N(x, y, N), rtol=0, atol=0)  # symmetric by construction


@pytest.mark.parametrize("N", [1, 2, 3, 7])
def test_f_N_special_values(N):
    x = torch.tensor([0.0, 0.4, 1.0, 3.0], dtype=DT)
    zero = torch.zeros_like(x)
    # exact up to one rounding of pow and the product with N
    diagonal = N * x ** (2 - 2 / N) if N > 1 else torch.ones_like(x)
    torch.testing.assert_close(f_N(x, x, N), diagonal, rtol=1e-15, atol=0)
    if N == 1:
        assert torch.equal(f_N(x, zero, 1), torch.ones_like(x))  # f_1 ≡ 1, zeros included
        assert torch.equal(f_N(zero, zero, 1), torch.ones_like(x))
    else:
        torch.testing.assert_close(f_N(x, zero, N), x ** (2 - 2 / N), rtol=1e-15, atol=0)  # 0⁰ = 1
        torch.testing.assert_close(f_N(zero, x, N), x ** (2 - 2 / N), rtol=1e-15, atol=0)
        assert torch.equal(f_N(zero, zero, N), zero)


def test_f_inf_special_values_and_formula():
    x = torch.tensor([0.0, 0.4, 1.0, 3.0], dtype=DT)
    assert torch.equal(f_inf(x, x), x**2)  # the series at λ = 0 is exactly 1
    assert torch.equal(f_inf(x, torch.zeros_like(x)), torch.zeros_like(x))
    a, b = torch.tensor([0.3, 2.0, 5.0], dtype=DT), torch.tensor([1.1, 0.5, 4.0], dtype=DT)
    torch.testing.assert_close(f_inf(a, b), (a**2 - b**2) / torch.log(a**2 / b**2), rtol=1e-14, atol=0)
    assert torch.equal(f_N(a, b, INF), f_inf(a, b))  # N = inf means f_∞ (the limit of f_N/N)


def mp_f(x, y, N):
    x, y = mpmath.mpf(x), mpmath.mpf(y)
    if N == INF:
        return x * x if x == y else (x * x - y * y) / mpmath.log(x * x / (y * y))
    return sum(x ** (mpmath.mpf(2 * k) / N) * y ** (mpmath.mpf(2 * (N - 1 - k)) / N) for k in range(N))


def mp_f_gradient(x, y, N):
    """(∂f_N/∂x, ∂f_N/∂y) in mpmath, term by term (f_∞: of the logarithmic mean)."""
    x, y = mpmath.mpf(x), mpmath.mpf(y)
    if N == INF:
        L = mpmath.log(x * x / (y * y))
        return ((2 * x * L - (x * x - y * y) * 2 / x) / L**2, (-2 * y * L + (x * x - y * y) * 2 / y) / L**2)
    terms = [(mpmath.mpf(2 * k) / N, mpmath.mpf(2 * (N - 1 - k)) / N) for k in range(N)]
    return (sum(a * x ** (a - 1) * y**b for a, b in terms if a), sum(b * x**a * y ** (b - 1) for a, b in terms if b))


@pytest.mark.parametrize("N", [2, 3, 7, 1024, INF])
def test_f_N_stable_near_the_diagonal(N):
    mpmath.mp.dps = 50
    x = 1.3
    for base in (x, 1e-150, 1e150):
        for gap in [1e-1, 1e-3, 1e-5, 1e-8, 1e-11, 1e-14, 1e-16, 0.0]:
            y = base * (1 + gap)
            exact = float(mp_f(base, y, N))
            value = f_N(scalar(base), scalar(y), N).item()
            # expm1/log1p of an exact difference: a few ulp, where (x²−y²)/(x^{2/N}−y^{2/N}) would lose
            # ~|log gap| digits; plus the rounding of the exponent 2 − 2/N (≤ 1.1e-16), which pow
            # amplifies by |log x| (3.5e2 at 1e±150)
            tol = 1e-14 + 2.3e-16 * abs(math.log(base))
            assert abs(value - exact) <= tol * exact, (base, gap, value, exact)


@pytest.mark.parametrize("N", [2, 3, 7, 20, 1024, INF])
def test_f_N_accurate_far_from_the_diagonal(N):
    """small ≪ big: log(small/big) was log1p(−1 + ratio), which keeps only the ratio's absolute
    accuracy (ratio 1e-12: f_20 and f_∞ wrong in the sixth digit). Against mpmath, the same
    tolerance as near the diagonal (a few ulp, plus pow's exponent rounding times |log x|)."""
    mpmath.mp.dps = 50
    for big in (1.3, 20.7, 1e100):
        for ratio in (0.49, 0.3, 1e-3, 1e-8, 1e-12, 1e-30, 1e-100):
            small = big * ratio
            exact = float(mp_f(big, small, N))
            value = f_N(scalar(big), scalar(small), N).item()
            tol = 1e-14 + 2.3e-16 * abs(math.log(big))
            assert abs(value - exact) <= tol * exact, (big, ratio, value, exact)
    # the gradient stays right (never NaN) where (small − big)/big rounds to −1 (ratio < 1e-16)
    # and where the ratio underflows (1e-300 / 1e10): against mpmath's derivatives, to 1e-12
    # relative; ∂f/∂small ~ (small/big)^{2/N}/small overflows float64 at 1e-300 for N ≥ 1024
    for big, small in ((2.0, 2e-20), (1.3, 1.3e-200), (1e10, 1e-300)):
        x, y = scalar(big).requires_grad_(), scalar(small).requires_grad_()
        f_N(x, y, N).backward()
        d_big, d_small = mp_f_gradient(big, small, N)
        for got, exact in ((x.grad.item(), d_big), (y.grad.item(), d_small)):
            expected = float(exact) if abs(exact) < 1e300 else math.inf
            assert got == pytest.approx(expected, rel=1e-12), (big, small, N)


def test_f_1_is_constant():
    x = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    assert torch.equal(f_N(x, x.flip(0), 1), torch.ones_like(x))


@pytest.mark.parametrize("N", [2, 3, INF])
def test_f_N_gradients(N):
    # distinct, near-equal (series branch) and equal arguments: analytic gradient = finite differences
    for x, y in [(0.7, 1.9), (1.2, 1.2 * (1 + 1e-5)), (1.2, 1.2)]:
        args = (scalar(x).requires_grad_(), scalar(y).requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: f_N(a, b, N), args)
    # at a zero argument the value is exact and the gradient finite, never NaN
    x = torch.tensor([0.0, 1.5], dtype=DT, requires_grad=True)
    f_N(x, torch.tensor([0.0, 0.0], dtype=DT), N).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_f_N_over_N_tends_to_f_inf():
    # Exactly f_N/N = (xy)^{−1/N} f_∞ / sinhc(log(x/y)/N): the relative gap is −log(xy)/N + O(N⁻²).
    x = torch.tensor([2.0, 1.0, 3.0, 1.3, 0.5, 2.0], dtype=DT)
    y = torch.tensor([0.5, 1.0, 1 / 3, 0.4, 0.2, 3.0], dtype=DT)
    N = 1024
    ratio = f_N(x, y, N) / N / f_inf(x, y)
    # rate: N·(ratio − 1) → −log(xy) with an O(1/N) remainder (≤ 5e-3 at N = 1024 for these points)
    torch.testing.assert_close(N * (ratio - 1), -torch.log(x * y), rtol=0, atol=5e-3)
    # at xy = 1 (and after removing (xy)^{−1/N}) what remains is sinhc(L/N) − 1 ≈ L²/(6N²) < 1e-5
    torch.testing.assert_close(ratio * (x * y) ** (1 / N), torch.ones_like(x), rtol=0, atol=1e-5)
    unit = (x * y - 1).abs() < 1e-12
    assert unit.sum() == 3 and ((ratio[unit] - 1).abs() < 1e-5).all()


# ----------------------------------------------------------------------------- the metric operator

SHAPES = [(3, 3), (2, 4), (4, 2)]
SPECTRA = {
    "generic": {(3, 3): [1.7, 0.9, 0.35], (2, 4): [1.4, 0.6], (4, 2): [2.1, 0.45]},
    "repeated": {(3, 3): [1.3, 1.3, 0.4], (2, 4): [0.8, 0.8], (4, 2): [0.8, 0.8]},
    "rank-deficient": {(3, 3): [1.5, 0.7, 0.0], (2, 4): [1.1, 0.0], (4, 2): [1.1, 0.0]},
    "zero": {(3, 3): [0.0] * 3, (2, 4): [0.0] * 2, (4, 2): [0.0] * 2},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("N", [1, 2, 3, 5, INF])
def test_metric_operator_svd_form_equals_matrix_powers(shape, kind, N):
    W = with_spectrum(SPECTRA[kind][shape], *shape, seed=1)
    Z = torch.randn(2, *shape, generator=gen(2), dtype=DT)
    # N = inf: the second representation is the integral ∫₀¹ (WW^T)^{1−τ} Z (W^TW)^τ dτ by quadrature
    svd_form, powers = metric_operator(W, Z, N), metric_operator_by_powers(W, Z, N)
    depth = 1 if N == INF else N
    scale = depth * Z.norm() * max(1.0, max(SPECTRA[kind][shape]) ** 2)
    # eigh and SVD are backward stable (~1e-16·‖W‖² per power); 1e-12 leaves a 100x margin over N terms
    assert (svd_form - powers).abs().max() <= 1e-12 * scale


def test_metric_operator_closed_cases():
    W = with_spectrum([1.7, 0.9, 0.35], 3, 3)
    Z = torch.randn(2, 3, 3, generator=gen(3), dtype=DT)
    # A_1 = id, A_2(Z) = (WW^T)^{1/2} Z + Z (W^TW)^{1/2}; at W = 0, A_N = 0 for N ≥ 2 (0⁰ = 1: Z at N = 1)
    # two orthogonal changes of basis: rounding only
    torch.testing.assert_close(metric_operator(W, Z, 1), Z, rtol=0, atol=1e-14)
    U, s, Vh = torch.linalg.svd(W)
    left, right = U @ torch.diag_embed(s) @ U.mT, Vh.mT @ torch.diag_embed(s) @ Vh
    torch.testing.assert_close(metric_operator(W, Z, 2), left @ Z + Z @ right, rtol=0, atol=1e-13)
    zero = torch.zeros_like(W)
    assert torch.equal(metric_operator(zero, Z, 3), zero)
    torch.testing.assert_close(metric_operator(zero, Z, 1), Z, rtol=0, atol=0)


# g^∞ is degenerate off the row/column space of a rectangular W (f_∞(s, 0) = 0): square only
@pytest.mark.parametrize("shape,N", [(shape, N) for shape in SHAPES for N in (1, 2, 3, 5)] + [((3, 3), INF)])
def test_metric_norm_inverts_the_operator(shape, N):
    W = with_spectrum(SPECTRA["generic"][shape], *shape, seed=4)
    Z = torch.randn(2, *shape, generator=gen(5), dtype=DT)
    AZ = metric_operator(W, Z, N)
    # g(A_N Z, A_N Z) = ⟨A_N Z, Z⟩; the f_N cancel entrywise, so only rounding of the two sums remains
    torch.testing.assert_close(metric_norm(W, AZ, N), (AZ * Z).sum((-2, -1)), rtol=1e-12, atol=0)
    assert (metric_norm(W, Z, N) > 0).all()
    if N == 1:
        torch.testing.assert_close(metric_norm(W, Z, 1), Z.square().sum((-2, -1)), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------- entropy


def test_orbit_volume_known_values():
    # O(1) = {±1}; O(2) = two circles of Frobenius length 2π√2; SO(3) = S³(radius 2√2)/±1, so
    # vol O(3) = 2 · 2π²(2√2)³/2 = 32√2 π² (rotating by θ moves Frobenius distance √2 θ).
    assert orbit_volume(1) == pytest.approx(2.0, rel=1e-15)
    assert orbit_volume(2) == pytest.approx(4 * math.sqrt(2) * math.pi, rel=1e-15)
    assert orbit_volume(3) == pytest.approx(32 * math.sqrt(2) * math.pi**2, rel=1e-15)
    assert log_orbit_volume(4) == pytest.approx(math.log(orbit_volume(4)), rel=1e-15)


def skew_basis(d):
    """The Frobenius-orthonormal basis (E_ij − E_ji)/√2, i < j, of the skew matrices."""
    basis = []
    for i in range(d):
        for j in range(i + 1, d):
            E = torch.zeros(d, d, dtype=DT)
            E[i, j], E[j, i] = 1 / math.sqrt(2), -1 / math.sqrt(2)
            basis.append(E)
    return torch.stack(basis)


@pytest.mark.parametrize("d", [2, 3, 4])
@pytest.mark.parametrize("N", [2, 3, 4, 5])
def test_entropy_is_log_volume_of_the_balanced_orbit(d, N):
    """exp(S_N − (N−1) log c_d) = √det Gram of (Q_1, …, Q_{N−1}) ↦ (Q_p Σ^{1/N} Q_{p−1}^T)_p.

    The orbit map is equivariant under right translation Q_p ↦ Q_p e^{Ω_p}, and both the
    Frobenius metric on O_d (in which vol O_d = c_d) and the Euclidean metric upstairs are
    invariant, so the fibre volume is c_d^{N−1} times the √det Gram at any point, computed here
    in the orthonormal skew coordinates of the Lie algebra.
    """
    g = gen(10 * d + N)
    s = torch.sort(0.4 + 1.6 * torch.rand(d, generator=g, dtype=DT), descending=True).values
    W = with_spectrum(s.tolist(), d, d, batch=1, seed=d + N)
    U, _, Vh = torch.linalg.svd(W[0])
    frames = [Vh.mT] + [haar_orthogonal(1, d, generator=g, dtype=DT)[0] for _ in range(N - 1)] + [U]
    root = torch.diag(s ** (1 / N))
    basis = skew_basis(d)
    assert torch.allclose(torch.einsum("kij,lij->kl", basis, basis), torch.eye(len(basis), dtype=DT))

    def orbit(coords):
        omegas = [torch.zeros(d, d, dtype=DT)]
        omegas += [torch.einsum("k,kij->ij", c, basis) for c in coords.reshape(N - 1, len(basis))]
        omegas += [torch.zeros(d, d, dtype=DT)]
        moved = [frames[p] @ torch.linalg.matrix_exp(omegas[p]) for p in range(N + 1)]
        return torch.cat([(moved[p] @ root @ moved[p - 1].mT).reshape(-1) for p in range(1, N + 1)])

    torch.testing.assert_close(frames[N] @ torch.diag(s) @ frames[0].mT, W[0])  # the orbit lies over W
    J = torch.autograd.functional.jacobian(orbit, torch.zeros((N - 1) * len(basis), dtype=DT))
    volume_density = torch.sqrt(torch.linalg.det(J.mT @ J))
    S = entropy(W, N)[0]
    # a determinant of a well-conditioned ≤ 24×24 Gram: rounding ~1e-14, so 1e-11 relative
    assert math.exp(S - (N - 1) * log_orbit_volume(d)) == pytest.approx(volume_density.item(), rel=1e-11)


def test_entropy_edge_cases_and_free_energy():
    W = with_spectrum([1.7, 0.9, 0.35], 3, 3)
    assert torch.equal(entropy(W, 1), torch.zeros(2, dtype=DT))  # depth 1: the fibre is a point
    # rank d−1 stays finite (f_N(s, 0) = s^{2−2/N} > 0); two zero singular values make f_N(0, 0) = 0
    assert torch.isfinite(entropy(with_spectrum([1.0, 0.5, 0.0], 3, 3), 3)).all()
    assert torch.isneginf(entropy(with_spectrum([1.0, 0.0, 0.0], 3, 3), 3)).all()
    with pytest.raises(ValueError, match="square"):
        entropy(torch.zeros(1, 2, 3, dtype=DT), 2)
    energy = lambda M: 0.5 * M.square().sum((-2, -1))
    expected = energy(W) - entropy(W, 3) / 2.5
    torch.testing.assert_close(free_energy(W, energy, 2.5, 3), expected, rtol=0, atol=0)
    torch.testing.assert_close(free_energy(W, energy(W), 2.5, 3), expected, rtol=0, atol=0)


# -------------------------------------------------------------------------- fibres and balance


def random_factors(widths, batch=3, seed=0, scale=0.8):
    g = gen(seed)
    return [scale * torch.randn(batch, b, a, generator=g, dtype=DT) for a, b in zip(widths[:-1], widths[1:])]


WIDTHS = [[3, 3, 3, 3], [3, 4, 2, 3], [4, 3, 3, 2], [2, 5, 4]]


def test_the_closed_form_2x2_exponential_pair_is_the_matrix_exponential():
    """exp_pair at d = 2 (cosh/sinh of √(−det Z), cos/sin where −det Z < 0) against
    torch.linalg.matrix_exp (Padé) on both branches, on q = 0 (a nilpotent Z, a multiple of I) and
    at sizes from 1e-8 to 5; and expm(A) expm(−A) = I. Tolerance 1e-13 relative to the largest
    entry: Padé with scaling and squaring errs by ~eps·‖A‖ (‖A‖ up to ~15 here)."""
    g = gen(21)
    A = torch.cat([s * torch.randn(200, 2, 2, generator=g, dtype=DT) for s in (1e-8, 1e-3, 1.0, 5.0)])
    special = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]], [[1.0, 3.0], [-2.0, 1.0]],
                            [[0.5, 1.0], [1.0, -0.5]], [[0.0, 0.0], [0.0, 0.0]]], dtype=DT)
    A = torch.cat([A, special])
    q = (0.5 * (A[:, 0, 0] - A[:, 1, 1])) ** 2 + A[:, 0, 1] * A[:, 1, 0]
    assert bool((q > 0).any()) and bool((q < 0).any()) and bool((q == 0).any())   # every branch
    ahead, behind = exp_pair(A)
    for got, want in ((ahead, torch.linalg.matrix_exp(A)), (behind, torch.linalg.matrix_exp(-A))):
        scale = want.abs().amax((-2, -1), keepdim=True)
        assert ((got - want).abs() / scale).max() < 1e-13
    eye = torch.eye(2, dtype=DT).expand_as(A)
    scale = (ahead.abs().amax((-2, -1)) * behind.abs().amax((-2, -1)))[:, None, None]
    assert ((ahead @ behind - eye).abs() / scale).max() < 1e-13


@pytest.mark.parametrize("widths", WIDTHS)
def test_fibre_move_keeps_the_product(widths):
    factors = random_factors(widths)
    g = gen(7)
    generators = [0.5 * torch.randn(3, d, d, generator=g, dtype=DT) for d in widths[1:-1]]
    moved = fibre_move(factors, generators)
    scale = chain(factors).abs().max()
    # expm(−A) expm(A) = I to rounding (‖A‖ ~ 1): 1e-12 relative to the product's entries
    assert (chain(moved) - chain(factors)).abs().max() <= 1e-12 * scale
    assert not torch.allclose(moved[0], factors[0])  # it did move


@pytest.mark.parametrize("widths", WIDTHS)
def test_skew_moves_keep_balance_and_gap(widths):
    W = chain(random_factors(widths))
    factors = balanced_factors(W, widths, generator=gen(1))
    g = gen(8)
    skews = []
    for d in widths[1:-1]:
        A = torch.randn(3, d, d, generator=g, dtype=DT)
        skews.append(A - A.mT)
    moved = fibre_move(factors, skews)
    scale = max(f.square().sum((-2, -1)).max() for f in factors)  # ‖W_p‖² sets the size of G_p's terms
    for G in balancedness_of(moved):
        assert G.abs().max() <= 1e-12 * scale  # G ↦ Q G Q^T = 0, up to rounding of the products
    assert balance_gap(moved).abs().max() <= 1e-12 * scale * len(factors)
    # at an unbalanced point a skew move conjugates each G_p by expm(A_p)
    rough = random_factors(widths, seed=3)
    for G, H, A in zip(balancedness_of(rough), balancedness_of(fibre_move(rough, skews)), skews):
        Q = torch.linalg.matrix_exp(A)
        torch.testing.assert_close(H, Q @ G @ Q.mT, rtol=0, atol=1e-12)  # O(1) entries, rounding only


@pytest.mark.parametrize("widths", WIDTHS)
def test_balance_gap_nonnegative_and_zero_exactly_when_balanced(widths):
    rough = random_factors(widths, batch=64, seed=5)
    scale = sum(f.square().sum((-2, -1)) for f in rough)
    gap = balance_gap(rough)
    assert (gap >= -1e-13 * scale).all()  # ≥ 0 up to rounding of the two sums
    assert (gap > 1e-3 * scale).all()  # Gaussian factors are far from balanced
    balanced = balanced_factors(chain(rough), widths, generator=gen(2))
    assert (balance_gap(balanced).abs() <= 1e-12 * scale).all()  # equality at balanced points
    # a symmetric (non-skew) generator leaves the fibre's balanced set: the gap grows, W stays
    g = gen(9)
    sym = [torch.randn(64, d, d, generator=g, dtype=DT) for d in widths[1:-1]]
    pushed = fibre_move(balanced, [0.3 * (A + A.mT) for A in sym])
    assert (balance_gap(pushed) > 1e-6 * scale).all()


@pytest.mark.parametrize("widths", WIDTHS + [[2, 2], [3, 5, 5, 2], [4, 1, 4]])
def test_balanced_factors(widths):
    W = chain(random_factors(widths, seed=11))  # rank ≤ min(widths) by construction
    factors = balanced_factors(W, widths, generator=gen(12))
    assert [tuple(f.shape[-2:]) for f in factors] == [(b, a) for a, b in zip(widths[:-1], widths[1:])]
    scale2 = W.norm(dim=(-2, -1)).max() ** (2 / (len(widths) - 1))  # ‖W_p‖² ~ ‖W‖^{2/N}
    torch.testing.assert_close(chain(factors), W, rtol=0, atol=1e-12 * W.abs().max().item())  # SVD round trip
    for G in balancedness_of(factors):
        assert G.abs().max() <= 1e-10 * scale2


def test_balanced_factors_rejects_rank_above_the_narrowest_width():
    W = with_spectrum([1.0, 0.8, 0.5], 3, 3)
    with pytest.raises(ValueError, match="rank"):
        balanced_factors(W, [3, 2, 3])


# --------------------------------------------------------------------------- conservation laws


def test_conservation_law_count():
    # the standard count d(d+1)/2 per junction for square widths
    assert conservation_law_count([2, 2, 2]) == 3
    assert conservation_law_count([3, 3, 3]) == 6
    assert conservation_law_count([2, 2, 2, 2]) == 6
    # width 1 around a 3-wide layer: G = w₂w₂^T − w₁w₁^T has rank ≤ 2, and the 3×3 symmetric
    # matrices of rank ≤ 2 form a 5-dimensional set
    assert conservation_law_count([1, 3, 1]) == 5
    # no junction, no conserved quantity
    assert conservation_law_count([3, 2]) == 0
    for widths in ([3, 2, 4], [2, 3, 2], [2, 4, 3, 2]):
        count = conservation_law_count(widths)
        entries = sum(d * (d + 1) // 2 for d in widths[1:-1])
        parameters = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        assert 0 < count <= min(entries, parameters)
        assert conservation_law_count(widths, seed=1) == count  # generic points share the rank


def test_closed_form_svd_and_polar_of_2x2_against_lapack():
    """svd_pair / polar_pair (the noise models' 2x2 fast path) against torch.linalg.svd, including
    the degenerate shapes: equal singular values, negative det, rank one, zero, tiny scales.
    Tolerance 1e-13 relative: a few dozen roundings of the atan2/hypot formulas."""
    from dlntorch.geometry import polar_pair, svd_pair
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20000, 2, 2, generator=g, dtype=torch.float64)
    special = torch.tensor([[[1., 0], [0, 1]], [[2, 0], [0, -2]], [[0, 0], [0, 0]], [[1, 2], [2, 4]],
                            [[3, 0], [0, 1e-300]], [[1e-200, 0], [0, 1e-200]], [[0, 1], [-1, 0]],
                            [[0, 1], [1, 0]], [[1e150, 2e150], [3e150, -4e150]]], dtype=torch.float64)
    for A in (M, special):
        U, s, V = svd_pair(A)
        scale = torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-300)[:, None, None]
        eye = torch.eye(2, dtype=torch.float64)
        assert ((U @ torch.diag_embed(s) @ V.mT - A).abs() / scale).max() < 1e-13
        assert (U.mT @ U - eye).abs().max() < 1e-13 and (V.mT @ V - eye).abs().max() < 1e-13
        assert (s[:, 0] >= s[:, 1]).all() and (s >= 0).all()
        assert ((s - torch.linalg.svdvals(A)).abs() / scale[:, 0]).max() < 1e-13
    X, _, Yh = torch.linalg.svd(M)
    assert (polar_pair(M) - X @ Yh).abs().max() < 1e-12      # M invertible almost surely
    # one closed form for the values: the observables' (metrics.singular_values), bit for bit, and
    # an exactly singular M (rank one, zero) has σ_2 = 0 exactly
    from dlntorch.metrics import singular_values
    assert torch.equal(svd_pair(special)[1], singular_values(special))
    assert torch.equal(svd_pair(M)[1], singular_values(M))
    assert (svd_pair(special)[1][2:4, 1] == 0).all()
