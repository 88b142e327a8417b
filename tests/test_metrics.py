"""Observables against hand-computed values."""
import math

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
