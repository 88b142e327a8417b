"""The practical optimisers (float64): each against torch's own (or, for group_rmsprop, a written-out
reference) on one network; replicas independent bit for bit; minibatches without replacement and
label noise; the bad values refused; weight decay in the exact flow, G(t) = e^{−2λt} G(0)."""
import math

import pytest
import torch

from dlntorch.config import ConfigError
from dlntorch.dynamics import StepDynamics, build_dynamics
from dlntorch.network import balancedness_of, chain
from dlntorch.tasks import Reshuffled
from dlntorch.train import Lab, run

TASK = ["task=completion", "task.size=3", "task.rank=2", "task.observations=6", "init.scale=0.5"]
# learning rates well inside stability for these factors; weight decay on every one of them
OPTIMISERS = {
    "gd": ["optim.lr=0.02"],
    "momentum": ["optim.lr=0.005"],
    "nesterov": ["optim.lr=0.005"],
    "adam": ["optim.lr=0.002"],
    "adamw": ["optim.lr=0.002"],
    "rmsprop": ["optim.lr=0.001"],
    "group_rmsprop": ["optim.lr=0.002"],
}
TORCH = {
    "gd": lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay),
    "momentum": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "nesterov": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=True,
                                             weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, alpha=c.alpha, eps=c.eps, weight_decay=c.weight_decay),
}
STEPS, EVERY = 300, 50


def lab_dynamics(make_cfg, name, *extra, replicas=3, out="run", perturb=None):
    cfg = make_cfg(*TASK, f"optim={name}", *OPTIMISERS.get(name, []), "optim.weight_decay=0.05",
                   f"replicas={replicas}", *extra, out=out)
    lab = Lab(cfg)
    if perturb is not None:
        lab.net.set_factors(perturb([f.detach().clone() for f in lab.net.factors]))
    return cfg, lab, StepDynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"])


class GroupRMSpropReference:
    """group_rmsprop written out for ONE network (unbatched factors), from the formula:
    g_p = ∂L/∂W_p + λW_p, v ← αv + (1−α) Σ_p ‖g_p‖²/P, W_p ← W_p − lr g_p/(√v + ε)."""

    def __init__(self, params, c):
        self.params, self.c, self.v = params, c, 0.0

    @torch.no_grad()
    def step(self):
        c = self.c
        grads = [p.grad + c.weight_decay * p for p in self.params]
        P = sum(p.numel() for p in self.params)
        self.v = c.alpha * self.v + (1 - c.alpha) * sum(float((g * g).sum()) for g in grads) / P
        for p, g in zip(self.params, grads):
            p -= c.lr * g / (math.sqrt(self.v) + c.eps)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def one_network(lab, replica, name, cfg, schedule=None):
    """Replica `replica` alone: unbatched factors, autograd gradients, torch's optimiser."""
    params = [f.detach()[replica].clone().requires_grad_(True) for f in lab.net.factors]
    optimizer = GroupRMSpropReference(params, cfg.optim) if name == "group_rmsprop" else TORCH[name](params, cfg.optim)
    scheduler = None if schedule is None else schedule(optimizer)
    path = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        lab.task.energy(chain(params)[None])[0].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % EVERY == 0:
            path.append([p.detach().clone() for p in params])
    return path


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_each_optimiser_is_torchs_own_on_one_network(make_cfg, name):
    cfg, lab, dyn = lab_dynamics(make_cfg, name)
    start = [f.detach().clone() for f in lab.net.factors]
    assert dyn.closed_form
    path = []
    for _ in range(STEPS // EVERY):
        dyn.advance(EVERY)
        path.append([f.clone() for f in dyn.factors()])
    lab.net.set_factors(start)
    for replica in range(3):
        reference = one_network(lab, replica, name, cfg)
        # closed-form against autograd gradients: the same arithmetic in another order, so
        # rounding only, grown over 300 steps of a mildly expanding map
        worst = max((a[replica] - b).abs().max().item() for fa, fb in zip(path, reference) for a, b in zip(fa, fb))
        assert worst < 1e-12, (name, replica, worst)
    moved = max((a - b).abs().max().item() for a, b in zip(path[-1], start))
    assert moved > 1e-3              # the trajectory really went somewhere


def test_a_cosine_schedule_is_torchs_own_on_one_network(make_cfg):
    cfg, lab, dyn = lab_dynamics(make_cfg, "adamw", "optim.schedule=cosine", f"run.steps={STEPS}")
    start = [f.detach().clone() for f in lab.net.factors]
    path = []
    for _ in range(STEPS // EVERY):
        dyn.advance(EVERY)
        path.append([f.clone() for f in dyn.factors()])
    lab.net.set_factors(start)
    reference = one_network(lab, 1, "adamw", cfg,
                            schedule=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS))
    worst = max((a[1] - b).abs().max().item() for fa, fb in zip(path, reference) for a, b in zip(fa, fb))
    assert worst < 1e-12, worst
    assert dyn.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-18)   # annealed to 0


def _perturb_replica_0(factors):
    factors[0][0] *= 1.1
    factors[-1][0] += 0.05
    return factors


@pytest.mark.parametrize("name,extra", [(n, []) for n in OPTIMISERS] + [
    ("sgd", ["optim.batch_size=2", "optim.replacement=false", "optim.label_noise=0.1"]),
    ("sgd", ["optim.batch_size=4", "optim.lr=0.02"]),
    ("group_rmsprop", ["optim.schedule=warmup", "optim.warmup_steps=30", "optim.batch_size=3"]),
    ("langevin", ["optim.beta=1e3", "optim.lr=0.01", "optim.label_noise=0.1"]),
], ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_replicas_are_independent_bit_for_bit(make_cfg, name, extra):
    """Perturbing replica 0's start changes no other replica's trajectory, bit for bit (the draws
    of minibatches and noise do not depend on the values)."""
    _, _, plain = lab_dynamics(make_cfg, name, *extra, replicas=4, out="plain")
    _, _, moved = lab_dynamics(make_cfg, name, *extra, replicas=4, out="moved", perturb=_perturb_replica_0)
    for k in (1, 29, 70):
        plain.advance(k)
        moved.advance(k)
    a, b = plain.factors(), moved.factors()
    assert all(torch.equal(x[1:], y[1:]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], b[0][0])      # replica 0 itself did change


# ------------------------------------------------------------------------------ minibatches

def test_without_replacement_each_epoch_draws_every_unit_once_per_replica(make_cfg):
    cfg = make_cfg("task=completion", "task.size=4", "task.observations=10", "optim=sgd", "optim.batch_size=3",
                   "optim.replacement=false", "replicas=5")
    lab = Lab(cfg)
    task, generator = lab.task, torch.Generator().manual_seed(3)
    sampler = Reshuffled(task, 5, 3)
    for epoch in range(3):
        batches = [sampler.draw(generator) for _ in range(4)]          # 3 + 3 + 3 + 1 = 10 units
        chosen = [(w > 0).to(torch.float64) for w in batches]
        # each observed entry once per epoch, no unobserved one, for every replica
        assert torch.equal(sum(chosen), task.mask.expand(5, -1, -1))
        # the weights units/k of each batch's own size k: every minibatch energy unbiased
        for w, k in zip(batches, (3, 3, 3, 1)):
            assert torch.equal(w[w > 0], torch.full_like(w[w > 0], 10 / k))
        assert sampler.epochs == epoch + 1 and sampler.position == 0
    first = torch.stack([(w > 0) for w in batches])                 # replicas walk their own orders
    assert any(not torch.equal(first[:, 0], first[:, b]) for b in range(1, 5))


def test_without_replacement_resumes_mid_epoch_bit_identically(make_cfg):
    extra = ("optim.batch_size=4", "optim.replacement=false", "optim.label_noise=0.05")
    _, _, whole = lab_dynamics(make_cfg, "sgd", *extra, out="whole")
    whole.advance(7)
    whole.advance(6)
    _, _, first = lab_dynamics(make_cfg, "sgd", *extra, out="first")
    first.advance(7)                                  # 7 steps of 4 units: mid-way through an epoch of 6
    saved = first.state_dict()
    _, _, second = lab_dynamics(make_cfg, "sgd", *extra, out="second")
    second.advance(2)
    second.load_state_dict(saved)
    second.advance(6)
    assert all(torch.equal(x, y) for x, y in zip(whole.factors(), second.factors()))
    # an epoch of 6 units is two steps (4 + 2): 13 steps begin 7 epochs
    assert second.counters() == whole.counters() == {"epochs": 7}


def test_label_noise_is_fresh_gaussian_noise_on_the_observed_targets(make_cfg):
    """Over many replicas the noisy gradient minus the clean one has mean 0 and standard deviation
    2cσ on observed entries (c = ½ for half_sum), exactly 0 elsewhere."""
    lab = Lab(make_cfg(*TASK))
    task, sigma, B = lab.task, 0.3, 40000
    W = torch.randn(B, 3, 3, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    noise = task.gradient(W, None, task.label_noise(B, sigma, generator)) - task.gradient(W)
    observed = task.mask.bool()
    assert torch.equal(noise[:, ~observed], torch.zeros_like(noise[:, ~observed]))
    sd = 2 * task.coefficient * sigma
    values = noise[:, observed]
    # standard errors of a mean and of a standard deviation over B draws: sd/√B and sd/√(2B)
    assert values.mean(0).abs().max() < 5 * sd / math.sqrt(B)
    assert (values.std(0) - sd).abs().max() < 5 * sd / math.sqrt(2 * B)
    again = task.label_noise(B, sigma, generator)
    assert not torch.equal(again, task.label_noise(B, sigma, torch.Generator().manual_seed(2)))  # fresh draws


@pytest.mark.parametrize("name,extra", [("gd", ["optim.label_noise=0.1"]),
                                        ("sgd", ["optim.batch_size=3", "optim.replacement=false",
                                                 "optim.label_noise=0.1", "optim.lr=0.01"])])
def test_label_noise_and_epochs_follow_autograd(make_cfg, name, extra):
    """The closed-form path and autograd draw the same minibatches and label noise: the same
    trajectory to rounding."""
    _, _, fast = lab_dynamics(make_cfg, name, *extra, "run.gradient=closed_form", out="fast")
    _, _, slow = lab_dynamics(make_cfg, name, *extra, "run.gradient=autograd", out="slow")
    assert fast.closed_form and not slow.closed_form
    fast.advance(200)
    slow.advance(200)
    assert max((a - b).abs().max().item() for a, b in zip(fast.factors(), slow.factors())) < 1e-12


BAD = [
    (["optim=sgd", "optim.batch_size=3"], "optim.batch_size", "3",
     "it must be at most the 2 observed entries, measurements or samples of task=seed2x2"),
    (["optim=adam", "task=regression", "task.samples=10", "optim.batch_size=11"], "optim.batch_size", "11", None),
    (["optim=momentum", "optim.batch_size=0"], "optim.batch_size", "0", None),
    (["optim=adamw", "optim.weight_decay=-0.01"], "optim.weight_decay", "-0.01", None),
    (["optim=gd", "optim.label_noise=-0.1"], "optim.label_noise", "-0.1", None),
    (["optim=flow", "optim.weight_decay=-1"], "optim.weight_decay", "-1", None),
    (["optim=flow", "optim.weight_decay=0.1", "optim.compare_downstairs=true", "init=balanced"],
     "optim.compare_downstairs", "True", None),
    (["optim=nesterov", "optim.momentum=0"], "optim.momentum", "0", None),
    (["optim=rmsprop", "optim.alpha=1"], "optim.alpha", "1", None),
    (["optim=group_rmsprop", "optim.eps=0"], "optim.eps", "0", None),
]


@pytest.mark.parametrize("overrides,key,value,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_refused_in_one_sentence(make_cfg, tmp_path, overrides, key, value, allowed):
    with pytest.raises(ConfigError) as error:
        run(make_cfg(*overrides))
    message = str(error.value)
    assert message.startswith(f"{key}={value} is not allowed: ") and message.endswith(".")
    assert "\n" not in message
    if allowed is not None:
        assert message == f"{key}={value} is not allowed: {allowed}."
    assert not (tmp_path / "run").exists()       # before any compute


# ------------------------------------------------------------------------------ the exact flow

def test_weight_decay_in_the_flow_shrinks_the_balancedness_as_exp_minus_2_lambda_t(make_cfg):
    """dW_p/dt = −∂L/∂W_p − λW_p: the L part conserves G_p = W_{p+1}^T W_{p+1} − W_p W_p^T and
    the decay scales it, dG_p/dt = −2λG_p, so G_p(t) = e^{−2λt} G_p(0) along the solution."""
    lam = 0.3
    cfg = make_cfg(*TASK, "optim=flow", f"optim.weight_decay={lam}", "optim.lr=0.01", "replicas=4",
                   "model.depth=3")
    lab = Lab(cfg)
    G0 = [g.detach().clone() for g in lab.net.balancedness()]
    scale = max(g.abs().max().item() for g in G0)
    assert scale > 0.1                                 # an unbalanced start: G(0) is not 0
    flow = build_dynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"])
    steps = (50, 100, 200, 400)
    flow.plan(steps)
    done = 0
    for step in steps:
        flow.advance(step - done)
        done = step
        t = flow.time(step)
        G = balancedness_of(flow.factors())
        worst = max((g - math.exp(-2 * lam * t) * g0).abs().max().item() for g, g0 in zip(G, G0))
        # the solver holds rtol 1e-10 / atol 1e-12 per step on the factors (entries O(1)); G is
        # quadratic in them, and its error accumulates over the window: 1e-8 of G's scale
        assert worst < 1e-8 * scale, (t, worst)
    assert math.exp(-2 * lam * flow.time(400)) < 0.1   # G really shrank by an order of magnitude


def test_gd_approaches_the_flow_at_rate_lr_on_the_seed_task(make_cfg):
    """Gradient descent is the flow's Euler scheme: at fixed t its product is O(lr) from the flow's,
    so halving lr halves the distance (the ratio within 10% of 2: the O(lr²) remainder)."""
    common = ("task=seed2x2", "model.depth=3", "init.scale=0.3", "replicas=8")
    lab = Lab(make_cfg(*common, "optim=flow", "optim.lr=0.1", out="flow"))
    initial = [f.detach().clone() for f in lab.net.factors]
    flow = build_dynamics(lab.cfg, lab.net, lab.task, lab.seeds["dynamics"])
    flow.plan([80])
    flow.advance(80)                                   # t = 8
    target = chain(flow.factors())
    distances = []
    for lr in (0.1, 0.05, 0.025):
        cfg = make_cfg(*common, "optim=gd", f"optim.lr={lr}", out=f"gd{lr}")
        start = Lab(cfg)                               # the same initial conditions (same seeds)
        assert all(torch.equal(a, b) for a, b in zip(start.net.factors, initial))
        gd = StepDynamics(cfg, start.net, start.task, start.seeds["dynamics"])
        gd.advance(round(8 / lr))
        assert gd.time(round(8 / lr)) == pytest.approx(8.0, rel=1e-12)
        distances.append((chain(gd.factors()) - target).flatten(1).norm(dim=1).median().item())
    assert distances[0] > 1e-3                         # a measurable gap, far above the flow's tolerance
    for coarse, fine in zip(distances, distances[1:]):
        assert 1.8 < coarse / fine < 2.2, distances
