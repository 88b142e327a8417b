"""p6_singular_varieties — problem 6: where is the level set M_G = {𝐖 : G(𝐖) = G} singular?

At points 𝐖 of M_G whose product W = φ(𝐖) has rank r (r = 0 … min widths), for G = 0 (balanced
points) and a random G ≠ 0 (Gaussian factors whose first has rank r), we compute
the rank of the Jacobian of 𝐖 ↦ G(𝐖) (the upper triangles of every G_p) and of
𝐖 ↦ (φ(𝐖), G(𝐖)). D − rank J_G is the dimension of the Zariski tangent space of M_G at 𝐖 and
D − rank J_(φ,G) that of the fibre φ⁻¹(W) inside M_G. Where D − rank J_G exceeds its value at a
full-rank point, M_G is singular there (the constraints G_p stop being independent).

The full-rank dimension, derived: at a generic point the G_p are as independent as their ranges
allow. G_p = W_{p+1}^T W_{p+1} − W_p W_p^T is a symmetric d_p × d_p matrix of rank at most
k_p = d_{p−1} + d_{p+1}, and the symmetric n × n matrices of rank ≤ k form a set of dimension
c(n, k) = n(n+1)/2 − (n−k)_+ (n−k+1)_+ / 2 (all of Sym(n) when k ≥ n). So

    dim M_G (full rank) = D − Σ_{p=1}^{N−1} c(d_p, d_{p−1} + d_{p+1}),   D = Σ_p d_p d_{p−1},

and for equal widths d the fibre inside M_G is an orbit of O(d)^{N−1}, of dimension
(N − 1) d(d − 1)/2. (`full_rank_dimension`; the test checks both against the computed ranks.)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..geometry import haar_orthogonal
from ..network import balancedness_of, chain
from .common import Notebook, slide_axes
from .lie import parameter_count, unflatten

WIDTHS = ([2, 2, 2], [2, 2, 2, 2], [3, 3, 3], [2, 3, 2], [3, 2, 3], [2, 1, 2], [1, 3, 1],
          [3, 3, 3, 3], [2, 3, 4])
QUICK_WIDTHS = ([2, 2, 2], [2, 3, 2])


def symmetric_rank_dimension(n: int, k: int) -> int:
    """c(n, k): the dimension of the symmetric n × n matrices of rank at most k."""
    excess = max(n - k, 0)
    return n * (n + 1) // 2 - excess * (excess + 1) // 2


def full_rank_dimension(widths: Sequence[int]) -> int:
    """dim M_G at a generic full-rank point: D − Σ_p c(d_p, d_{p−1} + d_{p+1})."""
    d = list(widths)
    return parameter_count(d) - sum(symmetric_rank_dimension(d[p], d[p - 1] + d[p + 1]) for p in range(1, len(d) - 1))


def _jacobian_rank(f, theta: torch.Tensor, rtol: float = 1e-9) -> int:
    J = torch.autograd.functional.jacobian(f, theta)
    if J.numel() == 0:
        return 0
    s = torch.linalg.svdvals(J.reshape(-1, theta.numel()))
    return int((s > rtol * s[0]).sum()) if s[0] > 0 else 0


def balancedness_entries(theta: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """The upper triangles of G_1, …, G_{N−1}, concatenated."""
    factors = [f[None] for f in unflatten(theta, widths)]
    parts = [G[0][tuple(torch.triu_indices(*G.shape[-2:]))] for G in balancedness_of(factors)]
    return torch.cat(parts) if parts else theta.new_zeros(0)


def ranks_at(theta: torch.Tensor, widths: Sequence[int]) -> tuple[int, int]:
    """(rank J_G, rank J_(φ,G)) at θ."""
    G = lambda th: balancedness_entries(th, widths)  # noqa: E731
    both = lambda th: torch.cat([chain(unflatten(th, widths)).flatten(), G(th)])  # noqa: E731
    return _jacobian_rank(G, theta), _jacobian_rank(both, theta)


def exactly_balanced(widths: Sequence[int], rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """W_p = Q_p Σ Q_{p−1}^T with Haar Q_p and Σ (d_p × d_{p−1}) holding σ_1, …, σ_r ~ U(0.5, 2) on its
    diagonal and exact zeros elsewhere: balanced (G = 0) with a product of rank exactly r.
    (Factoring a rank-r product by its SVD instead puts the N-th roots of rounding-level singular
    values, ~1e-8 at N = 2, into the factors, and those move Jacobian ranks.)"""
    sigma = 0.5 + 1.5 * torch.rand(rank, generator=gen, dtype=torch.float64)
    frames = [haar_orthogonal(1, d, generator=gen, dtype=torch.float64)[0] for d in widths]
    factors = []
    for p in range(1, len(widths)):
        middle = torch.zeros(widths[p], widths[p - 1], dtype=torch.float64)
        middle[range(rank), range(rank)] = sigma
        factors.append(frames[p] @ middle @ frames[p - 1].T)
    return factors


def sample_point(widths: Sequence[int], rank: int, imbalanced: bool, gen: torch.Generator) -> torch.Tensor:
    """A point of some M_G whose product has rank `rank`. G = 0: a balanced point with rank-r product
    (`exactly_balanced`). G ≠ 0: Gaussian factors with W_1 = A B of rank r (a random G; the
    product then has rank r almost surely, r ≤ min widths)."""
    if not imbalanced:
        factors = exactly_balanced(widths, rank, gen)
    else:
        first = torch.randn(widths[1], rank, generator=gen, dtype=torch.float64) @ \
            torch.randn(rank, widths[0], generator=gen, dtype=torch.float64)
        factors = [first] + [torch.randn(b, a, generator=gen, dtype=torch.float64)
                             for a, b in zip(widths[1:-1], widths[2:])]
    return torch.cat([f.flatten() for f in factors])


def survey(widths: Sequence[int], samples: int, seed: int = 0) -> list[dict]:
    widths = [int(w) for w in widths]
    D, top = parameter_count(widths), min(widths)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for imbalanced in (False, True):
        for rank in range(top + 1):
            found = []
            for _ in range(samples):
                theta = sample_point(widths, rank, imbalanced, gen)
                found.append(ranks_at(theta, widths))
            jg, jpg = np.array(found).T
            rows.append({"widths": "-".join(map(str, widths)), "G": "nonzero" if imbalanced else "zero",
                         "product_rank": rank, "full_rank": top, "parameters": D, "samples": samples,
                         "rank_JG_min": int(jg.min()), "rank_JG_max": int(jg.max()),
                         "tangent_dim": int(D - jg.min()), "fibre_tangent_dim": int(D - jpg.min()),
                         "rank_JphiG_min": int(jpg.min()), "full_rank_dim_formula": full_rank_dimension(widths)})
    for row in rows:
        generic = next(r for r in rows if r["G"] == "nonzero" and r["product_rank"] == top)
        row["excess_tangent_dim"] = row["tangent_dim"] - generic["tangent_dim"]
        row["singular"] = row["excess_tangent_dim"] > 0
    return rows


def measure(book: Notebook) -> None:
    widths_list = QUICK_WIDTHS if book.quick else WIDTHS
    samples = 2 if book.quick else 5
    book.note(widths=[list(w) for w in widths_list], samples=samples, seed=0, rtol=1e-9)
    rows = []
    for widths in widths_list:
        mine = survey(widths, samples)
        book.table(mine, f"table_{mine[0]['widths']}.csv")
        rows += mine
    book.table(rows)

    singular = [r for r in rows if r["singular"]]
    agree = all(r["tangent_dim"] == r["full_rank_dim_formula"] for r in rows
                if r["G"] == "nonzero" and r["product_rank"] == r["full_rank"])
    zero_sing = sorted({(r["widths"], r["product_rank"]) for r in singular if r["G"] == "zero"})
    nonzero_sing = sorted({(r["widths"], r["product_rank"]) for r in singular if r["G"] == "nonzero"})
    book.say(f"Over {len(widths_list)} widths and {samples} random points per (widths, G, r), the full-rank tangent "
             f"dimension of M_G {'equals' if agree else 'does not always equal'} D − Σ_p c(d_p, d_(p−1) + d_(p+1)).",
             formula_agrees=agree)
    book.say(f"At G = 0 the Zariski tangent space is larger than at full rank (M_0 singular) at "
             f"{len(zero_sing)} of {sum(1 for r in rows if r['G'] == 'zero')} (widths, r) cells "
             f"({', '.join(f'{w} r={k}' for w, k in zero_sing) or 'none'}); "
             f"at a random G ≠ 0 (Gaussian factors, W_1 of rank r) "
             f"at {len(nonzero_sing)} cells ({', '.join(f'{w} r={k}' for w, k in nonzero_sing) or 'none'}).",
             singular_zero=zero_sing, singular_nonzero=nonzero_sing)

    fig, axes = slide_axes(1, 2, width=6.5, height=4.8)
    for ax, key, title in ((axes[0, 0], "tangent_dim", "tangent space of M_G"),
                           (axes[0, 1], "fibre_tangent_dim", "fibre φ⁻¹(W) inside M_G")):
        for i, widths in enumerate(widths_list):
            label = "-".join(map(str, widths))
            for G, style in (("zero", "-o"), ("nonzero", "--s")):
                mine = [r for r in rows if r["widths"] == label and r["G"] == G]
                full = next(r for r in rows if r["widths"] == label and r["G"] == "nonzero"
                            and r["product_rank"] == r["full_rank"])[key]
                ax.plot([r["product_rank"] - r["full_rank"] for r in mine], [r[key] - full for r in mine], style,
                        color=f"C{i}", label=f"{label}, G {'= 0' if G == 'zero' else '≠ 0'}")
        ax.set_xlabel("product rank r − full rank (≤ 0)")
        ax.set_ylabel("dimension − generic value (count)")
        ax.set_title(title + " (generic: full rank, G ≠ 0)", fontsize=12)
    axes[0, 1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    book.figure(fig)
