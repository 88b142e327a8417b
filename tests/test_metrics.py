"""Observables against hand-computed values."""
import math
from fractions import Fraction

import numpy as np
import torch

from dlntorch.metrics import effective_rank, numerical_rank, stable_rank


def test_effective_rank_of_rank_one_identity_and_a_hand_computed_spectrum():
    s = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [3.0, 1.0, 0.0]])
    p = torch.tensor([0.75, 0.25])
    expected = math.exp(-(p * p.log()).sum().item())      # exp of the Shannon entropy of s/Σs
    got = effective_rank(s)
    torch.testing.assert_close(got, torch.tensor([1.0, 3.0, expected]), rtol=1e-15, atol=0)


def test_effective_rank_from_matrices():
    u, v = torch.randn(4, 1), torch.randn(1, 4)
    W = torch.stack([u @ v, torch.eye(4)])
    torch.testing.assert_close(effective_rank(torch.linalg.svdvals(W)),
                               torch.tensor([1.0, 4.0]), rtol=1e-12, atol=0)  # svd rounding of the zero s_i


def test_zero_matrix_has_rank_zero():
    zero = torch.zeros(1, 3)
    assert effective_rank(zero).item() == 0 and stable_rank(zero).item() == 0
    assert numerical_rank(zero, 1e-6).item() == 0


def test_stable_and_numerical_rank():
    s = torch.tensor([[2.0, 1.0, 1e-9]])
    torch.testing.assert_close(stable_rank(s), torch.tensor([(4 + 1 + 1e-18) / 4]), rtol=1e-15, atol=0)
    assert numerical_rank(s, 1e-6).item() == 2 and numerical_rank(s, 1e-12).item() == 3


# ---------------------------------------------------------- closed forms for tiny shapes

EPS = torch.finfo(torch.float64).eps


def tiny_matrices():
    """2x2 matrices with every degeneracy the closed forms must survive: random ones, scaled
    rotations (σ_1 = σ_2), reflections (det < 0), rank one (σ_2 = 0 exactly), the zero matrix,
    a nearly singular one, and scales from 1e-200 to 1e150 (no under- or overflow)."""
    g = torch.Generator().manual_seed(7)
    rnd = torch.randn(200, 2, 2, generator=g, dtype=torch.float64)
    angle = torch.rand(20, generator=g, dtype=torch.float64) * 2 * math.pi
    c, s = torch.cos(angle), torch.sin(angle)
    rotations = 3.0 * torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    reflections = torch.stack([torch.stack([c, s], -1), torch.stack([s, -c], -1)], -2)
    u, v = torch.randn(20, 2, 1, generator=g, dtype=torch.float64), torch.randn(20, 1, 2, generator=g,
                                                                               dtype=torch.float64)
    special = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [2.0, 4.0]], [[1.0, 1.0], [1.0, 1.0 + 1e-12]],
                            [[0.0, 5.0], [0.0, 0.0]], [[-2.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    scaled = torch.cat([1e-200 * rnd[:10], 1e150 * rnd[10:20]])
    return torch.cat([rnd, rotations, reflections, u @ v, special, scaled])


def test_singular_values_and_det_of_2x2_match_lapack():
    from dlntorch.metrics import determinant, singular_values
    W = tiny_matrices()
    s = singular_values(W)
    expected = torch.from_numpy(np.linalg.svd(W.numpy(), compute_uv=False))
    top = expected[:, :1]
    # both are backward stable: each σ_i within a few ε·σ_1 of the other (LAPACK's own bound)
    assert ((s - expected).abs() <= 8 * EPS * top).all()
    assert (s[:, 0] >= s[:, 1]).all() and (s >= 0).all()
    det = determinant(W)
    # against the exact determinant (rational arithmetic on the float entries): ad − bc rounds
    # twice, so within 2ε (|ad| + |bc|); and against LAPACK's LU (today's det), within its own bound
    # (numpy's det is not used: it loses 1e-13 relative at 1e300 scales)
    exact = torch.tensor([float(Fraction(a) * Fraction(d) - Fraction(b) * Fraction(c))
                          for a, b, c, d in W.flatten(1).tolist()], dtype=torch.float64)
    products = (W[:, 0, 0] * W[:, 1, 1]).abs() + (W[:, 0, 1] * W[:, 1, 0]).abs()
    assert ((det - exact).abs() <= 2 * EPS * products).all()
    assert ((det - torch.linalg.det(W)).abs() <= 8 * EPS * top[:, 0] ** 2).all()
    # the exactly singular ones (special: 0, [[1, 2], [2, 4]], [[0, 5], [0, 0]]) have σ_2 = 0 and
    # det = 0 exactly; σ_1 σ_2 = |det|
    assert s[-25, 1] == 0 and det[-25] == 0 and s[-24, 1] == s[-22, 1] == 0
    assert ((s.prod(-1) - det.abs()).abs() <= 4 * EPS * top[:, 0] ** 2).all()
    # rotations: σ_1 = σ_2 = 3; reflections: det = −1
    torch.testing.assert_close(s[200:220], torch.full((20, 2), 3.0, dtype=torch.float64), rtol=4 * EPS, atol=0)
    torch.testing.assert_close(det[220:240], torch.full((20,), -1.0, dtype=torch.float64), rtol=4 * EPS, atol=0)


def test_singular_value_of_a_row_or_column_is_its_norm():
    from dlntorch.metrics import singular_values
    g = torch.Generator().manual_seed(3)
    for shape in ((50, 1, 4), (50, 3, 1), (50, 1, 1)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(-200, 150, 50,
                                                                                  dtype=torch.float64).view(50, 1, 1)
        expected = torch.from_numpy(np.linalg.svd(W.numpy(), compute_uv=False))
        torch.testing.assert_close(singular_values(W), expected, rtol=4 * EPS, atol=0)


def test_observe_on_2x2_agrees_with_numpy():
    """The logged observables of the seed task from the closed forms against numpy's SVD and LAPACK's det:
    the same to float64 rounding, degenerate replicas included."""
    from dlntorch.geometry import entropy
    from dlntorch.metrics import observe
    from dlntorch.tasks import Seed2x2
    W = tiny_matrices()[:-20]      # the extreme scales overflow ‖W‖² in any implementation
    B = W.shape[0]
    factors = [W, torch.eye(2, dtype=torch.float64).expand(B, 2, 2).clone(),
               torch.eye(2, dtype=torch.float64).expand(B, 2, 2).clone()]
    G0 = [torch.zeros(B, 2, 2, dtype=torch.float64)] * 2
    task = Seed2x2().to(torch.device("cpu"), torch.float64)
    out = observe(factors, task, G0, 1e-6, sigma_k=2)
    s = torch.from_numpy(np.linalg.svd(W.numpy(), compute_uv=False))
    top = s[:, 0]
    for name, value in {"sigma_max": s[:, 0], "sigma_min": s[:, 1], "sigma_1": s[:, 0], "sigma_2": s[:, 1],
                        "det": torch.linalg.det(W)}.items():
        assert ((out[name] - value).abs() <= 8 * EPS * torch.maximum(top, top ** 2)).all(), name
    torch.testing.assert_close(out["numerical_rank"], numerical_rank(s, 1e-6))
    torch.testing.assert_close(out["stable_rank"], stable_rank(s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["effective_rank"], effective_rank(s), rtol=1e-12, atol=1e-12)
    # the entropy takes log f_N(σ_1, σ_2): finite at rank one, −inf only at W = 0 (two zeros)
    expected_entropy = entropy(W, 3, singular_values=s)
    finite = torch.isfinite(expected_entropy)
    torch.testing.assert_close(out["entropy"][finite], expected_entropy[finite], rtol=1e-12, atol=1e-12)
    assert torch.equal(out["entropy"][~finite], expected_entropy[~finite])
