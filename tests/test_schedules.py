"""Learning-rate schedules (optim.schedule): t = Σ_k lr_k (closed forms and torch's own scheduler),
the fused fast path and the optimiser's path give the same bits, the schedule is checkpointed
(resume across it is bit-identical, through the state dict and through the whole run loop), and
an unknown schedule or a run.time no schedule reaches is refused in one sentence."""
import math

import pytest
import torch

from dlntorch.config import ConfigError
from dlntorch.dynamics import StepDynamics
from dlntorch.train import Lab, run

TASK = ["task=completion", "task.size=3", "task.rank=2", "task.observations=6", "init.scale=0.5"]


def dynamics(make_cfg, *overrides, out="run", layout=None):
    cfg = make_cfg(*TASK, "replicas=4", *overrides, out=out)
    lab = Lab(cfg)
    return StepDynamics(cfg, lab.net, lab.task, lab.seeds["dynamics"], layout=layout)


# Σ_{k<T} lr_k in closed form, T = the run's steps
LR, T = 0.02, 300
CLOSED_FORMS = {
    # Σ_{k<T} (1 + cos(πk/T))/2 = T/2 + ½ Re Σ_{k<T} e^{iπk/T} = T/2 + ½ (Re 2/(1 − e^{iπ/T}) = 1)
    "cosine": (["optim.schedule=cosine"], LR * (T + 1) / 2),
    # Σ_{k<W} (k+1)/W + (T − W) = (W + 1)/2 + T − W
    "warmup": (["optim.schedule=warmup", "optim.warmup_steps=40"], LR * ((40 + 1) / 2 + T - 40)),
    # 100 steps at each of lr, lr/2, lr/4
    "step": (["optim.schedule=step", "optim.decay_every=100", "optim.decay_factor=0.5"], LR * 100 * (1 + 0.5 + 0.25)),
    "constant": (["optim.schedule=constant"], LR * T),
}


@pytest.mark.parametrize("schedule", list(CLOSED_FORMS))
def test_a_runs_t_is_the_sum_of_its_learning_rates(make_cfg, schedule):
    overrides, expected = CLOSED_FORMS[schedule]
    summary = run(make_cfg(*TASK, "replicas=2", "optim=gd", f"optim.lr={LR}", f"run.steps={T}", "run.stop_energy=0",
                           "run.log_points=10", *overrides))
    assert summary["steps"] == T
    # torch's schedulers update the lr recursively (chainable form): each lr_k carries a few
    # rounding errors of the closed form, so Σ lr_k agrees to ~1e-14 relative, asserted at 1e-12
    assert summary["t"] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("schedule", ["cosine", "warmup", "step"])
def test_t_is_exactly_the_sum_of_the_lrs_torchs_scheduler_gives(make_cfg, schedule):
    """An independent torch scheduler on a dummy optimiser: the same lr_k, summed in order."""
    overrides, _ = CLOSED_FORMS[schedule]
    dyn = dynamics(make_cfg, "optim=momentum", f"optim.lr={LR}", f"run.steps={T}", *overrides)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=0.9)
    scheduler = {"cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(dummy, T_max=T),
                 "warmup": lambda: torch.optim.lr_scheduler.LinearLR(dummy, 1 / 40, 1.0, total_iters=39),
                 "step": lambda: torch.optim.lr_scheduler.StepLR(dummy, 100, 0.5)}[schedule]()
    lrs = []
    for _ in range(T):
        lrs.append(dummy.param_groups[0]["lr"])
        dummy.step()
        scheduler.step()
    t, done = 0.0, 0
    for k in (1, 10, 89, 200):
        dyn.advance(k)
        done += k
        for lr in lrs[done - k:done]:
            t += lr
        assert dyn.time(done) == t
    if schedule == "warmup":
        assert lrs[0] == pytest.approx(LR / 40, rel=1e-15) and lrs[39] == pytest.approx(LR, rel=1e-15)
    with pytest.raises(ValueError, match="known at the step reached"):
        dyn.time(done - 1)


@pytest.mark.parametrize("optim,schedule", [("gd", "cosine"), ("sgd", "step"), ("langevin", "warmup")])
@pytest.mark.parametrize("layout", ["batch", "planes"])
def test_the_fused_path_applies_the_schedule_as_the_optimiser_does(make_cfg, optim, schedule, layout):
    """The fused kernel reads the lr of step k from the param group, as optimizer.step() does: in
    the batch layout the same bits; the planes layout multiplies in another order (rounding only,
    as in test_fastpath), so there the same trajectory to 1e-12 and the same clock."""
    extra = [f"optim={optim}", "optim.lr=0.01", "run.steps=200", *CLOSED_FORMS[schedule][0],
             *(["optim.batch_size=3"] if optim == "sgd" else []), *(["optim.beta=1e3"] if optim == "langevin" else [])]
    fused = dynamics(make_cfg, *extra, out="fused", layout=layout)
    plain = dynamics(make_cfg, *extra, out="plain", layout="batch")
    plain.fused = False              # closed-form gradients → p.grad → optimizer.step() → scheduler.step()
    assert fused.fused and fused.layout == layout and fused.scheduler is not None
    for k in (1, 49, 150):
        fused.advance(k)
        plain.advance(k)
        if layout == "batch":
            assert all(torch.equal(x, y) for x, y in zip(fused.factors(), plain.factors()))
        else:
            assert max((x - y).abs().max().item() for x, y in zip(fused.factors(), plain.factors())) < 1e-12
        assert fused.clock == plain.clock
    assert fused.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"] != 0.01


@pytest.mark.parametrize("optim", ["gd", "adam", "group_rmsprop"])
def test_resume_across_the_schedule_is_bit_identical(make_cfg, optim):
    extra = [f"optim={optim}", "run.steps=300", "optim.schedule=cosine"]
    whole = dynamics(make_cfg, *extra, out="whole")
    whole.advance(120)
    whole.advance(180)
    first = dynamics(make_cfg, *extra, out="first")
    first.advance(120)
    saved = first.state_dict()
    second = dynamics(make_cfg, *extra, out="second")
    second.advance(7)                # another state and another point of the schedule, overwritten
    second.load_state_dict(saved)
    second.advance(180)
    assert all(torch.equal(x, y) for x, y in zip(whole.factors(), second.factors()))
    assert second.time(300) == whole.time(300)
    assert second.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


def test_a_killed_scheduled_run_resumes_to_the_uninterrupted_result(killed_and_resumed):
    """The whole loop, checkpoint.pt included: cosine schedule, minibatches without replacement."""
    whole, resumed = killed_and_resumed(*TASK, "replicas=8", "optim=sgd", "optim.lr=0.02", "optim.batch_size=4",
                                        "optim.replacement=false", "optim.schedule=cosine", "run.steps=400",
                                        "run.stop_energy=0", "run.log_points=10", "run.checkpoint_every=100")
    for key in ("steps", "t", "final", "epochs"):
        assert resumed[key] == whole[key], key
    assert whole["t"] == pytest.approx(0.02 * 401 / 2, rel=1e-12)
    assert whole["epochs"] == math.ceil(400 / 2)        # 6 units, batches of 4 + 2: two steps an epoch


BAD = [
    (["optim.schedule=linear"], "optim.schedule", "'linear'", "choose one of constant, cosine, step, warmup"),
    # run.time under a schedule sets the steps by Σ lr_k (tests/test_practice.py); a decaying step
    # schedule never sums past lr·s/(1 − γ) (here 0.05·1000/0.9 = 55.6): that run.time is refused
    (["optim.schedule=step", "run.time=100"], "run.time", "100", None),
    (["optim.schedule=warmup", "optim.warmup_steps=0"], "optim.warmup_steps", "0", None),
    (["optim.schedule=step", "optim.decay_factor=0"], "optim.decay_factor", "0", None),
    (["optim.schedule=step", "optim.decay_every=0"], "optim.decay_every", "0", None),
]


@pytest.mark.parametrize("overrides,key,value,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_schedules_are_refused_in_one_sentence(make_cfg, tmp_path, overrides, key, value, allowed):
    with pytest.raises(ConfigError) as error:
        run(make_cfg("optim=adam", *overrides))
    message = str(error.value)
    assert message.startswith(f"{key}={value} is not allowed: ") and message.endswith(".")
    assert "\n" not in message
    if allowed is not None:
        assert message == f"{key}={value} is not allowed: {allowed}."
    assert not (tmp_path / "run").exists()
