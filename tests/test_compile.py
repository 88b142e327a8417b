"""run.compile (dynamics/compiled.py): the compiled fast step against the eager one, float64.

Compiling costs seconds, so the shapes are the smallest (2x2 at depth 2, 4 replicas, 50 steps)
and only gd on the planes layout runs by default; the other rules and layouts, and the compiled
run's resume through the run loop, are marked slow. The fallback and the `auto` rule need no
compile at all.
"""
import math

import pytest
import torch

from dlntorch.dynamics import StepDynamics, compiled
from dlntorch.train import Lab

RULES = {
    "gd": ["optim=gd", "optim.lr=0.02", "optim.weight_decay=0.01"],
    "sgd": ["optim=sgd", "optim.lr=0.01", "optim.batch_size=2"],
    "langevin": ["optim=langevin", "optim.lr=0.01", "optim.beta=1e3", "optim.weight_decay=0.01"],
    # lr moves every step: compiled as a constant, it recompiled each step until dynamo's limit failed the run
    "gd_cosine": ["optim=gd", "optim.lr=0.02", "optim.schedule=cosine", "run.steps=50"],
}
CHUNKS = (1, 2, 7, 40)       # uneven, as the run loop makes them


def dynamics(make_cfg, rule, layout, setting, out):
    cfg = make_cfg("task=seed2x2", "model.depth=2", *RULES[rule], "replicas=4", "init.scale=0.5",
                   f"run.compile={setting}", out=out)
    lab = Lab(cfg)
    return StepDynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"], layout=layout)


def trajectory(dyn):
    out = []
    for k in CHUNKS:
        dyn.advance(k)
        out.append([f.clone() for f in dyn.factors()])
    return out


def worst_difference(a, b):
    return max((x - y).abs().max().item() for fa, fb in zip(a, b) for x, y in zip(fa, fb))


def compare(make_cfg, rule, layout):
    eager = dynamics(make_cfg, rule, layout, "off", "eager")
    fast = dynamics(make_cfg, rule, layout, "on", "compiled")
    assert fast.compiles and not eager.compiles
    a, b = trajectory(eager), trajectory(fast)
    assert fast.compile_seconds is not None and fast.compiles   # it did compile, and it stayed compiled
    # the same ops in the same order, fused: they differ by rounding only (observed ≤ 1e-16 after
    # 50 steps at these O(1) entries); the noise is drawn eagerly in the same order, so the
    # stochastic rules follow the same path too
    assert worst_difference(a, b) < 1e-12
    assert eager.gradient_evaluations == fast.gradient_evaluations == sum(CHUNKS)


def test_compiled_gd_on_planes_follows_eager(make_cfg):
    compare(make_cfg, "gd", "planes")


def test_compiled_gd_under_a_schedule_follows_eager_without_recompiling(make_cfg):
    """The cosine schedule changes lr at each of the 50 steps: one compile serves them all."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compare(make_cfg, "gd_cosine", "planes")
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"{frames} graphs compiled for one step function"


@pytest.mark.slow
@pytest.mark.parametrize("rule,layout", [("gd", "batch"), ("sgd", "batch"), ("sgd", "planes"),
                                         ("langevin", "batch"), ("langevin", "planes")])
def test_compiled_step_follows_eager(make_cfg, rule, layout):
    compare(make_cfg, rule, layout)


def _eager_trajectory(make_cfg, rule="langevin", layout="planes"):
    return trajectory(dynamics(make_cfg, rule, layout, "off", "reference"))


def test_torch_compile_raising_falls_back_to_eager_with_one_warning(make_cfg, monkeypatch, recwarn):
    """torch.compile itself fails (no toolchain, say): one warning, then the eager step's bits."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", refuse)
    fast = dynamics(make_cfg, "langevin", "planes", "on", "compiled")
    got = trajectory(fast)
    warned = [w for w in recwarn if "run.compile" in str(w.message)]
    assert len(warned) == 1 and "no C++ compiler" in str(warned[0].message)
    assert not fast.compiles
    monkeypatch.undo()
    want = _eager_trajectory(make_cfg)
    assert all(torch.equal(x, y) for fa, fb in zip(got, want) for x, y in zip(fa, fb))


def test_a_compiled_step_failing_on_its_first_call_redoes_it_eagerly(make_cfg, monkeypatch, recwarn):
    """The compile fails only when first called (an op the backend does not take), after moving
    part of the state: the state is put back and the step redone eagerly, with the same draws."""
    def broken(step, **kwargs):
        def call(state, *args):
            state[0].add_(1.0)                     # a half-done step
            raise NotImplementedError("unsupported op")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    fast = dynamics(make_cfg, "langevin", "planes", "on", "compiled")
    got = trajectory(fast)
    assert len([w for w in recwarn if "run.compile" in str(w.message)]) == 1
    monkeypatch.undo()
    want = _eager_trajectory(make_cfg)
    assert all(torch.equal(x, y) for fa, fb in zip(got, want) for x, y in zip(fa, fb))


def test_auto_leaves_short_runs_eager(make_cfg):
    """`auto` on the default run (20000 steps of 256 2x2 networks, a second or two) stays eager,
    and no run the cost model puts at one second of stepping compiles, whatever its shape."""
    cfg = make_cfg("task=seed2x2", "optim=gd")
    lab = Lab(cfg)
    assert cfg.run.compile == "auto" and not lab.dynamics.compiles
    for replicas, widths in [(1, [2, 2, 2, 2]), (4096, [2, 2, 2, 2]), (1, [100, 100, 100, 100]), (10**6, [2, 2])]:
        steps = max(1, math.floor(1.0 / compiled.eager_seconds(1, replicas, widths)))
        assert compiled.eager_seconds(steps, replicas, widths) <= 1.0
        assert not compiled.decide("auto", steps, replicas, widths)
    # a long run of many replicas is worth it (~5 minutes of modelled stepping), on the planes
    # layout only: on the batch layout inductor keeps bmm external and gains nothing
    assert compiled.decide("auto", 10**6, 4096, [2, 2, 2, 2], "planes")
    assert not compiled.decide("auto", 10**6, 4096, [2, 2, 2, 2], "batch")
    assert not compiled.decide("auto", 10**7, 1, [100, 100, 100, 100], "batch")
    assert compiled.decide("on", 1, 1, [2, 2]) and not compiled.decide("off", 10**9, 4096, [2, 2, 2, 2])


def test_run_compile_refuses_other_values(make_cfg):
    from dlntorch.errors import ConfigError
    from dlntorch.train import run
    with pytest.raises(ConfigError, match="run.compile"):
        run(make_cfg("task=seed2x2", "run.compile=yes"))


@pytest.mark.slow
def test_a_compiled_run_resumes_bit_identically(killed_and_resumed):
    """The whole loop with checkpoint.pt, compiled (planes at B = 600): killed after a checkpoint
    and resumed, it ends exactly where the uninterrupted compiled run does."""
    whole, resumed = killed_and_resumed("replicas=600", "run.compile=on", "run.stop_energy=0", "run.log_points=10",
                                        "run.steps=400", "run.checkpoint_every=100", "optim.lr=0.05")
    assert resumed["steps"] == whole["steps"] == 400
    assert resumed["final"]["energy"] == whole["final"]["energy"]
    assert resumed["final"]["singular_values"] == whole["final"]["singular_values"]


# -- the entries program (gd without draws, K steps per call) ------------------------------

def test_compiled_gd_on_planes_runs_the_entries_program(make_cfg):
    """gd at a constant lr on the planes layout takes the K-step entries program (not the
    one-step planes program) and follows eager, weight decay included (RULES["gd"])."""
    fast = dynamics(make_cfg, "gd", "planes", "on", "entries")
    fast.advance(1)
    assert isinstance(fast._steps, compiled.CompiledSteps) and fast._compiled is None
    assert fast._steps.K == compiled.STEPS_PER_CALL


def test_the_entries_program_is_bit_identical_however_a_run_is_cut(make_cfg):
    """What resuming needs: 50 steps in one stretch (six 8-step calls and two single steps)
    and in stretches of 1, 2, 7, 40 (single steps, then five 8-step calls) end on the same
    bits — the 8-step and one-step programs do each step's ops alike."""
    whole = dynamics(make_cfg, "gd", "planes", "on", "whole")
    cut = dynamics(make_cfg, "gd", "planes", "on", "cut")
    whole.advance(sum(CHUNKS))
    got = trajectory(cut)[-1]
    assert sorted(cut._steps.programs) == [1, compiled.STEPS_PER_CALL]
    assert all(torch.equal(x, y) for x, y in zip(whole.factors(), got))


@pytest.mark.parametrize("task", ["task=seed2x2", "task=sensing", "task=regression"])
def test_affine_gradient_is_the_tasks_gradient(make_cfg, task):
    """AffineGradient.probe: the map it finds gives the task's ∇E at random products to
    rounding (1e-12 of the terms' size, float64), on entries as the program evaluates it."""
    lab = Lab(make_cfg(task, "model.depth=2", "replicas=5"))
    W = torch.randn(5, *lab.task.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gradient = compiled.AffineGradient.probe(lab.task.gradient, W)
    assert gradient is not None
    got = gradient([[W[:, i, j] for j in range(W.shape[2])] for i in range(W.shape[1])])
    want = lab.task.gradient(W)
    assert max((got[i][j] - want[:, i, j]).abs().max().item()
               for i in range(W.shape[1]) for j in range(W.shape[2])) < 1e-12 * (1 + want.abs().max().item())


def test_affine_gradient_refuses_what_is_not_one_affine_map():
    """A gradient that is not affine (W ↦ W³), or that differs by replica, is not modelled."""
    W = torch.randn(6, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert compiled.AffineGradient.probe(lambda X: X ** 3, W) is None
    per_replica = torch.randn(6, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert compiled.AffineGradient.probe(lambda X: X - per_replica, W) is None
    assert compiled.AffineGradient.probe(lambda X: 2 * X - 1, W) is not None
    W[2] = float("nan")          # a diverged replica: the map is checked on the others
    assert compiled.AffineGradient.probe(lambda X: 2 * X - 1, W) is not None


def test_steps_per_call_shrinks_with_the_shapes():
    """K: STEPS_PER_CALL for 2x2 factors; fewer, then 0 (the planes program), as the unrolled ops grow."""
    unit = compiled.AffineGradient([[(0, 1.0)]], [0.0], (1, 1))
    assert compiled.steps_per_call([2, 2, 2, 2], unit) == compiled.STEPS_PER_CALL
    assert 0 < compiled.steps_per_call([4, 4, 4, 4], unit) < compiled.STEPS_PER_CALL
    assert compiled.steps_per_call([10, 10, 10, 10], unit) == 0


def test_the_entries_program_failing_to_compile_leaves_eager_bits(make_cfg, monkeypatch, recwarn):
    """torch.compile raising for gd: one warning, and the eager trajectory bit for bit."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", refuse)
    got = trajectory(dynamics(make_cfg, "gd", "planes", "on", "compiled"))
    assert len([w for w in recwarn if "run.compile" in str(w.message)]) == 1
    monkeypatch.undo()
    want = _eager_trajectory(make_cfg, "gd")
    assert all(torch.equal(x, y) for fa, fb in zip(got, want) for x, y in zip(fa, fb))
