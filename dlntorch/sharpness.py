"""Sharpness: λ_max of the Hessian of L(W_1, …, W_N) = E(W_N ⋯ W_1) in all factors, per replica.

Gradient descent at step size lr is stable near a point only while lr · λ_max < 2, so 2/λ_max at
t = 0 is the largest learning rate the lab can name before a run: the message a divergence prints.

Hessian-vector products come from double backward (the gradient's graph, differentiated along
v), batched over replicas: the loss handed to autograd is the sum of the replicas' energies, so
its Hessian is block-diagonal and one product gives every replica its own H_b v_b. The top
eigenvalue is found by Lanczos with full reorthogonalisation (the Krylov space of power
iteration, Rayleigh–Ritz on it): λ_max itself, not the eigenvalue of largest modulus (at a
saddle the negative ones can be larger), and exact once `iterations` reaches the number of
parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .network import chain


def hessian_vector_product(factors: Sequence[Tensor], task, vectors: Sequence[Tensor]) -> list[Tensor]:
    """H v per replica, for v given like the factors ((B, d_p, d_{p−1}) each)."""
    leaves = [f.detach().requires_grad_(True) for f in factors]
    with torch.enable_grad():
        energy = task.energy(chain(leaves)).sum()     # replicas do not interact: block-diagonal H
        grads = torch.autograd.grad(energy, leaves, create_graph=True)
        return list(torch.autograd.grad(grads, leaves, grad_outputs=list(vectors)))


def sharpness(factors: Sequence[Tensor], task, iterations: int = 20, seed: int = 0) -> Tensor:
    """λ_max of the Hessian of L in all factors, (B,), by `iterations` Lanczos steps per replica."""
    shapes = [f.shape for f in factors]
    B = shapes[0][0]
    sizes = [s[1] * s[2] for s in shapes]
    P = sum(sizes)
    k = min(iterations, P)

    def unflatten(x: Tensor) -> list[Tensor]:
        return [part.reshape(shape) for part, shape in zip(x.split(sizes, dim=1), shapes)]

    def apply(x: Tensor) -> Tensor:          # (B, P) → (B, P)
        return torch.cat([h.flatten(1) for h in hessian_vector_product(factors, task, unflatten(x))], dim=1)

    like = factors[0].detach()
    generator = torch.Generator(device=like.device).manual_seed(seed)

    def random() -> Tensor:
        return torch.randn(B, P, generator=generator, device=like.device, dtype=like.dtype)

    def orthonormal_to(basis: list[Tensor], x: Tensor) -> Tensor:
        # Gram–Schmidt twice ("twice is enough") keeps the basis orthonormal to round-off; where
        # the Krylov space is exhausted (x ≈ 0 once projected), a random direction continues it
        scale = x.norm(dim=1, keepdim=True)
        for _ in range(2):
            for q in basis:
                x = x - (q * x).sum(1, keepdim=True) * q
        norm = x.norm(dim=1, keepdim=True)
        exhausted = ~(norm > 1e-10 * scale)
        if bool(exhausted.any()):
            return torch.where(exhausted, orthonormal_to(basis, random()), x / norm)
        return x / norm

    basis: list[Tensor] = []
    images: list[Tensor] = []
    x = random()
    for _ in range(k):
        q = orthonormal_to(basis, x)
        basis.append(q)
        images.append(apply(q))
        x = images[-1]
    Q, HQ = torch.stack(basis, 1), torch.stack(images, 1)      # (B, k, P)
    T = Q @ HQ.mT                                               # Rayleigh–Ritz: Qᵀ H Q, (B, k, k)
    return torch.linalg.eigvalsh(0.5 * (T + T.mT))[:, -1]


def observed_sharpness(factors: Sequence[Tensor], task, iterations: int, diverged: Tensor | None = None) -> Tensor:
    """The observable `sharpness` (run.sharpness_iterations = `iterations` > 0): λ_max per
    replica, NaN for diverged or non-finite replicas (computed on zeros instead, since the
    Rayleigh–Ritz eigensolver refuses non-finite input)."""
    raw = [f.detach() for f in factors]
    B = raw[0].shape[0]
    bad = ~torch.stack([torch.isfinite(f).flatten(1).all(1) for f in raw]).all(0)
    if diverged is not None:
        bad = bad | diverged
    safe = [torch.where(bad.view(B, 1, 1), torch.zeros_like(f), f) for f in raw]
    return torch.where(bad, torch.nan, sharpness(safe, task, iterations))


def largest_stable_lr(factors: Sequence[Tensor], task, iterations: int = 20) -> float:
    """min over replicas of 2/λ_max at these factors (inf where no replica has λ_max > 0)."""
    top = sharpness(factors, task, iterations)
    positive = top[top > 0]
    return float(2 / positive.max()) if positive.numel() else float("inf")
