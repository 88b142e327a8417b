"""The network: product, balancedness and gradients against plain per-replica computations."""
import torch

from dlntorch.network import DeepLinearNetwork, chain, factor_gradients


def random_net(widths, B=5, seed=0):
    net = DeepLinearNetwork(widths, replicas=B)
    gen = torch.Generator().manual_seed(seed)
    net.set_factors([torch.randn(B, o, i, generator=gen) for i, o in zip(widths[:-1], widths[1:])])
    return net


def test_product_and_balancedness_match_a_loop_over_replicas():
    widths = [3, 4, 5, 2]
    net = random_net(widths)
    W, G = net.product(), net.balancedness()
    assert W.shape == (5, 2, 3) and [g.shape for g in G] == [(5, 4, 4), (5, 5, 5)]
    for b in range(5):
        Ws = [f[b] for f in net.factors]
        # exact: the same float64 products in the same order
        torch.testing.assert_close(W[b], Ws[2] @ Ws[1] @ Ws[0], rtol=0, atol=1e-14)
        for p in range(2):
            expected = Ws[p + 1].T @ Ws[p + 1] - Ws[p] @ Ws[p].T
            torch.testing.assert_close(G[p][b], expected, rtol=0, atol=1e-13)


def test_depth_one_has_no_balancedness_and_the_product_is_the_factor():
    net = random_net([3, 2])
    assert net.depth == 1 and net.balancedness() == []
    assert torch.equal(net.product(), net.factors[0])


def test_hidden_widths_default_to_max_of_ends():
    from dlntorch.network import default_widths
    assert default_widths(3, rows=2, cols=5) == [5, 5, 5, 2]
    assert default_widths(1, rows=4, cols=3) == [3, 4]


def test_closed_form_factor_gradients_equal_autograd():
    net = random_net([3, 4, 4, 2], B=6)
    target = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    W = net.product()
    (0.5 * ((W - target) ** 2).sum()).backward()
    grads = factor_gradients([f.detach() for f in net.factors], (W - target).detach())
    for g, f in zip(grads, net.factors):
        # same products, different association order: rounding only
        torch.testing.assert_close(g, f.grad, rtol=1e-13, atol=1e-13)


def test_batched_loss_hands_each_replica_its_own_gradient():
    """Replicas do not interact: the gradient of Σ_b E(W_b) at replica b equals the gradient of
    E(W_b) computed for that replica alone."""
    from dlntorch.tasks import Seed2x2
    task = Seed2x2()
    net = random_net([2, 2, 2, 2], B=4, seed=3)
    task.energy(net.product()).sum().backward()
    for b in range(4):
        alone = DeepLinearNetwork([2, 2, 2, 2], replicas=1)
        alone.set_factors([f.detach()[b:b + 1] for f in net.factors])
        task.energy(alone.product()).sum().backward()
        for f, g in zip(net.factors, alone.factors):
            torch.testing.assert_close(f.grad[b], g.grad[0], rtol=0, atol=1e-15)


def test_chain_is_the_forward_map():
    net = random_net([3, 4, 2], B=2)
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(net(x), chain(list(net.factors)) @ x, rtol=1e-13, atol=1e-13)


def test_fast_chain_is_the_product_on_planes_and_on_batches():
    """fast_chain takes planes for tiny widths at many replicas (B = 600 ≥ 512) and the batched
    matmuls otherwise (B = 5; widths 7 > 6): both equal the per-replica product to rounding
    (entries O(1), 3 factors: a few ulp of float64)."""
    from dlntorch.network import fast_chain
    for widths, B in (([2, 2, 2, 2], 600), ([2, 3, 2], 600), ([2, 2, 2, 2], 5), ([7, 3, 2], 600)):
        factors = list(random_net(widths, B=B).factors)
        fast = fast_chain([f.detach() for f in factors])
        for b in range(0, B, 97):
            expected = factors[0][b]
            for f in factors[1:]:
                expected = f[b] @ expected
            torch.testing.assert_close(fast[b], expected.detach(), rtol=0, atol=1e-14)
