"""The geometry of the deep linear network, batched over a leading replica axis.

Downstairs, the end-to-end matrix W = W_N ⋯ W_1 carries the metric g^N whose inverse is the
operator A_N(Z) = Σ_{j=1}^{N} (WW^T)^{(N−j)/N} Z (W^TW)^{(j−1)/N}; in the full SVD
W = U diag(s) V^T it acts entrywise, U^T A_N(Z) V = f_N(s_i, s_j) ∘ (U^T Z V). Upstairs, the
factors carry the Euclidean metric; the fibre φ⁻¹(W) is a group orbit whose balanced part has
volume exp S_N(W) (the entropy). Formulas: docs/problems.md.

Depth N is a positive integer or math.inf; at N = inf the functions return the limits of the
*rescaled* objects: f_N/N → f_∞ and A_N/N → A_∞ (A_N itself grows like N).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .network import balancedness_of, chain
from .tiny import axis_sum, pair_singular_values

Depth = int | float  # a positive int, or math.inf

# |N l| below this switches f_N's geometric sum to its series (0/0 at l = 0); the series
# truncation error there is (N l/2)^6/5040 < 1e-23, far below float64 rounding.
_SERIES_CUTOFF = 1e-3


def is_infinite_depth(N: Depth) -> bool:
    """Whether N is math.inf (the N → ∞ limit of the rescaled objects)."""
    return isinstance(N, float) and math.isinf(N) and N > 0


def as_depth(N: Depth) -> int:
    """N as an int, with one clear error for anything that is not a positive integer."""
    if isinstance(N, bool) or not isinstance(N, (int, float, np.integer, np.floating)):
        raise ValueError(f"depth N={N!r} must be a positive integer or math.inf")
    if not math.isfinite(N) or float(N) != int(N) or int(N) < 1:
        raise ValueError(f"depth N={N!r} must be a positive integer or math.inf")
    return int(N)


def _as_pair(x, y) -> tuple[Tensor, Tensor]:
    dtype = torch.get_default_dtype()
    x = x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)
    y = y if isinstance(y, Tensor) else torch.as_tensor(y, dtype=x.dtype, device=x.device)
    return torch.broadcast_tensors(x, y)


def _sinhc_series(u: Tensor) -> Tensor:
    """sinh(u)/u for small |u| (the caller guarantees |u| < 1e-3)."""
    u2 = u * u
    return 1 + u2 / 6 + u2 * u2 / 120


def _log_ratio(big: Tensor, small: Tensor) -> Tensor:
    """log(small/big) ≤ 0 for 0 < small ≤ big, to a few ulp relative everywhere.

    Near the diagonal (small ≥ big/2) as log1p of an exact difference: small − big is exact there
    (Sterbenz), where log(small/big) would lose the digits of a ratio near 1. Away from it as
    log(small/big): the ratio is accurate to half an ulp, and log1p of (small − big)/big = −1 + ratio
    would keep only its absolute accuracy (ratio 1e-12: a relative error of 1e-4 in the ratio, which
    made f_N at N = 20 and f_∞ wrong in the sixth digit). A ratio that underflows: log small − log big.
    """
    ratio = small / big
    near, normal = ratio >= 0.5, ratio >= torch.finfo(ratio.dtype).tiny
    one = torch.ones_like(ratio)
    # each branch on safe inputs, so that torch.where never back-propagates 0·inf = NaN (the
    # log1p of −1 that (small − big)/big rounds to below a ratio of 1e-16, or log 0)
    close = torch.log1p(torch.where(near, (small - big) / big, torch.zeros_like(ratio)))
    apart = torch.log(torch.where(normal, ratio, one))
    underflow = torch.log(torch.where(normal, one, small)) - torch.log(torch.where(normal, one, big))
    return torch.where(near, close, torch.where(normal, apart, underflow))      # ratio below 2e-308


def _expm1(x: Tensor) -> Tensor:
    """e^x − 1 for x ≤ 0, with a gradient as accurate as its value: torch differentiates expm1 as
    its result + 1, which for x ≪ 0 is the difference of two numbers near −1 and 1 (e^x = 1e-20:
    a gradient of 0). Below x = −1, e^x − 1 itself: no cancellation there, and exp's gradient."""
    return torch.where(x < -1, torch.exp(x) - 1, torch.expm1(x))


def f_N(x, y, N: Depth) -> Tensor:
    """f_N(x, y) = Σ_{k=0}^{N−1} x^{2k/N} y^{2(N−1−k)/N} = (x² − y²)/(x^{2/N} − y^{2/N}), x, y ≥ 0.

    Special values: f_N(x, x) = N x^{2−2/N}; f_N(x, 0) = x^{2−2/N} (0⁰ = 1); f_N(0, 0) = 0 for
    N ≥ 2; f_1 ≡ 1. N = math.inf returns f_∞ = lim f_N/N (see `f_inf`), not N·f_∞.

    Computed as big^{2−2/N} · Σ_{k<N} e^{k l} with l = (2/N) log(small/big) ≤ 0 and the geometric
    sum written expm1(N l)/expm1(l) (each factor accurate to an ulp, no cancellation), or its
    series N e^{(N−1)l/2} sinhc(N l/2)/sinhc(l/2) near l = 0. O(1) in N, a few ulp everywhere.
    Differentiable wherever both arguments are positive; at a zero argument the value is exact
    and the gradient finite (not NaN) but it is only a one-sided derivative of f_N.
    """
    if is_infinite_depth(N):
        return f_inf(x, y)
    N = as_depth(N)
    x, y = _as_pair(x, y)
    if N == 1:
        return torch.ones_like(x)
    big, small = torch.maximum(x, y), torch.minimum(x, y)
    interior = small > 0
    # Every branch gets safe inputs, so that torch.where never back-propagates 0·inf = NaN.
    safe_big = torch.where(interior, big, torch.ones_like(big))
    safe_small = torch.where(interior, small, torch.full_like(small, 0.5))
    # ℓ = (2/N) log(small/big) ≤ 0, and f_N = big^{2−2/N} Σ_{j<N} e^{jℓ} (a geometric sum)
    ell = (2.0 / N) * _log_ratio(safe_big, safe_small)
    near = (N * ell).abs() < _SERIES_CUTOFF
    l_far = torch.where(near, torch.full_like(ell, -1.0), ell)
    l_near = torch.where(near, ell, torch.zeros_like(ell))
    geometric = torch.where(
        near,
        N * torch.exp((N - 1) * l_near / 2) * _sinhc_series(N * l_near / 2) / _sinhc_series(l_near / 2),
        _expm1(N * l_far) / _expm1(l_far),
    )
    # small = 0: the only surviving term is big^{2−2/N} (0⁰ = 1); big = 0 gives 0 for N ≥ 2.
    geometric = torch.where(interior, geometric, torch.ones_like(geometric))
    return big.pow(2.0 - 2.0 / N) * geometric


def f_inf(x, y) -> Tensor:
    """f_∞(x, y) = (x² − y²)/log(x²/y²), the logarithmic mean of x² and y² (x, y ≥ 0).

    f_∞ = lim_{N→∞} f_N/N; f_∞(x, x) = x², f_∞(x, 0) = f_∞(0, 0) = 0. Computed as
    big² · expm1(λ)/λ with λ = 2 log(small/big) ≤ 0 (series e^{λ/2} sinhc(λ/2) near λ = 0),
    so near-equal arguments do not cancel.
    """
    x, y = _as_pair(x, y)
    big, small = torch.maximum(x, y), torch.minimum(x, y)
    interior = small > 0
    safe_big = torch.where(interior, big, torch.ones_like(big))
    safe_small = torch.where(interior, small, torch.full_like(small, 0.5))
    lam = 2.0 * _log_ratio(safe_big, safe_small)
    near = lam.abs() < _SERIES_CUTOFF
    lam_far = torch.where(near, torch.full_like(lam, -1.0), lam)
    lam_near = torch.where(near, lam, torch.zeros_like(lam))
    mean = torch.where(
        near,
        torch.exp(lam_near / 2) * _sinhc_series(lam_near / 2),
        _expm1(lam_far) / lam_far,
    )
    # A zero argument makes the logarithmic mean vanish: (x² − 0)/log(x²/0) = 0.
    return torch.where(interior, big.square() * mean, torch.zeros_like(big))


def pair_function(N: Depth) -> Callable[[Tensor, Tensor], Tensor]:
    """(x, y) ↦ f_N(x, y), or f_∞ = lim f_N/N at N = inf (the pair weight of A_N and of S_N)."""
    return f_inf if is_infinite_depth(N) else (lambda x, y: f_N(x, y, N))


def entropy_singular_gradient(s: Tensor, N: Depth) -> Tensor:
    """∂S_N/∂s_i = ½ Σ_{j≠i} ∂_1 log f_N(s_i, s_j) for singular values s (B, d) > 0; shape (B, d).

    N = math.inf: the derivative of S̃_∞ = ½ Σ_{i<j} log f_∞(s_i, s_j) (the W-dependent part of S_N
    as N → ∞; see dlntorch.dynamics.free_energy). N = 1: zeros (S_1 = 0). Shared by the
    free-energy flow and the Riemannian Langevin equation (dlntorch.rle).
    """
    d = s.shape[-1]
    if d == 1 or (not is_infinite_depth(N) and as_depth(N) == 1):
        return torch.zeros_like(s)
    pair = pair_function(N)
    with torch.enable_grad():
        x = s.detach().clone().requires_grad_(True)
        i, j = torch.triu_indices(d, d, offset=1, device=s.device)
        half_log = 0.5 * torch.log(pair(x[..., i], x[..., j])).sum()
        (grad,) = torch.autograd.grad(half_log, x)
    return grad


# --------------------------------------------------------------------------- the metric operator


def _drop_noise(s: Tensor, shape: Sequence[int], rtol: float | None) -> Tensor:
    """Singular values s (descending) of W of `shape` (…, m, n) with those below rtol·s_max set to exactly 0.

    Below the default rtol = max(m, n)·eps (the usual numerical-rank cut) a singular value is
    rounding noise of a backward-stable SVD, and s^{2/N} would amplify that noise
    (1e-16 ↦ 2e-11 at N = 3); every function of s^{1/N} here cuts it the same way.
    """
    if rtol is None:
        rtol = max(shape[-2:]) * torch.finfo(s.dtype).eps
    return torch.where(s > rtol * s[..., :1], s, torch.zeros_like(s))


def _padded_spectrum(W: Tensor, rtol: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full SVD W = U diag(s) V^T with s zero-padded to the row count and to the column count."""
    m, n = W.shape[-2:]
    U, s, Vh = torch.linalg.svd(W, full_matrices=True)
    s = _drop_noise(s, W.shape, rtol)
    rows = torch.nn.functional.pad(s, (0, m - s.shape[-1]))
    cols = torch.nn.functional.pad(s, (0, n - s.shape[-1]))
    return U, rows, cols, Vh.mT


def _spectral_weights(W: Tensor, N: Depth, rtol: float | None):
    U, rows, cols, V = _padded_spectrum(W, rtol)
    return U, f_N(rows[..., :, None], cols[..., None, :], N), V


def metric_operator(W: Tensor, Z: Tensor, N: Depth, rtol: float | None = None) -> Tensor:
    """A_N(Z) = Σ_{j=1}^{N} (WW^T)^{(N−j)/N} Z (W^TW)^{(j−1)/N}, as U^T A_N(Z) V = f_N(s_i, s_j) ∘ U^T Z V.

    W, Z: (B, m, n), any shape and rank (0⁰ = 1: the zero singular values of the padded SVD
    contribute through f_N(s, 0)). N = math.inf gives A_∞(Z) = ∫₀¹ (WW^T)^{1−τ} Z (W^TW)^τ dτ
    = lim A_N/N. rtol: the cut below which singular values count as 0 (see `_drop_noise`).
    Not meant for autograd through W (full-matrices SVD).
    """
    U, F, V = _spectral_weights(W, N, rtol)
    return U @ (F * (U.mT @ Z @ V)) @ V.mT


def metric_norm(W: Tensor, Z: Tensor, N: Depth, rtol: float | None = None) -> Tensor:
    """g^N_W(Z, Z) = ⟨A_N^{-1} Z, Z⟩ = Σ_ij (U^T Z V)_ij² / f_N(s_i, s_j), shape (B,).

    Finite for full-rank W (square or rectangular) and finite N; at N = inf rectangular W has
    f_∞(s, 0) = 0 and the norm is infinite off the row/column space.
    """
    U, F, V = _spectral_weights(W, N, rtol)
    return ((U.mT @ Z @ V).square() / F).sum(dim=(-2, -1))


def _psd_powers(S: Tensor, exponents: Sequence[float], cutoff: float) -> list[Tensor]:
    """S^α for symmetric PSD S and each α, eigenvalues below cutoff·max set to 0 (0⁰ = 1)."""
    lam, Q = torch.linalg.eigh(S)
    lam = lam.clamp_min(0)
    lam = torch.where(lam > cutoff * lam[..., -1:], lam, torch.zeros_like(lam))
    return [(Q * lam.pow(alpha).unsqueeze(-2)) @ Q.mT for alpha in exponents]


def metric_operator_by_powers(
    W: Tensor, Z: Tensor, N: Depth, cutoff: float = 1e-12, nodes: int = 64
) -> Tensor:
    """A_N(Z) as the matrix-power sum (reference implementation, used to test `metric_operator`).

    Finite N: Σ_{j=1}^{N} (WW^T)^{(N−j)/N} Z (W^TW)^{(j−1)/N} by eigh. N = math.inf: the integral
    ∫₀¹ (WW^T)^{1−τ} Z (W^TW)^τ dτ by `nodes`-point Gauss–Legendre (the integrand is entire in τ,
    so the rule converges geometrically once nodes exceeds the log-ratio of the eigenvalues).
    """
    left, right = W @ W.mT, W.mT @ W
    if is_infinite_depth(N):
        tau, weight = np.polynomial.legendre.leggauss(nodes)
        tau, weight = (tau + 1) / 2, weight / 2  # [−1, 1] → [0, 1]
        lefts = _psd_powers(left, [1 - t for t in tau], cutoff)
        rights = _psd_powers(right, list(tau), cutoff)
        return sum(w * (L @ Z @ R) for w, L, R in zip(weight, lefts, rights))
    N = as_depth(N)
    powers = [k / N for k in range(N)]
    lefts, rights = _psd_powers(left, powers, cutoff), _psd_powers(right, powers, cutoff)
    return sum(lefts[N - j] @ Z @ rights[j - 1] for j in range(1, N + 1))


# ------------------------------------------------------------------------- entropy, free energy


def log_orbit_volume(d: int) -> float:
    """log c_d, c_d = vol(O_d) = 2^{d(d−1)/4} Π_{k=1}^{d} 2π^{k/2}/Γ(k/2).

    The volume of the orthogonal group (both components) in the Frobenius metric
    ⟨Ω, Ω'⟩ = tr(Ω^T Ω'): Π vol(S^{k−1}) is the volume for ½ tr, and each of the d(d−1)/2
    directions stretches by √2. c_1 = 2, c_2 = 4√2 π, c_3 = 32√2 π².
    """
    if int(d) != d or d < 1:
        raise ValueError(f"d={d!r} must be a positive integer")
    spheres = sum(math.log(2) + (k / 2) * math.log(math.pi) - math.lgamma(k / 2) for k in range(1, d + 1))
    return d * (d - 1) / 4 * math.log(2) + spheres


def orbit_volume(d: int) -> float:
    """c_d = vol(O_d) in the Frobenius metric; see `log_orbit_volume`."""
    return math.exp(log_orbit_volume(d))


def entropy(W: Tensor, N: Depth, rtol: float | None = None, singular_values: Tensor | None = None) -> Tensor:
    """S_N(W) = (N−1) log c_d + ½ Σ_{i<j} log f_N(s_i, s_j) for square W (B, d, d), shape (B,).

    Normalisation: exp S_N is the volume of the balanced fibre {W_p = Q_p Σ^{1/N} Q_{p−1}^T :
    Q_1, …, Q_{N−1} ∈ O_d} (Q_0 = V, Q_N = U fixed) in the Euclidean metric Σ_p ‖δW_p‖_F² of
    the factors, with O_d carrying the Frobenius metric of `log_orbit_volume`. Derivation: the
    orbit map is equivariant, so its volume is c_d^{N−1} √det Gram at one point; the Gram splits
    into one (N−1)×(N−1) tridiagonal block per pair i < j with diagonal σ_i² + σ_j² and
    off-diagonal −σ_iσ_j (σ = s^{1/N}), whose determinant is f_N(s_i, s_j). The identity holds
    for repeated singular values too. At rank d−1 the formula stays finite (f_N(s, 0) > 0);
    two or more zero singular values (cut as in `_drop_noise`) give −inf (N ≥ 2). N = 1 gives 0.
    """
    d = W.shape[-1]
    if W.shape[-2] != d:
        raise ValueError(f"entropy needs square W, got shape {tuple(W.shape[-2:])}")
    if is_infinite_depth(N):
        raise ValueError("entropy S_N needs a finite depth N: (N−1) log c_d diverges as N → ∞")
    N = as_depth(N)
    s = _drop_noise(torch.linalg.svdvals(W) if singular_values is None else singular_values, W.shape, rtol)
    i, j = torch.triu_indices(d, d, offset=1, device=W.device)
    pairs = f_N(s[..., i], s[..., j], N)
    return (N - 1) * log_orbit_volume(d) + 0.5 * axis_sum(torch.log(pairs))


def free_energy(W: Tensor, energy: Tensor | Callable[[Tensor], Tensor], beta, N: Depth) -> Tensor:
    """F_β(W) = E(W) − S_N(W)/β, shape (B,). energy: the values E(W) (B,) or a callable W ↦ E(W)."""
    values = energy(W) if callable(energy) else energy
    return values - entropy(W, N) / beta


# ------------------------------------------------------------------------ fibres and balance


def balance_gap(factors: Sequence[Tensor], rtol: float | None = None,
                singular_values: Tensor | None = None) -> Tensor:
    """δ = Σ_p ‖W_p‖_F² − N Σ_i s_i^{2/N}, s the singular values of W = W_N ⋯ W_1; shape (B,).

    N Σ s_i^{2/N} is the minimum of Σ‖W_p‖² over the fibre of W, attained exactly at the
    balanced factorisations, so δ ≥ 0 (up to rounding) with equality iff balanced. Singular
    values below the noise cut of `_drop_noise` count as 0 (a rank-r product of narrow layers).
    `singular_values` of the product, when the caller has them, save an SVD.
    """
    N = len(factors)
    shape = (*factors[0].shape[:-2], factors[-1].shape[-2], factors[0].shape[-1])    # W's
    s = torch.linalg.svdvals(chain(factors)) if singular_values is None else singular_values
    s = _drop_noise(s, shape, rtol)
    norms = sum(axis_sum(factor.square().flatten(-2)) for factor in factors)
    return norms - N * axis_sum(s.pow(2.0 / N))


def exp_pair(A: Tensor) -> tuple[Tensor, Tensor]:
    """(expm(A), expm(−A)) for a batch of square A (…, d, d).

    d = 2 in closed form (a dozen elementwise ops instead of two Padé evaluations, 20x faster at
    B = 4096): A = cI + Z with c = tr A / 2 and Z traceless, Z² = q I with q = −det Z, so
    expm(±A) = e^{±c} (C(q) I ± S(q) Z) with C = cosh √q, S = sinh √q / √q (cos, sin for q < 0;
    S(0) = 1). Both share C and S, so expm(A) expm(−A) = (C² − q S²) I = I to rounding. Other d
    take torch.linalg.matrix_exp."""
    if A.shape[-1] != 2:
        return torch.linalg.matrix_exp(A), torch.linalg.matrix_exp(-A)
    c = 0.5 * (A[..., 0, 0] + A[..., 1, 1])
    Z = A - c[..., None, None] * torch.eye(2, dtype=A.dtype, device=A.device)
    q = Z[..., 0, 0] ** 2 + Z[..., 0, 1] * Z[..., 1, 0]            # −det Z (Z[1,1] = −Z[0,0])
    r = q.abs().sqrt()
    safe = torch.where(r > 0, r, torch.ones_like(r))
    C = torch.where(q >= 0, torch.cosh(r), torch.cos(r))
    S = torch.where(r > 0, torch.where(q >= 0, torch.sinh(safe), torch.sin(safe)) / safe, torch.ones_like(r))
    identity = C[..., None, None] * torch.eye(2, dtype=A.dtype, device=A.device)
    along = S[..., None, None] * Z
    ahead = torch.exp(c)[..., None, None] * (identity + along)
    behind = torch.exp(-c)[..., None, None] * (identity - along)
    return ahead, behind


def svd_pair(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD M = U diag(s) V^T of 2x2 matrices (B, 2, 2) in closed form: (U, s, V), s₁ ≥ s₂ ≥ 0.

    Why: torch's batched SVD of 2x2 matrices is LAPACK called per matrix, most of a noise step's
    cost at B = 4096. With E = (m₁₁ + m₂₂)/2, F = (m₁₁ − m₂₂)/2, G = (m₂₁ + m₁₂)/2, H = (m₂₁ − m₁₂)/2,
    M = R(φ) diag(Q + R′, Q − R′) R(−θ) with Q = √(E² + H²), R′ = √(F² + G²), φ ± θ = atan2(H, E),
    atan2(G, F) (the decomposition into a rotation-scaling and a reflection-scaling part), R(α)
    the rotation by α; a negative second value (det M < 0) is made positive by flipping V's column."""
    E, F = (M[..., 0, 0] + M[..., 1, 1]) / 2, (M[..., 0, 0] - M[..., 1, 1]) / 2
    G, H = (M[..., 1, 0] + M[..., 0, 1]) / 2, (M[..., 1, 0] - M[..., 0, 1]) / 2
    Q, R = torch.hypot(E, H), torch.hypot(F, G)
    a1, a2 = torch.atan2(G, F), torch.atan2(H, E)
    phi, theta = (a2 + a1) / 2, (a2 - a1) / 2
    sign = torch.where(Q < R, -1.0, 1.0).to(M.dtype)      # Q² − R² = det M < 0: V's column flipped
    U = rotation_pair(phi)
    V = rotation_pair(-theta) * torch.stack([torch.ones_like(sign), sign], -1).unsqueeze(-2)
    # s by tiny.pair_singular_values: σ_1 = Q + R, and σ_2 = |det M|/σ_1 rather than |Q − R|
    # (exactly 0 for a singular M, where |Q − R| leaves a rounding error)
    return U, torch.stack(pair_singular_values(M), -1), V


def rotation_pair(angle: Tensor) -> Tensor:
    """The plane rotations R(α) = [[cos α, −sin α], [sin α, cos α]] of angles (…,): (…, 2, 2)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def polar_pair(A: Tensor) -> Tensor:
    """The orthogonal polar factor of 2x2 matrices (B, 2, 2) in closed form: A + sign(det A)·cof(A)
    is a multiple of it (its columns are orthogonal with equal norms), normalised; the same as
    X Yᵀ from the SVD A = X Σ Yᵀ wherever A is invertible."""
    a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
    flip = (a * d - b * c) < 0
    p = torch.where(flip, a - d, a + d)
    q = torch.where(flip, b + c, b - c)
    norm = torch.hypot(p, q)
    p, q = p / norm, q / norm
    first = torch.stack([p, torch.where(flip, q, -q)], -1)       # the first column (p, ∓q)
    second = torch.stack([q, torch.where(flip, -p, p)], -1)      # the second column (q, ±p)
    return torch.stack([first, second], -1)


def fibre_move(factors: Sequence[Tensor], generators: Sequence[Tensor]) -> list[Tensor]:
    """W_p ← expm(A_p) W_p expm(−A_{p−1}), A_0 = A_N = 0; generators = [A_1, …, A_{N−1}].

    A_p: (B, d_p, d_p) or broadcastable. Consecutive factors meet as expm(−A_p) expm(A_p) = I,
    so the product is unchanged to rounding. Skew A_p act by orthogonal Q_p, G_p ↦ Q_p G_p Q_p^T,
    so they keep balanced points balanced; general A_p move along the whole GL fibre.
    """
    N = len(factors)
    if len(generators) != N - 1:
        raise ValueError(f"fibre_move needs N−1 = {N - 1} generators, got {len(generators)}")
    ahead, behind = zip(*(exp_pair(A) for A in generators)) if generators else ((), ())
    moved = []
    for p, factor in enumerate(factors):  # factor is W_{p+1}: left by A_{p+1}, right by A_p
        if p < N - 1:
            factor = ahead[p] @ factor
        if p > 0:
            factor = factor @ behind[p - 1]
        moved.append(factor)
    return moved


def haar_semi_orthogonal(
    batch: int, rows: int, cols: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """B Haar-distributed rows×cols matrices with orthonormal columns (rows ≥ cols) or rows:
    QR of a Gaussian with R's diagonal made positive (without that fix QR is not Haar)."""
    big, small = max(rows, cols), min(rows, cols)
    G = torch.randn(batch, big, small, generator=generator, dtype=dtype, device=device)
    Q, R = torch.linalg.qr(G)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    Q = Q * signs.unsqueeze(-2)
    return Q if rows >= cols else Q.mT


def haar_orthogonal(
    batch: int, d: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """B Haar-distributed orthogonal d×d matrices."""
    return haar_semi_orthogonal(batch, d, d, generator=generator, dtype=dtype, device=device)


def balanced_factors(
    W: Tensor, widths: Sequence[int], generator: torch.Generator | None = None
) -> list[Tensor]:
    """A random point of the balanced fibre of W (B, d_N, d_0): W_p = Q_p Σ_p^{1/N} Q_{p−1}^T.

    W = U Σ V^T (full SVD), Q_0 = V, Q_N = U, hidden Q_p Haar on O(d_p) (drawn with `generator`);
    Σ_p^{1/N} is d_p × d_{p−1} with s_1^{1/N}, …, s_r^{1/N} on its diagonal, r = min(widths), and
    zeros elsewhere. Then every W_p W_p^T = W_{p+1}^T W_{p+1} = Q_p diag(s^{2/N}, 0…) Q_p^T, so
    G_p = 0 to rounding, and the product is W. Raises if W's rank exceeds the narrowest width.
    """
    widths = [int(w) for w in widths]
    N = len(widths) - 1
    if N < 1 or (W.shape[-2], W.shape[-1]) != (widths[-1], widths[0]):
        raise ValueError(f"W of shape {tuple(W.shape[-2:])} does not match widths {widths} (d_N × d_0)")
    B = W.shape[0]
    U, s, Vh = torch.linalg.svd(W, full_matrices=True)
    r = min(widths)
    if s.shape[-1] > r and bool((s[..., r:] > 1e-10 * s[..., :1].clamp_min(1e-300)).any()):
        raise ValueError(f"W has rank above the narrowest width {r} of widths {widths}")
    root = s[..., :r].pow(1.0 / N)
    frames = [Vh.mT]
    frames += [haar_orthogonal(B, d, generator=generator, dtype=W.dtype, device=W.device) for d in widths[1:-1]]
    frames += [U]
    factors = []
    for p in range(1, N + 1):
        sigma = torch.zeros(B, widths[p], widths[p - 1], dtype=W.dtype, device=W.device)
        sigma[..., range(r), range(r)] = root
        factors.append(frames[p] @ sigma @ frames[p - 1].mT)
    return factors


# ------------------------------------------------------------------------- conservation laws


def conservation_law_count(widths: Sequence[int], seed: int = 0, rtol: float = 1e-9) -> int:
    """Number of functionally independent conserved quantities among the entries of the G_p.

    The gradient flow conserves every G_p = W_{p+1}^T W_{p+1} − W_p W_p^T for any E; the count
    is the rank of the Jacobian of the upper triangles of all G_p (G_p is symmetric) with
    respect to all factor entries at a random point (float64, singular values above
    rtol·s_max). For two-layer linear networks these are all the conservation laws
    (Marcotte–Gribonval–Peyré 2023); in general the count is a lower bound.
    """
    widths = [int(w) for w in widths]
    if len(widths) < 3:
        return 0  # depth 1: no junction, no G_p
    gen = torch.Generator().manual_seed(seed)
    shapes = [(d_out, d_in) for d_in, d_out in zip(widths[:-1], widths[1:])]
    sizes = [a * b for a, b in shapes]
    point = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)

    def upper_triangles(flat: Tensor) -> Tensor:
        factors = [piece.reshape(1, *shape) for piece, shape in zip(flat.split(sizes), shapes)]
        entries = [G[0][tuple(torch.triu_indices(*G.shape[-2:]))] for G in balancedness_of(factors)]
        return torch.cat(entries) if entries else flat.new_zeros(0)

    J = torch.autograd.functional.jacobian(upper_triangles, point)
    if J.numel() == 0:
        return 0
    s = torch.linalg.svdvals(J)
    return int((s > rtol * s[0]).sum())
