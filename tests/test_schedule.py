"""task.schedule: nested observed sets switched at given steps, exact at the switch, resumed
bit-identically across it, refused in one sentence when malformed."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dlntorch import logger
from dlntorch.config import ConfigError
from dlntorch.tasks import build_task
from dlntorch.train import run

SCHEDULE = "task.schedule=[{at:0,observations:10},{at:50,observations:25}]"
COMPLETION = ["task=completion", "task.size=6", "task.rank=2", "task.seed=3", "replicas=3", "init.scale=0.3",
              "run.stop_energy=0", "model.depth=2", "optim.lr=0.1"]


def final_factors(out: Path) -> list[torch.Tensor]:
    state = torch.load(out / "checkpoint.pt", weights_only=False)["dynamics"]
    return list(state["factors"] if "factors" in state else state["state"])


def trajectory(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "trajectory.npz") as saved:
        return {k: saved[k] for k in saved.files}


def test_the_sets_are_nested_prefixes_and_the_first_is_the_unscheduled_mask(make_cfg):
    scheduled = build_task(make_cfg(*COMPLETION, SCHEDULE).task, 3)
    plain = {k: build_task(make_cfg(*COMPLETION, f"task.observations={k}").task, 3) for k in (10, 25)}
    assert torch.equal(scheduled.mask, plain[10].mask) and torch.equal(scheduled.values, plain[10].values)
    scheduled.follow_schedule(50)
    assert torch.equal(scheduled.mask, plain[25].mask) and torch.equal(scheduled.values, plain[25].values)
    assert bool((plain[10].mask <= plain[25].mask).all())      # nested: the later contains the earlier
    assert scheduled.residuals == 25 and not scheduled.follow_schedule(60)


def test_the_switch_is_exact(make_cfg, tmp_path):
    """Before the switch the run is the one with the smaller set (same data, same bits); the row
    logged at the switch step holds the larger set's energy of the same factors."""
    args = [*COMPLETION, "run.steps=50", "run.log_points=60"]
    summary = run(make_cfg(*args, SCHEDULE, out="scheduled"))
    run(make_cfg(*args, "task.observations=10", out="small"))
    rows, plain = trajectory(tmp_path / "scheduled"), trajectory(tmp_path / "small")
    assert rows["observations"][:, 0].tolist() == [10.0] * 50 + [25.0]
    assert np.array_equal(rows["energy"][:-1], plain["energy"][:-1])
    assert np.array_equal(rows["step"], plain["step"])

    larger = build_task(make_cfg(*args, "task.observations=25").task, 3)
    W1, W2 = final_factors(tmp_path / "scheduled")
    energy = larger.energy(W2 @ W1).numpy()
    # the same function of the same bits: equal to rounding of the one product
    np.testing.assert_allclose(rows["energy"][-1], energy, rtol=1e-13)
    assert summary["schedule"] == [{"at": 0, "t": 0.0, "observations": 10},
                                   {"at": 50, "t": pytest.approx(5.0), "observations": 25}]


def test_gd_at_depth_one_follows_the_switched_mask_step_by_step(make_cfg, tmp_path):
    """An independent loop: W ← W − lr·mask_k ∘ (W − Y), the mask switched at step 50."""
    args = [*COMPLETION, "model.depth=1", "run.steps=90", "run.log_points=10"]
    run(make_cfg(*args, SCHEDULE))
    cfg = make_cfg(*args, SCHEDULE)
    task = build_task(cfg.task, 3)
    from dlntorch.config import derive_seeds
    from dlntorch.init import initial_factors
    W = initial_factors(cfg.init, [6, 6], 3, derive_seeds(cfg)["init"])[0]
    for step in range(90):
        task.follow_schedule(step)
        W = W - 0.1 * task.mask * (W - task.values)
    np.testing.assert_allclose(final_factors(tmp_path / "run")[0], W, rtol=0, atol=1e-14)  # a few roundings


def test_the_exact_flow_switches_at_the_switch_time(make_cfg, tmp_path):
    """optim=flow at depth 1: an entry observed from time T relaxes as Y + (W0 − Y) e^{−(t − T)}
    from T on, one never observed stays W0 (solver tolerance rtol 1e-10, atol 1e-12)."""
    args = [*COMPLETION, "model.depth=1", "optim=flow", "optim.lr=0.1", "run.steps=90", "run.log_points=12"]
    run(make_cfg(*args, SCHEDULE))
    cfg = make_cfg(*args, SCHEDULE)
    task = build_task(cfg.task, 3)
    first = task.mask.clone()
    task.follow_schedule(50)
    second = task.mask - first
    from dlntorch.config import derive_seeds
    from dlntorch.init import initial_factors
    W0 = initial_factors(cfg.init, [6, 6], 3, derive_seeds(cfg)["init"])[0]
    Y = task.values
    t, T = 9.0, 5.0
    expected = first * (Y + (W0 - Y) * math.exp(-t)) + second * (Y + (W0 - Y) * math.exp(-(t - T))) \
        + (1 - task.mask) * W0
    np.testing.assert_allclose(final_factors(tmp_path / "run")[0], expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("crash_at", [2, 3], ids=["checkpoint-before-switch", "checkpoint-after-switch"])
def test_resume_across_the_switch_is_bit_identical(make_cfg, tmp_path, monkeypatch, crash_at):
    """Checkpoints at 100, 200, 300; the switch at 150. A crash writing the 2nd (3rd) checkpoint
    leaves the one at 100 (200), before (after) the switch; resumed, the run ends in the same bits
    as an uninterrupted one, TensorBoard shows every step once and the switch marker once."""
    from test_resume import assert_same_run, scalars
    args = [*COMPLETION, "run.steps=400", "run.log_points=30", "run.checkpoint_every=100",
            "task.schedule=[{at:0,observations:10},{at:150,observations:25}]"]
    replace, calls = os.replace, []

    def crash(src, dst):
        if Path(dst).name == "checkpoint.pt":
            calls.append(dst)
            if len(calls) == crash_at:
                raise OSError("simulated crash")
        return replace(src, dst)

    monkeypatch.setattr(logger.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run(make_cfg(*args))
    monkeypatch.undo()
    resumed = run(make_cfg(*args, "resume=true"))
    reference = run(make_cfg(*args, out="reference"))
    assert_same_run(resumed, reference)
    assert resumed["schedule"] == reference["schedule"]
    for name in ("energy", "observations", "step"):
        assert np.array_equal(trajectory(tmp_path / "run")[name], trajectory(tmp_path / "reference")[name])
    for a, b in zip(final_factors(tmp_path / "run"), final_factors(tmp_path / "reference")):
        assert torch.equal(a, b)
    shown = scalars(tmp_path / "run" / "tb")
    assert shown["task/observations"] == [(0, 10.0), (150, 25.0)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["schedule"][1]["at"] == 150


def test_sensing_follows_a_schedule_of_its_measurements(make_cfg):
    cfg = make_cfg("task=sensing", "task.size=4", "task.schedule=[{at:0,observations:5},{at:10,observations:12}]")
    task = build_task(cfg.task, 0)
    W = torch.randn(2, 4, 4, dtype=torch.float64)
    assert task.sensors.shape[0] == 12 and task.residuals == 5
    r = torch.einsum("kij,bij->bk", task.sensors, W) - task.measurements
    np.testing.assert_allclose(task.energy(W), 0.5 / 5 * (r[:, :5] ** 2).sum(1), rtol=1e-13)  # half_mean
    task.follow_schedule(10)
    np.testing.assert_allclose(task.energy(W), 0.5 / 12 * (r ** 2).sum(1), rtol=1e-13)


@pytest.mark.parametrize("schedule, message", [
    ("[{at:0,observations:20},{at:50,observations:10}]", r"must be nested.*observations=\[20, 10\]"),
    ("[{at:0,observations:10},{at:50,observations:20},{at:50,observations:30}]", r"at=\[0, 50, 50\].*increase"),
    ("[{at:10,observations:10}]", r"must start at 0"),
    ("[{at:0,observations:10},{at:50,observations:40}]", r"largest set \(40 entries\) exceeds the 36 entries"),
    ("[{at:0,count:10}]", r"\{at: step, observations: count\}"),
])
def test_a_malformed_schedule_is_refused_in_one_sentence(make_cfg, schedule, message):
    with pytest.raises(ConfigError, match=message) as error:
        run(make_cfg(*COMPLETION, f"task.schedule={schedule}"))
    assert str(error.value).startswith("task.schedule=") and str(error.value).count(". ") == 0


def test_a_schedule_is_refused_where_the_task_has_none(make_cfg):
    with pytest.raises(ConfigError, match=r"task=seed2x2 has no schedule.*task=completion and task=sensing"):
        run(make_cfg("task.schedule=[{at:0,observations:1}]"))


# ------------------------------------------------------------------ task=sensing task.file

def test_sensing_from_a_file_is_the_energy_of_its_measurements(make_cfg, tmp_path):
    gen = torch.Generator().manual_seed(0)
    sensors = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    truth = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    values = torch.einsum("kij,ij->k", sensors, truth)
    torch.save({"sensors": sensors, "values": values, "truth": truth}, tmp_path / "sensing.pt")
    summary = run(make_cfg("task=sensing", f"task.file={tmp_path / 'sensing.pt'}", "task.loss=half_sum",
                           "replicas=2", "run.steps=3", "run.log_points=4", "init.scale=0.5"))
    assert summary["widths"][0] == 4 and summary["widths"][-1] == 3
    task = build_task(make_cfg("task=sensing", f"task.file={tmp_path / 'sensing.pt'}", "task.loss=half_sum").task, 0)
    W = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    r = torch.einsum("kij,bij->bk", sensors, W) - values       # an independent ½Σ r²
    np.testing.assert_allclose(task.energy(W), 0.5 * (r ** 2).sum(1), rtol=1e-13)
    np.testing.assert_allclose(task.test_error(truth[None]), [0.0], atol=1e-15)


@pytest.mark.parametrize("arrays, message", [
    ({"sensors": torch.zeros(5, 3, 3), "values": torch.zeros(4)}, r"sensors must be \(K, m, n\).*values \(4,\)"),
    ({"sensors": torch.zeros(5, 3, 3), "values": torch.zeros(5), "truth": torch.zeros(3, 2)}, r"truth \(3, 2\)"),
    ({"sensors": torch.zeros(5, 9), "values": torch.zeros(5)}, r"sensors \(5, 9\)"),
    ({"mask": torch.ones(3, 3), "values": torch.zeros(3, 3)}, r"needs arrays named 'sensors'"),
])
def test_a_sensing_file_of_the_wrong_shape_is_refused_in_one_sentence(make_cfg, tmp_path, arrays, message):
    torch.save(arrays, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=message) as error:
        run(make_cfg("task=sensing", f"task.file={tmp_path / 'bad.pt'}"))
    assert str(error.value).startswith("task.file=")
