"""The Riemannian Langevin equation (RLE) of the free energy, in SVD coordinates: one step of it,
shared by optim=rle (the product, dlntorch.dynamics.rle) and optim.noise=balanced on d×d factors
(the balanced manifold M_0 upstairs, whose image downstairs is the RLE; dlntorch.noise).

    dW = −grad_{g^N} F_β(W) dt + sqrt(2/β) dB^{g^N}   (Itô),   F_β = E − S_N/β,

for square full-rank W. Written in W's own entries (the inverse metric is A_N, the Brownian part's
Itô drift is the Laplacian of the coordinates):

    dW = [−A_N(∇E) + (1/β) U diag(h_i ∂_i S_N + ½ h_i′) V^T] dt + sqrt(2/β) A_N^{1/2}(dB),

W = U diag(s) V^T, h_i = f_N(s_i, s_i) = N s_i^{2−2/N}, ½ h_i′ = (N − 1) s_i^{1−2/N}, and
U^T A_N^{1/2}(Z) V = sqrt(f_N(s_i, s_j)) ∘ U^T Z V. (The Brownian drift has no off-diagonal part in
W's frame: g^N is invariant under W ↦ O W O′^T, and the sign flips O = O′ = diag(±1) fix diag(s).)

The scheme works in the coordinates (r, U, V): r_i = ρ(s_i) with dρ/ds = h(s)^{−1/2}, in which the
singular values' diffusion is additive (r = √N s^{1/N}; N = inf, in τ = N t: r = log s), and
U, V moved by exponentials of generators in their own frame. In these coordinates the metric is
block diagonal, its coefficients depend on s only, and its volume is q(s) dr × Haar with

    log q(s) = Σ_{i<j} log|s_i² − s_j²| − ½ log f_N(s_i, s_j)   (+ S_N's constant),

so Δ_g = (radial part) + Σ_ab M^{ab}(s) X_a X_b with left-invariant fields X_a of O(d) × O(d) and no
first-order rotational term (X_a is divergence-free for Haar measure). Hence

    dr_i = [−∂E/∂r_i + (1/β) ∂ log q/∂r_i] dt + sqrt(2/β) dB_ii,     ∂/∂r_i = sqrt(h_i) ∂/∂s_i,

and the rotations are the frame increments ΔX (off-diagonal) of the W-equation,
ΔX = −dt F ∘ G + sqrt(2 dt/β) sqrt(F) ∘ ξ, G = U^T ∇E V, F_ij = f_N(s_i, s_j), turned into
generators by the first-order SVD perturbation: U ← U e^{Ω_U}, V ← V e^{Ω_V},
(Ω_U)_ij = (ΔX_ij s_j + s_i ΔX_ji)/(s_j² − s_i²), (Ω_V)_ij = (s_i ΔX_ij + ΔX_ji s_j)/(s_j² − s_i²).
Euler–Maruyama in r and exponential (Lie–Euler) steps in O(d) × O(d) reproduce the generator to
O(dt), so the scheme converges weakly to the RLE; its stationary law is e^{−βE} q(s) dr dU dV, i.e.
in the singular values p(s) ∝ e^{−βE} Π_{i<j} |s_i² − s_j²| f_N(s_i,s_j)^{−1/2} Π_i h_i^{−1/2}.

Rules at the edges (stated, never silent):
- singular set: at finite N, r ≥ 0 ↔ s ≥ 0; a proposal r_i < 0 crossed det W = 0 and is
  reflected (r_i ← |r_i|; U, V kept, so det W keeps its sign; the law in r is even, so the
  reflected chain has the same stationary law on r ≥ 0). A step whose proposal has some
  s_i < `threshold` is a *singular hit* (counted per replica by the callers). At N = inf, r = log s
  has no boundary: s never reaches 0 in finite time, and hits only count s_i < threshold.
- collisions s_i = s_j: the coordinates are singular there (the pair repulsion ∂ log q ~ 1/(s_i − s_j)).
  The displacement of the (1/β) ∂ log q term b is tamed, Δr = dt·b/(1 + dt·|b|) (≤ 1 in r per
  step; an O(dt²) change where b is bounded, so the weak order stays 1), and a start with repeated singular
  values is refused by the callers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import (
    Depth,
    entropy_singular_gradient,
    f_inf,
    f_N,
    is_infinite_depth,
    polar_pair,
    rotation_pair,
    svd_pair,
)


@dataclass(frozen=True)
class Clock:
    """The metric in the run's clock: inverse-metric weights F = c·f_N (c = 1: time t; c = 1/N:
    τ = N t, where the RLE is that of N g^N), or F = f_∞ at N = inf (only in τ)."""
    N: Depth
    scale: float = 1.0

    @property
    def infinite(self) -> bool:
        return is_infinite_depth(self.N)

    def weights(self, x: Tensor, y: Tensor) -> Tensor:
        """F(x, y), the factor of U^T A V entrywise (A the inverse metric in this clock)."""
        return f_inf(x, y) if self.infinite else self.scale * f_N(x, y, self.N)

    def radial(self, s: Tensor) -> Tensor:
        """r = ρ(s), dρ/ds = F(s, s)^{−1/2}: r = sqrt(N/c) s^{1/N}; r = log s at N = inf."""
        if self.infinite:
            return torch.log(s)
        return math.sqrt(self.N / self.scale) * s.pow(1.0 / self.N)

    def radial_of(self, s: float) -> float:
        """ρ(s) of a number s ≥ 0 (−inf for s = 0 at N = inf)."""
        if self.infinite:
            return math.log(s) if s > 0 else -math.inf
        return math.sqrt(self.N / self.scale) * s ** (1.0 / self.N)

    def singular(self, r: Tensor) -> Tensor:
        """s = ρ^{−1}(r) (r ≥ 0 at finite N)."""
        if self.infinite:
            return torch.exp(r)
        return (r * math.sqrt(self.scale / self.N)).pow(self.N)


def pair_repulsion(s: Tensor, N: Depth) -> Tensor:
    """∂ log q/∂s_i = Σ_{j≠i} 2 s_i/(s_i² − s_j²) − ∂S_N/∂s_i for singular values s (B, d): the
    Riemannian volume's repulsion (Π|s_i² − s_j²|/f_N, from the rotations) and the entropy's pull."""
    gap = s.unsqueeze(-1).square() - s.unsqueeze(-2).square()          # s_i² − s_j²
    off = ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    repulsion = torch.where(off, 2 * s.unsqueeze(-1) / torch.where(off, gap, torch.ones_like(gap)), 0.0).sum(-1)
    # the entropy's pull grows like s_i^{2/N−1} as s_i → 0 (its r-component, times F_ii^{1/2}, like
    # s_i^{1/N}); f_N's autograd loses it below ~1e-16, so it is taken at s_i ≥ 1e-12 max s
    floor = 1e-12 * s.amax(-1, keepdim=True)
    return repulsion - entropy_singular_gradient(torch.maximum(s, floor), N)


@dataclass
class FrameStep:
    """One step in W's frame: the new singular values, the generators of U and V, and which
    replicas' proposals fell below the threshold (singular hits)."""
    s: Tensor           # (B, d), ≥ 0
    r: Tensor           # (B, d), the radial coordinates of s
    omega_U: Tensor     # (B, d, d) skew: U ← U e^{Ω_U}
    omega_V: Tensor     # (B, d, d) skew: V ← V e^{Ω_V}
    hit: Tensor         # (B,) bool


def frame_step(s: Tensor, energy_slope: Tensor, frame_drift: Tensor, beta: float, dt: float, clock: Clock,
               xi: Tensor, threshold: float = 0.0) -> FrameStep:
    """One Euler–Maruyama/Lie–Euler step of the RLE at W = U diag(s) V^T (module docstring).

    energy_slope (B, d): ∂E/∂r_i (= sqrt(F_ii) G_ii downstairs); frame_drift (B, d, d): the drift of
    the off-diagonal frame entries, −F ∘ G (its diagonal is ignored); xi (B, d, d) standard
    Gaussian (diagonal: radial noise, off-diagonal: frame noise)."""
    d = s.shape[-1]
    eye = torch.eye(d, dtype=torch.bool, device=s.device)
    F = clock.weights(s.unsqueeze(-1), s.unsqueeze(-2))
    speed = F.diagonal(dim1=-2, dim2=-1).sqrt()                         # ds/dr: ∂/∂r = speed ∂/∂s
    volume = speed * pair_repulsion(s, clock.N) / beta                 # (1/β) ∂ log q/∂r
    tamed = dt * volume / (1 + dt * volume.abs())
    r = clock.radial(s) - dt * energy_slope + tamed + math.sqrt(2 * dt / beta) * xi.diagonal(dim1=-2, dim2=-1)
    low = r < clock.radial_of(threshold)                               # a singular hit (before reflection)
    if not clock.infinite:
        r = r.abs()                                                     # reflected at det W = 0
    dX = torch.where(eye, 0.0, dt * frame_drift + math.sqrt(2 * dt / beta) * F.sqrt() * xi)
    S = s.unsqueeze(-1)                                                 # s_i down the rows
    denominator = torch.where(eye, 1.0, s.unsqueeze(-2).square() - S.square())   # s_j² − s_i²
    omega_U = torch.where(eye, 0.0, (dX * s.unsqueeze(-2) + S * dX.mT) / denominator)
    omega_V = torch.where(eye, 0.0, (S * dX + dX.mT * s.unsqueeze(-2)) / denominator)
    return FrameStep(clock.singular(r), r, omega_U, omega_V, low.any(-1))


def rotation(Omega: Tensor) -> Tensor:
    """e^Ω for skew Ω (B, d, d): the plane rotation in closed form at d = 2, else matrix_exp."""
    if Omega.shape[-1] != 2:
        return torch.linalg.matrix_exp(Omega)
    return rotation_pair(-Omega[..., 0, 1])      # Ω = [[0, ω], [−ω, 0]]: e^Ω = R(−ω)


def frame(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W = U diag(s) V^T: (U, s, V) by one batched SVD (in closed form for 2x2: svd_pair)."""
    if W.shape[-2:] == (2, 2):
        return svd_pair(W)
    U, s, Vh = torch.linalg.svd(W)
    return U, s, Vh.mT


def polar(A: Tensor) -> Tensor:
    """The orthogonal polar factor X Y^T of A = X Σ Y^T (in closed form for 2x2: polar_pair)."""
    if A.shape[-2:] == (2, 2):
        return polar_pair(A)
    X, _, Yh = torch.linalg.svd(A)
    return X @ Yh


def rle_step(W: Tensor, gradient: Tensor, beta: float, dt: float, clock: Clock, xi: Tensor,
             threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """One step of the RLE for the product W (B, d, d) with ∇E(W) = gradient: (W', hit (B,))."""
    U, s, V = frame(W)
    G = U.mT @ gradient @ V
    F = clock.weights(s.unsqueeze(-1), s.unsqueeze(-2))
    slope = F.diagonal(dim1=-2, dim2=-1).sqrt() * G.diagonal(dim1=-2, dim2=-1)
    step = frame_step(s, slope, -F * G, beta, dt, clock, xi, threshold)
    U, V = U @ rotation(step.omega_U), V @ rotation(step.omega_V)
    return U @ (step.s.unsqueeze(-1) * V.mT), step.hit


def repeated_singular_values(s: Tensor, rtol: float = 1e-12) -> Tensor:
    """(B,) bool: some s_i = s_j (i ≠ j) to rtol·max s, where the SVD coordinates are singular."""
    gaps = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs()
    off = ~torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    return ((gaps <= rtol * s.amax(-1, keepdim=True).unsqueeze(-1)) & off).flatten(1).any(1)


# ------------------------------------------------------------------ upstairs: the balanced manifold

def orbit_coordinates(factors: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Balanced d×d factors as W_p = Q_p diag(σ) Q_{p−1}^T: ([Q_0, …, Q_N], σ (B, d) ≥ 0).

    Q_1, σ, Q_0 from the SVD of W_1; then Q_p = polar(W_p Q_{p−1}) (= Q_p exactly on M_0, where
    W_p Q_{p−1} = Q_p diag(σ); the polar factor stays accurate at one small σ_i, unlike W_p Q_{p−1} Σ^{−1})."""
    U, sigma, V = frame(factors[0])
    frames = [V, U]
    for W in factors[1:]:
        frames.append(polar(W @ frames[-1]))
    return frames, sigma


def chain_metric(a: Tensor, b: Tensor, N: int) -> Tensor:
    """The Frobenius metric of M_0 on one pair's rotation chain (ω_0, …, ω_N), ω_p = (Ω_p)_ij, at
    σ_i = a, σ_j = b: Σ_p (ω_p b − a ω_{p−1})² + (ω_p a − b ω_{p−1})², an (N+1)×(N+1) tridiagonal
    matrix (shape a.shape + (N+1, N+1)). Its Schur complement on the ends (ω_0, ω_N) is the
    downstairs metric J^T J/f_N(a^N, b^N) of (Ω_V, Ω_U)."""
    ends = torch.ones(N + 1, dtype=a.dtype, device=a.device)
    ends[1:-1] = 2.0
    diagonal = (a * a + b * b).unsqueeze(-1) * ends
    M = torch.diag_embed(diagonal)
    off = (-2 * a * b).unsqueeze(-1).expand(*a.shape, N)
    return M + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def hidden_rotations(sigma: Tensor, omega_V: Tensor, omega_U: Tensor, beta: float, dt: float,
                     xi: Tensor) -> list[Tensor]:
    """Generators Ω_1, …, Ω_{N−1} of the hidden frames, given the ends' Ω_0 = Ω_V and Ω_N = Ω_U.

    Brownian motion on M_0 plus the gradient moves each pair's chain ω by a Gaussian of mean
    −dt M^{−1} ∂_ω L and covariance (2 dt/β) M^{−1} (M = chain_metric; L depends on the ends only).
    The ends' marginal is the downstairs step (frame_step); given the ends, the hidden part is
    Gaussian with mean −M_hh^{−1} M_he ω_e (the horizontal lift) and covariance (2 dt/β) M_hh^{−1}
    (the fibre's own noise). xi: (B, pairs, N − 1) standard Gaussian."""
    N = xi.shape[-1] + 1
    d = sigma.shape[-1]
    i, j = torch.triu_indices(d, d, offset=1, device=sigma.device)
    a, b = sigma[..., i], sigma[..., j]                                     # (B, P)
    hidden = chain_metric(a, b, N)[..., 1:-1, 1:-1]                         # (B, P, N−1, N−1)
    pull = torch.zeros(*a.shape, N - 1, dtype=sigma.dtype, device=sigma.device)
    pull[..., 0] += 2 * a * b * omega_V[..., i, j]                         # −M_he ω_e
    pull[..., -1] += 2 * a * b * omega_U[..., i, j]
    L = torch.linalg.cholesky(hidden)
    mean = torch.cholesky_solve(pull.unsqueeze(-1), L).squeeze(-1)
    noise = torch.linalg.solve_triangular(L.mT, xi.unsqueeze(-1), upper=True).squeeze(-1)
    omega = mean + math.sqrt(2 * dt / beta) * noise                        # (B, P, N−1)
    generators = []
    for p in range(N - 1):
        Omega = torch.zeros(*sigma.shape[:-1], d, d, dtype=sigma.dtype, device=sigma.device)
        Omega[..., i, j] = omega[..., p]
        generators.append(Omega - Omega.mT)
    return generators


def balanced_step(factors: list[Tensor], gradients: list[Tensor], beta: float, dt: float,
                  generator: torch.Generator | None, threshold: float = 0.0) -> tuple[list[Tensor], Tensor]:
    """One step of Brownian motion on M_0 plus −∇L for balanced square factors (B, d, d), from the
    factor gradients D_p = ∂L/∂W_p at them: (new factors, exactly balanced; hit (B,)).

    In orbit coordinates the product is U = Q_N, s = σ^N, V = Q_0, and the radial coordinate is
    r = √N σ (M_0's metric is N|dσ|² on σ). The product moves by the RLE step (frame_step), fed
    with the factors' frame gradients D̃_p = Q_p^T D_p Q_{p−1}: ∂L/∂r_i = Σ_p (D̃_p)_ii/√N, and
    F ∘ G = Σ_p Σ^{N−p} D̃_p Σ^{p−1} (the chain rule's push-forward, Σ = diag σ); the hidden frames by
    hidden_rotations. The factors are rebuilt as Q_p′ diag(σ′) Q_{p−1}′^T: on M_0 to rounding."""
    N = len(factors)
    frames, sigma = orbit_coordinates(factors)
    B, d = sigma.shape
    tilde = [Q.mT @ D @ Qm for D, Q, Qm in zip(gradients, frames[1:], frames[:-1])]
    slope = sum(D.diagonal(dim1=-2, dim2=-1) for D in tilde) / math.sqrt(N)
    push = sum(sigma.pow(N - p).unsqueeze(-1) * D * sigma.pow(p - 1).unsqueeze(-2)
               for p, D in enumerate(tilde, start=1))
    xi = torch.randn(B, d, d, generator=generator, dtype=sigma.dtype, device=sigma.device)
    step = frame_step(sigma.pow(N), slope, -push, beta, dt, Clock(N), xi, threshold)
    pairs = d * (d - 1) // 2
    xi_hidden = torch.randn(B, pairs, N - 1, generator=generator, dtype=sigma.dtype, device=sigma.device)
    generators = [step.omega_V] + hidden_rotations(sigma, step.omega_V, step.omega_U, beta, dt, xi_hidden) \
        + [step.omega_U]
    moved = [Q @ rotation(Omega) for Q, Omega in zip(frames, generators)]
    root = step.r / math.sqrt(N)                                            # σ′ = r′/√N
    return [Q @ (root.unsqueeze(-1) * Qm.mT) for Q, Qm in zip(moved[1:], moved[:-1])], step.hit
