"""Initial conditions: balanced points, fibre moves, scales."""

import pytest
import torch

from dlntorch import init
from dlntorch.network import balancedness_of, chain

gen = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


@pytest.mark.parametrize("widths", [[2, 2, 2, 2], [3, 5, 4, 2], [4, 3, 3, 2], [2, 6, 2]])
@pytest.mark.parametrize("scale", [1e-3, 1.0])
def test_balanced_init_is_balanced_and_factors_the_drawn_matrix(widths, scale):
    B = 16
    factors = init.balanced(widths, B, scale, "product", gen(1))
    # the drawn end-to-end matrix: the first draw of the same generator
    W = scale * torch.randn(B, widths[-1], widths[0], generator=gen(1))
    # G_p = 0 and W reproduced up to rounding of O(scale^{2/N}) quantities
    for G in balancedness_of(factors):
        assert G.flatten(1).norm(dim=1).max() <= 1e-10 * scale ** 2
    torch.testing.assert_close(chain(factors), W, rtol=0, atol=1e-13 * scale)


def test_balanced_init_through_a_narrow_layer_is_low_rank_and_balanced():
    widths = [3, 2, 3]
    factors = init.balanced(widths, 50, 1.0, "product", gen(6))
    W = chain(factors)
    assert torch.linalg.matrix_rank(W).max() == 2
    assert max(G.abs().max() for G in balancedness_of(factors)) < 1e-12   # rounding of O(1) entries
    # entries of variance s² = 1: 450 samples, standard error ≈ 7 % on the variance; allow 25 %
    assert abs(W.pow(2).mean().item() - 1) < 0.25


@pytest.mark.parametrize("widths", [[2, 2, 2, 2], [3, 4, 4, 3], [2, 3, 2]])
def test_unbalanced_init_keeps_the_product_and_reaches_the_requested_imbalance(widths):
    B, imbalance = 12, 0.7
    start = init.balanced(widths, B, 0.5, "product", gen(2))
    moved = init.unbalanced(widths, B, 0.5, "product", gen(2), imbalance=imbalance)
    # a fibre move: the product is unchanged up to rounding
    torch.testing.assert_close(chain(moved), chain(start), rtol=0, atol=1e-12)
    # bisection to machine precision on ‖G(s)‖ − imbalance
    torch.testing.assert_close(init.total_balancedness(moved), torch.full((B,), imbalance), rtol=1e-10, atol=0)


def test_gaussian_product_scale_gives_product_entries_of_that_size():
    widths, B, scale = [3, 8, 8, 3], 4000, 1e-2
    W = chain(init.gaussian(widths, B, scale, "product", gen(3)))
    # Var W_ij = scale² exactly; 36000 samples give the RMS to ≈ 0.4 % standard error … but the
    # entries of a product are heavy-tailed (fourth moment ~ 3^N), so allow 5 %
    assert abs(W.pow(2).mean().sqrt().item() / scale - 1) < 0.05


def test_gaussian_layer_scale_is_the_per_layer_std():
    factors = init.gaussian([4, 6, 4], 2000, 0.3, "layer", gen(4))
    for f in factors:
        assert abs(f.std().item() / 0.3 - 1) < 0.02   # ≥ 32000 samples: standard error 0.4 %


def test_orthogonal_and_identity():
    widths = [3, 5, 2]
    orth = init.orthogonal(widths, 7, 0.5, "layer", gen(5))
    for f in orth:
        d_out, d_in = f.shape[-2:]
        gram = f @ f.mT if d_out <= d_in else f.mT @ f
        torch.testing.assert_close(gram, 0.25 * torch.eye(min(d_out, d_in)).expand_as(gram), rtol=0, atol=1e-14)
    ident = init.identity([2, 2, 2, 2], 3, 0.1, "product", gen())
    torch.testing.assert_close(chain(ident), 0.1 * torch.eye(2).expand(3, 2, 2), rtol=1e-14, atol=0)


def test_initial_conditions_are_seeded():
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"name": "gaussian", "scale": 0.1, "scale_of": "layer", "imbalance": 0.0})
    a = init.initial_factors(cfg, [2, 2, 2], 4, seed=11)
    b = init.initial_factors(cfg, [2, 2, 2], 4, seed=11)
    c = init.initial_factors(cfg, [2, 2, 2], 4, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_a_prescribed_spectrum_is_the_truths():
    from omegaconf import OmegaConf

    from dlntorch.config import TaskConfig
    from dlntorch.tasks import build_task
    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig),
                          {"name": "completion", "size": 6, "spectrum": [5.0, 2.0, 0.5], "observations": 30})
    truth = build_task(cfg, 0).truth
    # Haar columns from QR are orthonormal to rounding
    torch.testing.assert_close(torch.linalg.svdvals(truth)[:3], torch.tensor([5.0, 2.0, 0.5]), rtol=1e-14, atol=0)
    assert torch.linalg.matrix_rank(truth) == 3


def test_initial_conditions_from_a_file_of_products_and_of_factors(make_cfg, tmp_path):
    """A phase-portrait grid of the seed problem: W0 = [[a, b], [b, a]] on a 3x3 grid of (a, b),
    factored on its balanced fibre; and the same factors saved and read back exactly."""
    from dlntorch.train import Lab
    a, b = torch.meshgrid(torch.linspace(-0.5, 0.5, 3), torch.linspace(0.1, 0.3, 3), indexing="ij")
    grid = torch.stack([torch.stack([a, b], -1), torch.stack([b, a], -1)], -2).reshape(9, 2, 2)
    torch.save({"product": grid}, tmp_path / "grid.pt")
    lab = Lab(make_cfg("init=file", f"init.file={tmp_path / 'grid.pt'}", "replicas=9"))
    factors = [f.detach() for f in lab.net.factors]
    torch.testing.assert_close(chain(factors), grid, rtol=0, atol=1e-14)   # rounding of the SVD
    assert max(G.abs().max() for G in balancedness_of(factors)) < 1e-14
    np_factors = {f"factor_{p}": f.numpy() for p, f in enumerate(factors, start=1)}
    import numpy as np
    np.savez(tmp_path / "factors.npz", **np_factors)
    again = Lab(make_cfg("init=file", f"init.file={tmp_path / 'factors.npz'}", "replicas=9", out="b"))
    assert all(torch.equal(x.detach(), y) for x, y in zip(again.net.factors, factors))


# ------------------------------------------------------------------ init.det_sign

@pytest.mark.parametrize("name", ["gaussian", "balanced", "orthogonal", "unbalanced"])
@pytest.mark.parametrize("widths", [[3, 3, 3], [3, 5, 4, 3], [2, 2, 2, 2, 2]])
@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_det_sign_conditions_every_replica_by_reflecting_the_first_column_of_W1(name, widths, sign):
    """Every replica gets the requested sign of det W0; a reflected replica differs from the
    unconditioned draw only by the sign of W_1's first column, so W0 and the G_p are otherwise the
    draw's (a balanced start stays balanced, bit for bit)."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"name": name, "scale": 0.7, "scale_of": "layer", "imbalance": 0.5, "det_sign": "any"})
    B = 64
    drawn = init.initial_factors(cfg, widths, B, seed=4)
    cfg.det_sign = sign
    conditioned = init.initial_factors(cfg, widths, B, seed=4)
    det = torch.linalg.det(chain(conditioned))
    assert bool((det > 0).all()) if sign == "positive" else bool((det < 0).all())
    flipped = torch.linalg.det(chain(drawn)).sign() != det.sign()
    assert 0 < int(flipped.sum()) < B              # 64 draws: both signs occur (else the test is void)
    reflect = torch.ones(B, 1, widths[0], dtype=torch.float64)
    reflect[flipped, :, 0] = -1
    assert torch.equal(conditioned[0], drawn[0] * reflect)
    for a, b in zip(conditioned[1:], drawn[1:]):
        assert torch.equal(a, b)
    for g, g0 in zip(balancedness_of(conditioned), balancedness_of(drawn)):
        torch.testing.assert_close(g, g0, rtol=0, atol=1e-15)   # W_1 W_1^T: the same products up to rounding


@pytest.mark.parametrize("overrides, message", [
    (["task=completion", "task.shape=[3,4]", "task.observations=5"],
     r"init\.det_sign='positive' is not allowed: a determinant needs a square product, not 3x4"),
    (["model.widths=[2,1,2]"], r"has a layer narrower than 2, so det W0 = 0 always"),
    (["init=file", "init.file=x.pt"], r"init=file gives its factors as they are"),
    (["init.det_sign=sometimes"], r"init\.det_sign='sometimes' is not allowed: choose one of any, positive, negative"),
])
def test_det_sign_is_refused_in_one_sentence(make_cfg, overrides, message):
    from dlntorch.config import ConfigError, validate
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg("init.det_sign=positive", *overrides))


@pytest.mark.parametrize("plane", ["diagonal", "symmetric", "random"])
def test_a_grid_is_the_slice_spec_factored_on_balanced_fibres(make_cfg, plane):
    """init=grid: replica j·points + i starts at W0 = a_i·P + b_j·Q + ε·R with the slice's own
    P, Q (diag(a, b); [[a, b], [b, a]]; two orthonormal random directions) and G_p = 0."""
    from dlntorch.train import Lab
    points, epsilon = 5, 1e-3
    cfg = make_cfg("init=grid", f"init.plane={plane}", f"init.points={points}", "init.a_range=[-2,1]",
                   "init.b_range=[0.5,3]", f"init.epsilon={epsilon}", f"replicas={points ** 2}", "model.depth=3")
    lab = Lab(cfg)
    factors = [f.detach() for f in lab.net.factors]
    # the same seeded generator draws the slice's directions first, as the builder does
    P, Q, R = init.slice_directions(plane, 2, 2, torch.Generator().manual_seed(lab.seeds["init"]))
    if plane == "diagonal":
        assert torch.equal(P, torch.tensor([[1.0, 0], [0, 0]])) and torch.equal(Q, torch.tensor([[0.0, 0], [0, 1]]))
    elif plane == "symmetric":
        assert torch.equal(P, torch.eye(2)) and torch.equal(Q, torch.tensor([[0.0, 1], [1, 0]]))
    else:   # Frobenius-orthonormal directions
        gram = torch.stack([P.flatten(), Q.flatten()]) @ torch.stack([P.flatten(), Q.flatten()]).T
        torch.testing.assert_close(gram, torch.eye(2), rtol=0, atol=1e-15)
    a = torch.linspace(-2, 1, points).repeat(points)                 # a fastest
    b = torch.linspace(0.5, 3, points).repeat_interleave(points)
    W0 = a.view(-1, 1, 1) * P + b.view(-1, 1, 1) * Q + epsilon * R
    # the grid's products are the slice spec exactly (the same arithmetic), and the factors
    # reproduce them to the rounding of an SVD and cube roots of O(1) numbers
    assert torch.equal(init.grid_products(cfg.init, 2, 2, torch.Generator().manual_seed(lab.seeds["init"])), W0)
    torch.testing.assert_close(chain(factors), W0, rtol=0, atol=1e-13)
    assert max(G.abs().max() for G in balancedness_of(factors)) < 1e-13          # balanced to rounding


@pytest.mark.parametrize("override, message", [
    ("replicas=10", "replicas=10 is not allowed: init=grid with init.points=3 has one replica per grid point, "
                    "so it must be init.points² = 9."),
    ("init.a_range=[1,-1]", "init.a_range=[1.0, -1.0] is not allowed: it must be [low, high]"),
    ("init.plane=round", "init.plane='round' is not allowed: choose one of diagonal, symmetric, random."),
    ("init.epsilon=-1", "init.epsilon=-1 is not allowed"),
])
def test_a_bad_grid_is_refused_in_one_sentence(make_cfg, override, message):
    from dlntorch.config import validate
    from dlntorch.errors import ConfigError
    cfg = make_cfg("init=grid", "init.points=3", "replicas=9", override)
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert str(caught.value).startswith(message)
