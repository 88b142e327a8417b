"""Initial conditions: each fills all B replicas in one batched, seeded draw.

Draws happen on the CPU in float64 with a seeded generator and are then moved, so a seed gives
the same initial condition on every device and dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .arrays import load_arrays
from .errors import ConfigError, at_least, fail, non_negative_finite, one_of, resolve_depth
from .geometry import balanced_factors, fibre_move, haar_semi_orthogonal
from .network import balancedness_of, chain
from .registry import Registry

Factors = list[Tensor]

# name → Option(build = (cfg.init, widths, replicas, generator) -> factors, check = check(cfg))
INITS = Registry("init.name")


def _layer_scale(scale: float, scale_of: str, depth: int) -> float:
    """Per-layer size: `scale` itself, or scale^{1/N} when `scale` is meant for the product."""
    return scale ** (1.0 / depth) if scale_of == "product" else scale


def gaussian(widths: list[int], B: int, scale: float, scale_of: str, gen: torch.Generator) -> Factors:
    """I.i.d. N(0, σ_p²) entries.

    layer:   σ_p = scale for every layer.
    product: σ_1 = scale^{1/N}, σ_p = scale^{1/N}/√d_{p−1} (p ≥ 2): a product entry sums
             Π_{p<N} d_p terms, so Var W_ij = scale^2 — the product's typical entry is `scale`.
    fan_in:  σ_p = scale^{1/N}/√d_{p−1} for every p (Arora et al. 2019's convention, their
             "init" = scale): the product's typical entry is scale/√d_0.
    """
    depth = len(widths) - 1
    factors = []
    for p, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        std = scale if scale_of == "layer" else \
            scale ** (1 / depth) / (math.sqrt(d_in) if p > 1 or scale_of == "fan_in" else 1.0)
        factors.append(std * torch.randn(B, d_out, d_in, generator=gen, dtype=torch.float64))
    return factors


def balanced(widths: list[int], B: int, scale: float, scale_of: str, gen: torch.Generator) -> Factors:
    """A random point of a balanced fibre: draw W with N(0, s²) entries (of rank ≤ the narrowest
    width), then factor it exactly as W_p = Q_p Σ^{1/N} Q_{p−1}^T with Haar-random hidden Q_p,
    so G_p = 0 to rounding.

    s = scale (scale_of=product) or scale^N (scale_of=layer: factors of size ≈ scale).
    """
    depth, m, n = len(widths) - 1, widths[-1], widths[0]
    s = scale if scale_of == "product" else scale ** depth
    rank = min(widths)
    if rank >= min(m, n):
        W = s * torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    else:   # a narrow hidden layer caps the rank: W = s·UV^T/√r still has entries of variance s²
        U = torch.randn(B, m, rank, generator=gen, dtype=torch.float64)
        V = torch.randn(B, n, rank, generator=gen, dtype=torch.float64)
        W = (s / math.sqrt(rank)) * U @ V.mT
    return balanced_factors(W, widths, generator=gen)


def orthogonal(widths: list[int], B: int, scale: float, scale_of: str, gen: torch.Generator) -> Factors:
    """W_p = c · (random semi-orthogonal), c = scale per layer (or scale^{1/N})."""
    c = _layer_scale(scale, scale_of, len(widths) - 1)
    return [c * haar_semi_orthogonal(B, d_out, d_in, generator=gen, dtype=torch.float64)
            for d_in, d_out in zip(widths[:-1], widths[1:])]


def identity(widths: list[int], B: int, scale: float, scale_of: str, gen: torch.Generator) -> Factors:
    """W_p = c · I (rectangular), c = scale per layer (or scale^{1/N}); no randomness."""
    c = _layer_scale(scale, scale_of, len(widths) - 1)
    return [c * torch.eye(d_out, d_in, dtype=torch.float64).expand(B, d_out, d_in).clone()
            for d_in, d_out in zip(widths[:-1], widths[1:])]


def total_balancedness(factors: Factors) -> Tensor:
    """‖G‖ = (Σ_p ‖G_p‖_F²)^{1/2}, (B,)."""
    G = balancedness_of(factors)
    return torch.stack([g.flatten(1).norm(dim=1) for g in G]).norm(dim=0)


def unbalanced(widths: list[int], B: int, scale: float, scale_of: str, gen: torch.Generator,
               imbalance: float = 1.0) -> Factors:
    """A balanced start moved along its fibre, W_p ← e^{sA_p} W_p e^{−sA_{p−1}}, by random
    symmetric generators A_p (skew ones would keep balance), with s ≥ 0 per replica found by
    bisection so that ‖G‖ = imbalance. The product is unchanged (fibre move)."""
    start = balanced(widths, B, scale, scale_of, gen)
    if imbalance == 0 or len(widths) < 3:
        return start
    directions = []
    for d in widths[1:-1]:
        A = torch.randn(B, d, d, generator=gen, dtype=torch.float64)
        A = A + A.mT
        directions.append(A / A.flatten(1).norm(dim=1).view(B, 1, 1))

    def gap(s: Tensor) -> Tensor:
        moved = fibre_move(start, [s.view(B, 1, 1) * A for A in directions])
        return total_balancedness(moved) - imbalance

    low, high = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    for _ in range(200):          # grow the bracket until ‖G(high)‖ ≥ imbalance
        short = gap(high) < 0
        if not short.any():
            break
        high = torch.where(short, 2 * high, high)
    else:
        raise ValueError(f"init.imbalance={imbalance} could not be reached along the fibre")
    for _ in range(100):          # bisection to rounding: the bracket halves each pass
        mid = (low + high) / 2
        below = gap(mid) < 0
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    s = (low + high) / 2
    return fibre_move(start, [s.view(B, 1, 1) * A for A in directions])


def from_file(path: str, widths: list[int], B: int, gen: torch.Generator) -> Factors:
    """Initial conditions made elsewhere (a phase-portrait grid, a saved state), from a .pt or
    .npz holding either the factors `factor_1` … `factor_N` (each (B, d_p, d_{p−1}), or
    (d_p, d_{p−1}) for every replica) or end-to-end matrices `product` ((B, m, n) or (m, n)),
    which are factored on their balanced fibre with Haar-random hidden Q_p (as `balanced`)."""
    arrays = load_arrays(path, "init.file")
    depth, (m, n) = len(widths) - 1, (widths[-1], widths[0])
    names = [f"factor_{p}" for p in range(1, depth + 1)]
    if all(name in arrays for name in names):
        shapes = [(d_out, d_in) for d_in, d_out in zip(widths[:-1], widths[1:])]
        return [_replicated(arrays[name], shape, B, path) for name, shape in zip(names, shapes)]
    if "product" in arrays:
        return balanced_factors(_replicated(arrays["product"], (m, n), B, path), widths, generator=gen)
    raise ConfigError(f"init.file={path!r} is not allowed: it must hold {', '.join(names)} (for depth {depth}) "
                      f"or 'product' (found {sorted(arrays)}).")


# -- a grid on a 2-D slice of the products (phase portraits, problem 2) ----------------------

PLANES = ("diagonal", "symmetric", "random")


def slice_directions(plane: str, m: int, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(P, Q, R) of the slice W0(a, b) = a·P + b·Q + ε·R of the m×n products.

    diagonal:  P = E_11, Q = E_22 (W0 = diag(a, b) for 2x2);
    symmetric: P = I, Q = J, the exchange matrix (W0 = [[a, b], [b, a]] for 2x2; the conformal
               matrices aI + bJ), square only;
    random:    two Frobenius-orthonormal Gaussian directions (QR of an mn × 2 Gaussian), seeded.
    R is one Gaussian matrix for the whole slice (a fixed tilt, so the slice stays a plane); it is
    drawn for every plane, so ε does not change the draws that follow (the hidden frames)."""
    one_of("init.plane", plane, PLANES)
    if plane == "random":
        basis, _ = torch.linalg.qr(torch.randn(m * n, 2, generator=gen, dtype=torch.float64))
        P, Q = basis[:, 0].reshape(m, n), basis[:, 1].reshape(m, n)
    elif plane == "diagonal":
        P, Q = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
        P[0, 0], Q[1, 1] = 1.0, 1.0
    else:
        P, Q = torch.eye(m, n, dtype=torch.float64), torch.eye(m, n, dtype=torch.float64).flip(1)
    R = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return P, Q, R


def grid_axes(points: int, a_range, b_range) -> tuple[Tensor, Tensor]:
    """The grid's coordinates (a, b), points² each, a fastest: replica k is (a_i, b_j) with
    k = j·points + i, so a (points, points) reshape has b along rows and a along columns."""
    a = torch.linspace(float(a_range[0]), float(a_range[1]), points, dtype=torch.float64)
    b = torch.linspace(float(b_range[0]), float(b_range[1]), points, dtype=torch.float64)
    b, a = torch.meshgrid(b, a, indexing="ij")
    return a.reshape(-1), b.reshape(-1)


def grid_products(cfg: Any, m: int, n: int, gen: torch.Generator) -> Tensor:
    """W0(a, b) = a·P + b·Q + ε·R at every grid point of `cfg` (init.plane, a_range, b_range,
    points, epsilon), (points², m, n)."""
    P, Q, R = slice_directions(cfg.plane, m, n, gen)
    a, b = grid_axes(cfg.points, cfg.a_range, cfg.b_range)
    return a.view(-1, 1, 1) * P + b.view(-1, 1, 1) * Q + cfg.epsilon * R


def grid(cfg: Any, widths: list[int], B: int, gen: torch.Generator) -> Factors:
    """One replica per grid point, each product factored on its balanced fibre (Haar hidden frames)."""
    return balanced_factors(grid_products(cfg, widths[-1], widths[0], gen), widths, generator=gen)


def _replicated(array: Tensor, shape: tuple[int, int], B: int, path: str) -> Tensor:
    """(B, *shape) float64: one matrix for every replica, or one per replica."""
    array = array.to(torch.float64)
    if tuple(array.shape) == shape:
        return array.expand(B, *shape).clone()
    if tuple(array.shape) != (B, *shape):
        raise ConfigError(f"init.file={path!r} is not allowed: an array of shape {tuple(array.shape)} does not fit "
                          f"{B} replicas of {shape[0]}x{shape[1]} (replicas={B}); give shape {(B, *shape)} or {shape}.")
    return array


# -- conditioning on the sign of det W0 (init.det_sign) --------------------------------------

DET_SIGNS = ("any", "positive", "negative")


def with_det_sign(factors: Factors, sign: str) -> Factors:
    """Condition a square start on the sign of det W0, W0 = W_N ⋯ W_1: in every replica whose
    det W0 has the wrong sign, reflect the first column of the first factor, W_1 ← W_1 diag(−1, 1, …, 1).
    Then W0 ← W0 diag(−1, 1, …, 1), so det W0 changes sign exactly (whatever the hidden widths),
    W_1 W_1^T and so every G_p are unchanged (a balanced start stays balanced), and the law of a
    start whose law is invariant under that reflection (Gaussian, Haar) becomes the conditional
    law given the sign. A replica with det W0 = 0 (probability zero) is left as it is."""
    if sign == "any":
        return factors
    m, n = factors[-1].shape[1], factors[0].shape[2]
    if m != n:      # a task file's shape is known only now
        fail("init.det_sign", sign, f"a determinant needs a square product, not {m}x{n}; use any")
    det_sign, _ = torch.linalg.slogdet(chain(factors))      # the sign survives underflow of det
    wrong = det_sign < 0 if sign == "positive" else det_sign > 0
    factors[0][wrong, :, 0] *= -1
    return factors


def _check_det_sign(cfg: Any) -> None:
    """init.det_sign needs a square product of full rank, and a start that is drawn here;
    (shared by every init's check) scale_of=fan_in is gaussian's only."""
    if cfg.init.scale_of == "fan_in" and cfg.init.name != "gaussian":
        fail("init.scale_of", "fan_in", f"only init=gaussian draws per fan-in, not init={cfg.init.name}; "
             "use layer or product")
    sign = cfg.init.det_sign
    one_of("init.det_sign", sign, DET_SIGNS)
    if sign == "any":
        return
    if cfg.init.name == "file":
        fail("init.det_sign", sign, "init=file gives its factors as they are, so only any is allowed with it")
    widths = list(cfg.model.widths) if cfg.model.widths is not None else None
    if cfg.task.file is not None and widths is None:
        return          # the shape is the file's: checked when the factors are drawn
    from .tasks import task_shape
    m, n = (widths[-1], widths[0]) if widths is not None else task_shape(cfg.task)
    if m != n:
        fail("init.det_sign", sign, f"a determinant needs a square product, not {m}x{n}; use any")
    if widths is not None and min(widths) < n:
        fail("init.det_sign", sign,
             f"model.widths={widths} has a layer narrower than {n}, so det W0 = 0 always; use any")


# -- registered: each adapts cfg.init to its initialiser -----------------------------------

def _scaled(initialiser: Callable[..., Factors]) -> Callable[..., Factors]:
    return lambda cfg, widths, B, gen: initialiser(widths, B, cfg.scale, cfg.scale_of, gen)


for _name, _initialiser in (("gaussian", gaussian), ("balanced", balanced), ("orthogonal", orthogonal),
                            ("identity", identity)):
    INITS.register(_name, check=_check_det_sign)(_scaled(_initialiser))


def _check_unbalanced(cfg: Any) -> None:
    _check_det_sign(cfg)
    imbalance = cfg.init.imbalance
    if not (math.isfinite(imbalance) and imbalance >= 0):
        fail("init.imbalance", imbalance, "it must be a finite number ≥ 0")
    if resolve_depth(cfg.model) < 2 and imbalance > 0:
        fail("init.imbalance", imbalance, "depth 1 has no balancedness, so it must be 0")


@INITS.register("unbalanced", check=_check_unbalanced)
def _unbalanced(cfg: Any, widths: list[int], B: int, gen: torch.Generator) -> Factors:
    return unbalanced(widths, B, cfg.scale, cfg.scale_of, gen, imbalance=cfg.imbalance)


def _check_file(cfg: Any) -> None:
    _check_det_sign(cfg)
    if cfg.init.file is None:
        fail("init.file", None, "init=file needs the path of a .pt or .npz holding the factors or the products")


@INITS.register("file", check=_check_file)
def _file(cfg: Any, widths: list[int], B: int, gen: torch.Generator) -> Factors:
    return from_file(cfg.file, widths, B, gen)


def _check_range(key: str, value: Any) -> None:
    pair = list(value) if value is not None else []
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) \
            or not pair[0] < pair[1]:
        fail(key, value, "it must be [low, high], two finite numbers with low < high")


def _check_grid(cfg: Any) -> None:
    from .tasks import task_shape
    init = cfg.init
    one_of("init.plane", init.plane, PLANES)
    at_least("init.points", init.points, 2)
    _check_range("init.a_range", init.a_range)
    _check_range("init.b_range", init.b_range)
    non_negative_finite("init.epsilon", init.epsilon)
    if cfg.replicas != init.points ** 2:
        fail("replicas", cfg.replicas, f"init=grid with init.points={init.points} has one replica per grid "
             f"point, so it must be init.points² = {init.points ** 2}")
    if cfg.task.file is not None:
        return                      # the shape is the file's: balanced_factors checks it at build
    m, n = task_shape(cfg.task)
    if min(m, n) < 2:
        fail("init.plane", init.plane, f"a grid needs products with at least two rows and columns, not {m}x{n}")
    if init.plane == "symmetric" and m != n:
        fail("init.plane", init.plane, f"the symmetric plane aI + bJ needs square products, not {m}x{n}")
    rank = min(m, n) if init.plane != "diagonal" or init.epsilon > 0 else 2
    if cfg.model.widths is not None and min(cfg.model.widths) < rank:
        fail("model.widths", list(cfg.model.widths), f"init=grid on the {init.plane} plane makes products of "
             f"rank {rank}, which factor only through widths ≥ {rank}")


@INITS.register("grid", check=_check_grid)
def _grid(cfg: Any, widths: list[int], B: int, gen: torch.Generator) -> Factors:
    return grid(cfg, widths, B, gen)


def initial_factors(cfg: Any, widths: list[int], replicas: int, seed: int) -> Factors:
    """The factors [W_1, …, W_N] of `cfg.init` for all replicas, float64 on the CPU, conditioned
    on the sign of det W0 as `cfg.det_sign` says (with_det_sign)."""
    factors = INITS[cfg.name].build(cfg, list(widths), replicas, torch.Generator().manual_seed(seed))
    return with_det_sign(factors, cfg.get("det_sign", "any"))
