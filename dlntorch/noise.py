"""Noise models: the stochastic term a Langevin update composes with its drift (diffrax's
separate noise terms). Each is registered by name (`optim.noise`) next to its code.

A term adds σ·(its noise) to the factors [W_1, …, W_N] in place, σ = sqrt(2 lr/β), drawing from
`generator`. `add_` gets the factors in whatever layout the caller works in; the draws are always
made in the factors' own shape (B, d_p, d_{p−1}) — into `draws` buffers when given, moved onto the
layout by `view` — so every layout draws the same numbers in the same order.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, fail, resolve_depth
from .fibre import fibre_brownian_step, tangential_part
from .geometry import fibre_move
from .network import chain
from .registry import Registry

NOISES = Registry("optim.noise")

View = Callable[[Tensor], Tensor]


def same(x: Tensor) -> Tensor:
    """The view of the factors' own layout."""
    return x


class NoiseTerm:
    """The interface. `any_layout`: whether the term works on the fast path's other layouts.
    `whole_step`: the term moves the factors by drift and noise together (`step_`), in coordinates
    of its own, instead of adding noise after the caller's gradient step (`add_`)."""

    any_layout = True
    whole_step = False

    def check_start(self, factors: Sequence[Tensor]) -> None:
        """Refuse (ConfigError) a start the model cannot run from; most models take any."""

    def step_(self, factors: Sequence[Tensor], grads: Sequence[Tensor], lr: float, beta: float,
              generator: torch.Generator | None, state: dict) -> None:
        """One whole step from the factor gradients (`whole_step` terms); `state` is the
        optimizer's state for the first factor (checkpointed with it)."""
        raise NotImplementedError

    def add_(self, factors: Sequence[Tensor], scale: float, generator: torch.Generator | None,
             draws: Sequence[Tensor] | None = None, view: View = same) -> None:
        raise NotImplementedError


@NOISES.register("isotropic")
class Isotropic(NoiseTerm):
    """ξ ~ N(0, I) in every entry of every factor: the Euler–Maruyama step of
    dW = −∇L dt + sqrt(2/β) dB, whose stationary law is ∝ e^{−βL} (up to O(lr))."""

    def add_(self, factors, scale, generator, draws=None, view=same):
        for i, p in enumerate(factors):
            if draws is None:
                xi = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            else:
                xi = view(torch.randn(draws[i].shape, generator=generator, out=draws[i]))
            p.add_(xi, alpha=scale)


def _needs_a_fibre(cfg: Any) -> None:
    if resolve_depth(cfg.model) < 2:
        fail("optim.noise", cfg.optim.noise, "depth 1 has no fibre to move along; use depth ≥ 2 or isotropic")


def _gaussian_like(factors: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
    return [torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device) for f in factors]


@NOISES.register("gl_walk", check=_needs_a_fibre)
class GLWalk(NoiseTerm):
    """A random walk of the group acting on the fibre (problem 7): W_p ← e^{σA_p} W_p e^{−σA_{p−1}}
    (A_0 = A_N = 0) with A_p ∈ gl(d_p) of i.i.d. N(0, 1) entries, σ = sqrt(2 lr/β). Exact group
    moves: the product stays where the drift put it, only the balancedness G_p is noisy.

    As lr → 0 it converges to the Brownian motion of the group GL(d_1) × ⋯ × GL(d_{N−1}) (in the
    left-invariant metric of the Frobenius inner product on gl) pushed onto the orbit — not the
    fibre's own Brownian motion in the metric induced from upstairs (`fibre_brownian`): the
    generator's size is fixed in gl, so where the factors are large the walk is fast in W. The GL
    orbits are non-compact, and the walk spreads along them without bound. The factors must be
    the chain [W_1, …, W_N] in order, in the batch layout (a matrix exponential per hidden layer)."""

    any_layout = False

    def add_(self, factors, scale, generator, draws=None, view=same):
        generators = [scale * torch.randn(f.shape[:-2] + (f.shape[-2], f.shape[-2]), generator=generator,
                                          dtype=f.dtype, device=f.device) for f in factors[:-1]]
        for p, moved in zip(factors, fibre_move([f.detach() for f in factors], generators)):
            p.copy_(moved)


def _deprecated_fibre(cfg: Any) -> None:
    warnings.warn("optim.noise=fibre is deprecated: the same model is now called optim.noise=gl_walk "
                  "(a random walk of the group; see fibre_brownian for the fibre's own Brownian motion)",
                  FutureWarning, stacklevel=2)
    _needs_a_fibre(cfg)


NOISES.register("fibre", check=_deprecated_fibre)(GLWalk)   # the old name of gl_walk


def _check_kappa(cfg: Any) -> None:
    if resolve_depth(cfg.model) < 2:
        fail("optim.noise", cfg.optim.noise, "depth 1 has no fibre, so tangential noise is isotropic; use depth ≥ 2")
    kappa = cfg.optim.get("kappa")
    if kappa is not None and not (isinstance(kappa, (int, float)) and 0 <= kappa <= 1):
        fail("optim.kappa", kappa, "it must be a number in [0, 1] (0: purely tangential, 1: isotropic)")


@NOISES.register("tangential", check=_check_kappa)
class Tangential(NoiseTerm):
    """The general principle of the lecture series (Menon), in Itô form:

        d𝐖 = −∇L dt + sqrt(2/β) (P_𝐖 dB + √κ P_𝐖^⊥ dB),

    P_𝐖 the orthogonal projection onto the tangent space T_𝐖 of the fibre φ⁻¹(W) (dlntorch.fibre:
    τ(A) for the minimum-norm generator A, a batched solve of the normal equations of the tangent
    map τ: A ↦ (A_p W_p − W_p A_{p−1})_p, with the SVD of τ where they are ill conditioned). κ = 1 is isotropic, κ = 0
    noise purely tangential to the fibre. Euler–Maruyama: the projection is taken at the point
    the increment starts from (after the drift, which changes it by O(lr): the same Itô limit).
    Every increment is tangential at κ = 0, yet the product moves, at second order along the
    fibre's mean curvature: E[ΔW] = (lr/β) Σ_i D²φ(e_i, e_i) for an orthonormal basis e_i of T_𝐖.
    That drift is the entropic force downstairs; it is measured, not removed."""

    any_layout = False

    def __init__(self, kappa: float | None = None):
        self.kappa = 0.0 if kappa is None else float(kappa)

    def add_(self, factors, scale, generator, draws=None, view=same):
        xi = _gaussian_like(factors, generator)
        for p, d in zip(factors, tangential_part([f.detach() for f in factors], xi, self.kappa)):
            p.add_(d, alpha=scale)


@NOISES.register("fibre_brownian", check=_needs_a_fibre)
class FibreBrownian(NoiseTerm):
    """Brownian motion intrinsic to the fibre, the Stratonovich SDE d𝐖 = sqrt(2/β) P_𝐖 ∘ dB (in the
    metric the fibre inherits from upstairs), integrated by exact group moves with the generator
    taken at the midpoint (dlntorch.fibre.fibre_brownian_step, whose docstring says why that
    scheme has the Stratonovich limit). The product never moves (to rounding); with a drift, it
    moves by the drift alone. Needs a full-rank start: at a rank-deficient product the fibre is
    not the orbit and the frame's rank changes."""

    any_layout = False

    def check_start(self, factors: Sequence[Tensor]) -> None:
        _full_rank_product("fibre_brownian", factors)

    def add_(self, factors, scale, generator, draws=None, view=same):
        xi = _gaussian_like(factors, generator)
        for p, moved in zip(factors, fibre_brownian_step([f.detach() for f in factors], xi, scale)):
            p.copy_(moved)


def _full_rank_product(name: str, factors: Sequence[Tensor], rtol: float = 1e-8) -> None:
    """Refuse a start whose product is rank-deficient in some replica (σ_min ≤ rtol · σ_max)."""
    s = torch.linalg.svdvals(chain([f.detach() for f in factors]))
    low = s[:, -1] <= rtol * s[:, 0]
    if bool(low.any()):
        raise ConfigError(f"optim.noise={name} is not allowed from this start: {int(low.sum())} replica(s) have a "
                          f"rank-deficient product (σ_min ≤ {rtol:g} σ_max), where the fibre is not one orbit; "
                          "start from full rank (e.g. a larger init.scale).")


def _balanced_factors(cfg: Any) -> None:
    from .tasks import task_shape
    if resolve_depth(cfg.model) < 2:
        fail("optim.noise", cfg.optim.noise, "depth 1 has no balance to keep; use depth ≥ 2")
    m, n = task_shape(cfg.task)
    widths = cfg.model.get("widths")
    if m != n or (widths is not None and any(int(w) != m for w in widths)):
        fail("optim.noise", cfg.optim.noise, f"it needs square factors of one width d (the orbit coordinates "
             f"W_p = Q_p Σ^{{1/N}} Q_{{p−1}}^T of M_0), and the task is {m}x{n}"
             + ("" if widths is None else f" with model.widths={list(widths)}"))
    if cfg.optim.weight_decay and m > 1:
        fail("optim.weight_decay", cfg.optim.weight_decay, "optim.noise=balanced on d×d factors moves by L alone "
             "(the RLE of F_β downstairs); use optim.weight_decay=0")


@NOISES.register("balanced", check=_balanced_factors)
class Balanced(NoiseTerm):
    """Brownian motion on the balanced manifold M_0 (Frobenius metric) plus the gradient, whose
    image downstairs is the Riemannian Langevin equation of F_β = E − S_N/β (optim=rle). Integrated
    in orbit coordinates, which keep M_0 exactly.

    1x1 factors: M_0 is the line w_p = ε_p u (ε_p = ±1 fixed), the gradient of a balanced point is
    along it, and the SDE is du = −(1/N) ∂_u L dt + sqrt(2/(βN)) dB — so the noise is ξ projected on
    the unit vector e = ε/√N after the caller's gradient step, and the state is projected back on
    the line (removing rounding). Its stationary density in u is ∝ e^{−βE(u^N)} du exactly (u crosses
    0 along its line), while Euler–Maruyama on w = u^N, whose diffusion sqrt(2N/β)|w|^{1−1/N}
    degenerates at w = 0, is biased there.

    d×d factors (a whole step, dlntorch.rle.balanced_step): W_p = Q_p diag(σ) Q_{p−1}^T; the product
    (U = Q_N, s = σ^N, V = Q_0) moves by the RLE's step (the same rule as optim=rle, fed by the
    factor gradients), the hidden frames Q_1 … Q_{N−1} by the horizontal lift of its rotation plus
    the fibre's own Gaussian noise, and the factors are rebuilt exactly balanced. Its singular-set
    rule is the RLE's (σ_i reflected at 0, singular hits counted per replica as `singular_hits`).
    Needs a balanced, full-rank start with distinct singular values."""

    any_layout = False

    def __init__(self, threshold: float = 1e-6):
        self.threshold = threshold

    def check_start(self, factors: Sequence[Tensor]) -> None:
        factors = [f.detach() for f in factors]
        self.whole_step = factors[0].shape[-1] > 1       # d×d: whole steps; 1x1: noise after the gradient step
        if not self.whole_step:
            magnitudes = torch.cat([f.abs().flatten(1) for f in factors], dim=1)   # (B, N)
            spread = float((magnitudes.max(1).values - magnitudes.min(1).values).max())
            if spread > 1e-10 * max(float(magnitudes.max()), 1e-300):
                raise ConfigError("optim.noise=balanced is not allowed from an unbalanced start: it moves on the "
                                  f"balanced manifold M_0 (|w_1| = … = |w_N|), and max_p |w_p| − min_p |w_p| = "
                                  f"{spread:.3g}; use init=balanced.")
            return
        from .network import balancedness_of
        from .rle import repeated_singular_values
        scale = max(float(f.square().sum((-2, -1)).max()) for f in factors)
        gap = max(float(G.flatten(1).norm(dim=1).max()) for G in balancedness_of(factors))
        if gap > 1e-10 * max(scale, 1e-300):
            raise ConfigError("optim.noise=balanced is not allowed from an unbalanced start: it moves on the balanced "
                              f"manifold M_0 (every G_p = 0), and max ‖G_p‖ = {gap:.3g}; use init=balanced.")
        _full_rank_product("balanced", factors)
        if bool(repeated_singular_values(torch.linalg.svdvals(factors[0])).any()):
            raise ConfigError("optim.noise=balanced is not allowed from this start: some replica's factors have "
                              "repeated singular values (e.g. init=identity), where the orbit coordinates are "
                              "singular; start from a generic balanced point (init=balanced).")

    def add_(self, factors, scale, generator, draws=None, view=same):
        w = torch.cat([f.detach().flatten(1) for f in factors], dim=1)                  # (B, N)
        signs = torch.sign(w) * torch.sign(w[:, :1])
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)                   # ε, up to a global sign
        xi = torch.cat([x.flatten(1) for x in _gaussian_like(factors, generator)], dim=1)
        N = w.shape[1]
        u = (signs * w).sum(1, keepdim=True) / N + scale * (signs * xi).sum(1, keepdim=True) / N
        for p, f in enumerate(factors):
            f.copy_((signs[:, p:p + 1] * u).view(f.shape))

    def step_(self, factors, grads, lr, beta, generator, state):
        from .rle import balanced_step
        moved, hit = balanced_step([f.detach() for f in factors], list(grads), beta, lr, generator, self.threshold)
        for f, m in zip(factors, moved):
            f.copy_(m)
        # a float count: the optimizer's state_dict casts its tensors to the parameters' dtype on loading
        hits = state.setdefault("singular_hits", torch.zeros(hit.shape, dtype=moved[0].dtype, device=hit.device))
        hits += hit.to(hits.dtype)


def noise_term(name: str, kappa: float | None = None, singular_threshold: float = 1e-6) -> NoiseTerm:
    if name == "tangential":
        return NOISES[name].build(kappa)
    return NOISES[name].build(singular_threshold) if name == "balanced" else NOISES[name].build()
