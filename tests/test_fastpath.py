"""Every fast path of StepDynamics against the reference paths (float64).

- closed-form gradients (both layouts: `batch` (B, d, d) with bmm, `planes` replica-last with
  accumulated outer products) against autograd: the same trajectory to 1e-12 over 1000 steps,
  for every task and every step-based dynamics (sgd and langevin draw from the same seed);
- the fused updates (gd, sgd, langevin without torch.optim) against torch.optim.SGD and
  optim.Langevin fed the same closed-form gradients: bit-identical;
- checkpoint / resume through the fast path: bit-identical; the parameters are the state
  between `advance` calls (written back from the planes, re-read when changed outside).
"""
import pytest
import torch

from dlntorch.dynamics import StepDynamics
from dlntorch.train import Lab

TASKS = {
    "seed2x2": ["task=seed2x2"],
    "completion": ["task=completion", "task.size=4", "task.rank=2", "task.observations=10"],
    "sensing": ["task=sensing", "task.size=3", "task.rank=2", "task.observations=12"],
    "regression": ["task=regression", "task.size=3", "task.rank=2", "task.samples=20"],
}
# learning rates well inside stability at init.scale=0.5, so that 1000 steps move the factors by
# O(1) without blowing up rounding differences
DYNAMICS = {
    "gd": ["optim=gd", "optim.lr=0.02"],
    "sgd": ["optim=sgd", "optim.lr=0.01", "optim.batch_size=2"],
    "momentum": ["optim=momentum", "optim.lr=0.005"],
    "adam": ["optim=adam", "optim.lr=0.002"],
    "langevin": ["optim=langevin", "optim.lr=0.01", "optim.beta=1e3"],
}
FUSED = ("gd", "sgd", "langevin")
STEPS = 1000


def dynamics(make_cfg, task, optim, *extra, replicas=4, layout=None, out="run"):
    """A StepDynamics on the lab's own task, initial condition and seeds."""
    cfg = make_cfg(*TASKS[task], *DYNAMICS[optim], f"replicas={replicas}", "init.scale=0.5", *extra, out=out)
    lab = Lab(cfg)
    return StepDynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"], layout=layout)


def trajectory(dyn, chunks=(1, 2, 7, 90, 400, 500)):
    """Factors after each chunk of steps (chunks as the run loop makes them: uneven)."""
    out = []
    for k in chunks:
        dyn.advance(k)
        out.append([f.clone() for f in dyn.factors()])
    assert sum(chunks) == STEPS
    return out


def worst_difference(a, b):
    return max((x - y).abs().max().item() for fa, fb in zip(a, b) for x, y in zip(fa, fb))


@pytest.mark.parametrize("optim", list(DYNAMICS))
@pytest.mark.parametrize("task", list(TASKS))
def test_closed_form_follows_autograd_for_1000_steps(make_cfg, task, optim):
    reference = dynamics(make_cfg, task, optim, "run.gradient=autograd", out="autograd")
    assert not reference.closed_form
    ref = trajectory(reference)
    layouts = ("batch", "planes") if optim in FUSED else ("batch",)
    for layout in layouts:
        fast = dynamics(make_cfg, task, optim, "run.gradient=closed_form", layout=layout, out=layout)
        assert fast.layout == layout and fast.fused == (optim in FUSED)
        got = trajectory(fast)
        scale = max(f.abs().max().item() for f in ref[-1])
        assert all(torch.isfinite(f).all() for f in got[-1]) and 0.05 < scale < 50
        # same products in another association / rounding order: differences are rounding, grown
        # over 1000 steps of a contracting-or-mildly-expanding map
        assert worst_difference(ref, got) < 1e-12, (task, optim, layout)
    # the factors really moved: the comparison is not of a trajectory stuck at its start
    assert worst_difference([ref[0]], [ref[-1]]) > 1e-3


@pytest.mark.parametrize("optim", FUSED)
def test_fused_update_is_bit_identical_to_torch_optim(make_cfg, optim):
    """The fused p ← p − lr·g (weight decay and Langevin noise included) against the optimizer
    object fed the same closed-form gradients."""
    extra = ["optim.weight_decay=0.05"]
    fused = dynamics(make_cfg, "completion", optim, *extra, layout="batch", out="fused")
    plain = dynamics(make_cfg, "completion", optim, *extra, layout="batch", out="plain")
    plain.fused = False          # closed-form gradients → p.grad → optimizer.step()
    a, b = trajectory(fused), trajectory(plain)
    assert all(torch.equal(x, y) for fa, fb in zip(a, b) for x, y in zip(fa, fb))


def test_layout_choice_follows_the_shapes(make_cfg):
    assert dynamics(make_cfg, "seed2x2", "gd", replicas=512).layout == "planes"
    assert dynamics(make_cfg, "seed2x2", "gd", replicas=511).layout == "batch"
    assert dynamics(make_cfg, "seed2x2", "momentum", replicas=1024).layout == "batch"
    assert dynamics(make_cfg, "completion", "gd", "task.size=8", "task.observations=20",
                    replicas=1024).layout == "batch"
    with pytest.raises(ValueError, match="layout"):
        dynamics(make_cfg, "seed2x2", "adam", layout="planes")


@pytest.mark.parametrize("optim,layout", [(o, "batch") for o in ("gd", "langevin", "sgd", "momentum")]
                         + [(o, "planes") for o in ("gd", "langevin", "sgd")])   # planes: fused updates only
def test_resume_from_state_dict_is_bit_identical(make_cfg, optim, layout):
    whole = dynamics(make_cfg, "completion", optim, layout=layout, out="whole")
    whole.advance(150)
    whole.advance(150)
    first = dynamics(make_cfg, "completion", optim, layout=layout, out="first")
    first.advance(150)
    saved = first.state_dict()
    second = dynamics(make_cfg, "completion", optim, layout=layout, out="second")
    second.advance(3)             # a different state, overwritten by the load
    second.load_state_dict(saved)
    second.advance(150)
    assert all(torch.equal(x, y) for x, y in zip(whole.factors(), second.factors()))
    assert second.gradient_evaluations == whole.gradient_evaluations == 300


def test_run_resume_through_the_fast_path_is_bit_identical(killed_and_resumed):
    """The whole run loop with checkpoint.pt: 2x2 at B=600 takes the planes layout. A run killed
    after its checkpoint at step 200 and resumed ends exactly where the uninterrupted run does."""
    whole, resumed = killed_and_resumed("replicas=600", "run.stop_energy=0", "run.log_points=10", "run.steps=400",
                                        "run.checkpoint_every=100", "optim.lr=0.05")
    assert resumed["steps"] == whole["steps"] == 400
    assert resumed["final"]["energy"] == whole["final"]["energy"]
    assert resumed["final"]["singular_values"] == whole["final"]["singular_values"]


def test_planes_write_back_and_external_changes(make_cfg):
    """Between advances the parameters are the state: factors() sees every step, and a change
    made to the parameters from outside (set_factors, a load) is what the next step starts from."""
    planes = dynamics(make_cfg, "seed2x2", "gd", layout="planes", out="p")
    batch = dynamics(make_cfg, "seed2x2", "gd", layout="batch", out="b")
    for dyn in (planes, batch):
        dyn.advance(5)
        dyn.net.set_factors([0.5 * f for f in dyn.factors()])
        dyn.advance(5)
    assert worst_difference([planes.factors()], [batch.factors()]) < 1e-14
    assert all(p._version > 0 for p in planes.params)


def test_cuda_graphs_flag_falls_back_to_eager_off_cuda(make_cfg):
    eager = dynamics(make_cfg, "seed2x2", "gd", replicas=600, out="eager")
    flagged = dynamics(make_cfg, "seed2x2", "gd", replicas=600, out="graphs")
    flagged.cuda_graphs = True
    a, b = trajectory(eager), trajectory(flagged)
    assert flagged._graph is None
    assert all(torch.equal(x, y) for fa, fb in zip(a, b) for x, y in zip(fa, fb))


def test_diverged_replicas_stay_put_and_do_not_touch_the_others(make_cfg):
    """A non-finite replica stays non-finite in the planes layout too, and the others follow the
    trajectory they would have had alone."""
    dyn = dynamics(make_cfg, "seed2x2", "gd", replicas=600, out="nan")
    ref = dynamics(make_cfg, "seed2x2", "gd", replicas=600, out="ref")
    assert dyn.layout == "planes"
    factors = [f.clone() for f in dyn.factors()]
    factors[1][7, 0, 0] = float("nan")
    dyn.net.set_factors(factors)
    dyn.advance(50)
    ref.advance(50)
    assert not torch.isfinite(dyn.factors()[2][7]).all()
    keep = torch.ones(600, dtype=torch.bool)
    keep[7] = False
    assert all(torch.equal(x[keep], y[keep]) for x, y in zip(dyn.factors(), ref.factors()))
