"""dlntorch.tiny: the cheap forms of sums and products over tiny axes give torch's own results
(to float64 rounding: the same sums, possibly added in another order)."""
from __future__ import annotations

import pytest
import torch

from dlntorch.network import balancedness_of, chain, chain_and_balancedness
from dlntorch.tiny import axis_sum, from_planes, planes_mm, root_sum_squares, to_planes

EPS = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("widths", [[2, 2, 2, 2], [1, 3, 2], [2, 1, 2], [3, 2, 4, 1], [8, 8, 8]])
@pytest.mark.parametrize("replicas", [1, 5, 700])
def test_product_and_balancedness_equal_the_batched_matmuls(widths, replicas):
    """[8, 8, 8] takes the bmm path, the others planes; each equals chain/balancedness_of to a few
    ulps of the largest entry (a sum of d products, each exactly rounded, in another order)."""
    g = torch.Generator().manual_seed(len(widths) * 100 + replicas)
    factors = [torch.randn(replicas, o, i, generator=g, dtype=torch.float64) for i, o in zip(widths, widths[1:])]
    W, G = chain_and_balancedness(factors)
    expected_W, expected_G = chain(factors), balancedness_of(factors)
    assert W.shape == expected_W.shape and W.is_contiguous()
    scale = max(1.0, float(expected_W.abs().max()))
    assert float((W - expected_W).abs().max()) <= 16 * EPS * scale
    assert len(G) == len(expected_G) == len(widths) - 2
    for g_p, e_p in zip(G, expected_G):
        assert g_p.shape == e_p.shape and float((g_p - e_p).abs().max()) <= 16 * EPS * max(1.0, float(e_p.abs().max()))


def test_planes_round_trip_and_multiply():
    a = torch.randn(33, 2, 3, dtype=torch.float64)
    b = torch.randn(33, 3, 2, dtype=torch.float64)
    assert torch.equal(from_planes(to_planes(a)), a)
    product = from_planes(planes_mm(to_planes(a), to_planes(b)))
    # three products, each exactly rounded, added in another order than bmm's: a few ulps
    assert float((product - a @ b).abs().max()) <= 8 * EPS * float((a.abs() @ b.abs()).max())


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 9])
def test_axis_sum_is_the_sum(length):
    """Slice by slice up to TINY entries, torch's sum beyond (and for an empty axis: 0, as the
    entropy of a 1x1 W has no pairs): equal to 2 ulps of the sum of |x|; a bool axis is a count."""
    x = torch.randn(257, length, 3, dtype=torch.float64)
    for dim in (1, -1, 0):
        expected, got = x.sum(dim), axis_sum(x, dim)
        assert got.shape == expected.shape
        if expected.numel() and length:
            assert float((got - expected).abs().max()) <= 2 * length * EPS * float(x.abs().sum(dim).max())
        else:
            assert torch.equal(got, expected)      # zeros, or nothing
    flags = x > 0
    assert torch.equal(axis_sum(flags, 1), flags.sum(1))


def test_root_sum_squares_is_the_norm_of_the_stack():
    parts = [torch.randn(100, dtype=torch.float64) for _ in range(3)]
    expected = torch.stack(parts).norm(dim=0)
    assert float(((root_sum_squares(parts) - expected) / expected).abs().max()) <= 4 * EPS
    assert torch.equal(root_sum_squares(parts[:1]), parts[0].abs())
