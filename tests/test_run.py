"""A run end to end through `run(cfg)`: outputs, divergence, the exact flows in the loop."""
import contextlib
import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlntorch.hooks import Stopwatch
from dlntorch.logger import log_steps
from dlntorch.train import chunk_ends, run


def scalar_tags(run_dir):
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), events


def test_a_run_writes_summary_trajectory_checkpoint_and_events(make_cfg, tmp_path):
    B = 6
    # run.tb_tags=all: every observable's every aggregate (the default set is tests/test_tensorboard.py's)
    summary = run(make_cfg(f"replicas={B}", "run.steps=400", "run.log_points=20", "run.tb_tags=all"))
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["final"] == json.loads(json.dumps(summary["final"]))
    for key in ("energy", "effective_rank", "balancedness", "balancedness_drift", "diverged", "hyperbola_distance"):
        assert len(on_disk["final"][key]) == B
    assert np.asarray(on_disk["final"]["singular_values"]).shape == (B, 2)
    for key in ("config", "environment", "wall_time", "steps", "t", "seeds", "aggregates"):
        assert key in on_disk
    assert on_disk["t"] == pytest.approx(0.05 * 400)
    with np.load(out / "trajectory.npz") as traj:
        T = traj["t"].shape[0]
        assert 2 <= T <= 20 and traj["energy"].shape == (T, B) and traj["singular_values"].shape == (T, B, 2)
        np.testing.assert_array_equal(traj["step"], log_steps(400, 20))
        np.testing.assert_allclose(traj["t"], 0.05 * traj["step"])
    assert (out / "checkpoint.pt").is_file()
    tags, events = scalar_tags(out)
    for tag in ("energy/median", "energy/mean", "energy/max", "energy/replica_0", "balancedness/median",
                "balancedness_drift/max", "effective_rank/median", "diverged/count", "time/t"):
        assert tag in tags, tag
    steps = [e.step for e in events.Scalars("energy/median")]
    assert steps == sorted(set(steps))                      # one point per logged step
    assert {"final/energy", "final/effective_rank"} <= set(events.Tags()["histograms"])


def test_the_loops_hooks_see_each_stretch_of_the_run_and_change_nothing(make_cfg, tmp_path):
    """Timing hooks (what scripts/bench.py uses): one "advance" per chunk of steps, one "log" per
    logged row, TensorBoard records only inside a flush, "finish" once and last; and a watched run
    ends bit for bit where an unwatched one does."""
    class Watch(Stopwatch):
        """A Stopwatch that also notes each phase with the phases open around it."""
        def __init__(self):
            super().__init__()
            self.open, self.seen = [], []

        @contextlib.contextmanager
        def phase(self, name):
            self.seen.append((name, tuple(self.open)))
            self.open.append(name)
            try:
                with super().phase(name):
                    yield
            finally:
                self.open.pop()

    args = ["replicas=3", "run.steps=400", "run.log_points=20", "run.stop_energy=0", "run.stop_check_every=50"]
    watch = Watch()
    watched = run(make_cfg(*args, out="watched"), hooks=watch)
    plain = run(make_cfg(*args, out="plain"))
    assert json.dumps(watched["final"]) == json.dumps(plain["final"])
    assert json.dumps(watched["aggregates"]) == json.dumps(plain["aggregates"])

    ends = chunk_ends(log_steps(400, 20), 50, 400)
    with np.load(tmp_path / "watched" / "trajectory.npz") as traj:
        rows = len(traj["step"])
    assert watch.calls["advance"] == len(ends[ends > 0])
    assert watch.calls["log"] == rows
    assert watch.calls["finish"] == 1 and [name for name, outer in watch.seen if not outer][-1] == "finish"
    assert all("flush" in outer for name, outer in watch.seen if name == "scalars")
    assert not any(outer for name, outer in watch.seen if name in ("advance", "finish"))
    assert set(watch.seconds) == {"advance", "log", "flush", "scalars", "finish"}
    assert all(seconds >= 0 for seconds in watch.seconds.values())


def test_log_grid_is_bounded_and_spans_decades():
    grid = log_steps(10 ** 6, 200)
    assert len(grid) <= 200 and grid[0] == 0 and grid[-1] == 10 ** 6
    assert {1, 2, 3} <= set(grid.tolist())                 # early times are resolved
    assert (np.diff(grid) > 0).all()
    np.testing.assert_array_equal(log_steps(5, 200), np.arange(6))


def test_diverging_replicas_are_frozen_and_counted_and_the_rest_go_on(make_cfg, tmp_path):
    summary = run(make_cfg("replicas=64", "init.scale=1.5", "optim.lr=0.2", "run.steps=2000"))
    diverged = np.asarray(summary["final"]["diverged"])
    energy = np.asarray(summary["final"]["energy"], dtype=float)
    assert 0 < diverged.sum() < 64 and summary["diverged_count"] == diverged.sum()
    assert not np.isfinite(energy[diverged]).any()
    assert (energy[~diverged] < 1e-10).all()               # the live ones converged and stopped the run
    assert summary["aggregates"]["energy"]["max"] < 1e-10  # aggregates are over live replicas
    _, events = scalar_tags(tmp_path / "run")
    assert events.Scalars("diverged/count")[-1].value == diverged.sum()


def test_divergence_can_be_an_error(make_cfg):
    from dlntorch.train import DivergenceError
    with pytest.raises(DivergenceError, match="diverged"):
        run(make_cfg("replicas=64", "init.scale=1.5", "optim.lr=0.2", "run.on_divergence=error"))


def test_stop_rules(make_cfg):
    by_time = run(make_cfg("replicas=2", "run.time=3.0", "optim.lr=0.1", out="a"))
    assert by_time["steps"] == 30 and by_time["stopped_by"] == "time"
    by_energy = run(make_cfg("replicas=8", "init.scale=0.5", "run.stop_energy=1e-6", out="b"))
    assert by_energy["stopped_by"] == "stop_energy"
    assert max(by_energy["final"]["energy"]) < 1e-6 and by_energy["steps"] < 20000


def test_where_a_run_stops_does_not_depend_on_its_log_grid(make_cfg):
    """The stop test ends a run only every run.stop_check_every steps: logged steps between them
    (a dense grid, 997 points over 5000 steps) do not move the stop."""
    common = ("replicas=8", "init.scale=0.5", "run.stop_energy=1e-6", "run.steps=5000")
    sparse = run(make_cfg(*common, "run.log_points=7", out="sparse"))
    dense = run(make_cfg(*common, "run.log_points=997", out="dense"))
    assert sparse["stopped_by"] == dense["stopped_by"] == "stop_energy"
    assert sparse["steps"] == dense["steps"] and sparse["steps"] % 100 == 0
    assert sparse["final"]["energy"] == dense["final"]["energy"]


def test_default_run_shows_the_low_rank_bias(make_cfg):
    """The seed problem at depth 3 from small initial conditions: most replicas end at
    effective rank ≈ 1 with E < 1e-8 (problem 1)."""
    summary = run(make_cfg())
    energy = np.asarray(summary["final"]["energy"])
    assert summary["replicas"] == 256 and (energy < 1e-8).mean() > 0.9
    assert summary["near_rank_one"] / 256 > 0.9
    assert summary["aggregates"]["hyperbola_distance"]["median"] < 1e-3


def test_upstairs_flow_in_the_loop_matches_the_downstairs_flow(make_cfg):
    summary = run(make_cfg("optim=flow", "init=balanced", "init.scale=0.5", "optim.compare_downstairs=true",
                           "replicas=4", "run.time=2.0"))
    # both integrated to rtol 1e-10 over t = 2 (the submersion: balanced products follow g^N)
    assert summary["aggregates"]["downstairs_distance"]["max"] < 1e-8
    assert summary["gradient_evaluations"] > 0 and summary["t"] == pytest.approx(2.0)
    assert summary["aggregates"]["balancedness_drift"]["max"] < 1e-9


@pytest.mark.parametrize("overrides", [["optim.depth=inf"], ["optim.depth=inf", "optim.time_scale=per_depth"],
                                       ["optim.depth=5"], ["optim.method=rk4"]])
def test_downstairs_flow_runs_and_logs_like_gd(make_cfg, tmp_path, overrides):
    summary = run(make_cfg("optim=downstairs", "init.scale=0.5", "replicas=4", "run.time=5.0",
                           "run.log_points=20", *overrides))
    assert summary["steps"] == 100 and math.isfinite(summary["aggregates"]["energy"]["max"])
    tags, _ = scalar_tags(tmp_path / "run")
    assert {"energy/median", "effective_rank/median"} <= tags


def test_flow_needs_a_balanced_start_to_compare(make_cfg):
    from dlntorch.config import ConfigError
    with pytest.raises(ConfigError, match=r"^optim.compare_downstairs=True is not allowed: it needs a balanced"):
        run(make_cfg("optim=flow", "optim.compare_downstairs=true"))
    with pytest.raises(ConfigError, match=r"^optim.time_scale='raw' is not allowed: optim.depth=inf needs per_depth"):
        run(make_cfg("optim=downstairs", "optim.depth=inf", "optim.time_scale=raw"))
