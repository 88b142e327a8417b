"""Issue 9's defects, each with a test that failed before the fix: presets' replicas, run.time's
step budget, `converged`, all-diverged runs, unknown keys, interruption and resume, what a run
prints, and the smaller ones (the downstairs header's N, the conf link)."""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dlntorch.analysis import load_run
from dlntorch.analysis import main as analysis_main
from dlntorch.callbacks import planned_jobs
from dlntorch.config import ConfigError, as_config, budget
from dlntorch.hooks import Hooks
from dlntorch.network import chain
from dlntorch.report import headline, table
from dlntorch.sharpness import sharpness
from dlntorch.tasks import Seed2x2, build_task
from dlntorch.train import Interrupted, run

REPO = Path(__file__).resolve().parents[1]
# the summary fields a resumed run must share with an uninterrupted one (not: wall_time,
# environment, out_dir, config.resume)
SAME = ("status", "stopped_by", "steps", "t", "gradient_evaluations", "seeds", "diverged_count", "converged",
        "near_rank_one", "final", "aggregates", "events")


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module("dlntorch.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- 1. a group's choice survives the defaults that follow it --------------------------------

@pytest.mark.parametrize("overrides, replicas", [([], 256), (["task=completion"], 8),
                                                 (["experiment=rank_jumps"], 32),
                                                 (["task=completion", "replicas=3"], 3)])
def test_a_task_or_preset_sets_replicas_and_the_command_line_wins(overrides, replicas):
    assert composed(*overrides).replicas == replicas


# -- 2. run.time sets the step budget ----------------------------------------------------------

def test_run_time_alone_sets_the_step_budget_and_both_stop_at_the_first():
    def cfg(*overrides):
        return as_config(composed(*overrides))
    assert budget(cfg()) == (20000, "steps")
    assert budget(cfg("optim.lr=1e-3", "run.time=105")) == (105000, "time")    # was capped at 20000
    assert budget(cfg("optim.lr=1e-3", "run.time=105", "run.steps=5000")) == (5000, "steps")
    assert budget(cfg("optim.lr=1e-3", "run.time=5", "run.steps=50000")) == (5000, "time")


def test_run_time_past_the_old_default_step_budget_runs_to_that_time(make_cfg):
    # t = 25 at lr = 1e-3 takes 25000 steps: the old default run.steps=20000 stopped it at t = 20
    summary = run(make_cfg("replicas=1", "optim.lr=1e-3", "run.time=25", "run.stop_energy=0", "run.log_points=10"))
    assert (summary["steps"], summary["stopped_by"]) == (25000, "time")
    assert summary["t"] == pytest.approx(25, rel=1e-12)


@pytest.mark.parametrize("extra, steps, stopped_by", [([], 400, "time"), (["run.steps=150"], 150, "steps"),
                                                      (["run.steps=1000"], 400, "time")])
def test_stopped_by_names_what_stopped_the_run(make_cfg, extra, steps, stopped_by):
    summary = run(make_cfg("replicas=2", "optim.lr=0.01", "run.time=4", "run.stop_energy=0",
                           "run.log_points=10", *extra))
    assert (summary["steps"], summary["stopped_by"]) == (steps, stopped_by)
    assert summary["t"] == pytest.approx(0.01 * steps, rel=1e-12)


# -- 3. near rank one only once converged -----------------------------------------------------

def test_replicas_still_at_the_origin_are_neither_converged_nor_near_rank_one(make_cfg):
    # depth 4 from scale 1e-3: the start sits at the saddle W = 0 (E = 1) far past these steps,
    # where the effective rank of a tiny product is small too (the old count said ~70 %)
    summary = run(make_cfg("replicas=16", "model.depth=4", "init.scale=1e-3", "run.steps=2000"))
    assert summary["aggregates"]["energy"]["median"] == pytest.approx(1.0, abs=1e-3)
    assert summary["converged"] == 0 and summary["converged_fraction"] == 0.0
    assert summary["near_rank_one"] == 0
    assert headline(summary)["converged_fraction"] == 0.0 and headline(summary)["near_rank_one_fraction"] == 0.0
    printed = table(summary)
    assert "converged (E < 1e-06): 0 / 16 (0 %)" in printed
    assert printed.splitlines()[-1] == ("warning: 16 of 16 replicas did not converge (E ≥ 1e-06 at t = 100): "
                                        "run longer: run.time=1000 / run.steps=20000, or start larger: init.scale=0.01")


def test_a_converged_run_counts_and_has_no_warning(make_cfg):
    summary = run(make_cfg("replicas=8"))
    assert summary["converged"] == 8 and summary["near_rank_one"] == 8
    assert not table(summary).splitlines()[-1].startswith("warning")


# -- 4. every replica diverged ----------------------------------------------------------------

def test_sharpness_is_the_top_eigenvalue_of_the_hessian_in_all_factors():
    generator = torch.Generator().manual_seed(3)
    task = build_task(composed("task=completion", "task.size=3", "task.observations=6").task, 5)
    factors = [torch.randn(4, 3, 3, generator=generator) * 0.7 for _ in range(3)]
    top = sharpness(factors, task, iterations=40)     # 27 parameters: the Krylov space is all of them
    for b in range(4):
        hessian = torch.autograd.functional.hessian(
            lambda *fs: task.energy(chain([f[None] for f in fs])).sum(), tuple(f[b] for f in factors))
        full = torch.cat([torch.cat([hessian[i][j].reshape(9, 9) for j in range(3)], 1) for i in range(3)], 0)
        # float64, a 27×27 symmetric eigenproblem either way: agreement to round-off
        assert top[b].item() == pytest.approx(torch.linalg.eigvalsh(full)[-1].item(), abs=1e-8)


def test_sharpness_at_a_saddle_is_the_largest_eigenvalue_not_the_largest_in_modulus():
    # depth 2 at W_1 = W_2 = 0 on seed2x2: H has eigenvalues ±1 (the saddle's), λ_max = 1
    zero = [torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)]
    assert torch.allclose(sharpness(zero, Seed2x2()), torch.ones(2), atol=1e-12)


def test_a_run_in_which_every_replica_diverged_says_so(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="dlntorch"):
        summary = run(make_cfg("replicas=4", "init.scale=0.5", "optim.lr=5"))
    assert summary["status"] == "diverged" and summary["stopped_by"] == "diverged"
    assert summary["diverged_count"] == 4
    lines = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("dlntorch: 4 of 4 replicas diverged at optim.lr=5; lr ≲ 2/λ_max = ")
    bound = float(lines[0].split("= ")[1].split()[0])
    assert 0 < bound < 5


# -- 5. unknown keys -----------------------------------------------------------------------------

def test_an_unknown_key_is_refused_by_name_before_the_run_dir_exists(make_cfg, tmp_path):
    cfg = make_cfg("+model.dept=4")
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert str(error.value) == ("model.dept is not a key of the config (did you mean model.depth?); "
                                "the keys of model are depth, widths.")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^bogus is not a key of the config; the top-level keys are "):
        run(make_cfg("+bogus=1"))
    with pytest.raises(ConfigError, match=r"^optim.betta is not a key of the config \(did you mean optim.beta\?\)"):
        run(make_cfg("optim=langevin", "+optim.betta=3"))
    as_config(make_cfg("+tags.who=me", "+tags.batch=7"))      # tags stay free-form


# -- 6. interruption and resume -----------------------------------------------------------------

class SignalAt(Hooks):
    """Sends `signum` to this process during the `at`-th advance (as Ctrl-C would)."""

    def __init__(self, at: int, signum: int = signal.SIGINT):
        self.at, self.signum, self.calls = at, signum, 0

    def phase(self, name):
        if name == "advance":
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(self.signum)
        return super().phase(name)


ARGS = ["replicas=4", "run.steps=3000", "run.log_points=20", "run.stop_energy=0"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_and_resume_continues_to_the_uninterrupted_result(make_cfg, tmp_path, signum, caplog):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stop:
        run(make_cfg(*ARGS), hooks=SignalAt(7, signum))
    assert signal.getsignal(signum) is before          # the handlers are the previous ones again
    out = tmp_path / "run"
    assert stop.value.exit_code == 128 + signum
    message = str(stop.value)
    assert "\n" not in message
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 3000
    name = signal.Signals(signum).name
    assert message == (f"dlntorch: interrupted by {name} at step {step} (t = {0.05 * step:.4g}); "
                       f"checkpoint and trajectory in {out}; resume with: the same config with resume=true "
                       f"and run.out_dir={out}")
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()

    partial = load_run(out)                             # plots from the last checkpoint's rows
    assert partial.summary["status"] == "unfinished" and partial.step[-1] <= step
    assert analysis_main([str(out)]) == 0 and (out / "figure.png").is_file()

    with caplog.at_level(logging.INFO, logger="dlntorch"):
        resumed = run(make_cfg(*ARGS, "resume=true"))
    assert f"resume=true: continuing from the checkpoint in {out} at step {step} (t = {0.05 * step:.4g})" \
        in caplog.messages
    reference = run(make_cfg(*ARGS, out="reference"))
    for key in SAME:
        assert json.dumps(resumed[key], sort_keys=True) == json.dumps(reference[key], sort_keys=True), key


def test_resume_without_a_checkpoint_says_it_starts_fresh(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dlntorch"):
        run(make_cfg("replicas=2", "run.steps=10", "resume=true"))
    assert f"resume=true: no checkpoint in {tmp_path / 'run'}: starting fresh" in caplog.messages


def test_superseded_events_are_renamed_out_of_tensorboards_sight(make_cfg, tmp_path):
    args = ["replicas=2", "run.steps=50", "run.log_points=5"]
    out = tmp_path / "run"
    run(make_cfg(*args))
    first = len(list((out / "tb").glob("*tfevents*")))
    run(make_cfg(*args))
    live = list(out.rglob("*tfevents*"))                 # what TensorBoard reads under the run dir
    assert len(live) == first and all(path.parent == out / "tb" for path in live)
    assert len(list((out / "superseded").glob("*/events.out.superseded.*"))) == first


# -- 7. what a run prints ------------------------------------------------------------------------

def test_a_run_prints_its_header_and_outputs_at_the_start(make_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dlntorch"):
        run(make_cfg("replicas=2", "run.steps=10"))
    first, second = caplog.messages[:2]
    assert first == ("dlntorch: seed2x2 2x2, widths [2, 2, 2, 2], depth 3, 2 replicas, gd lr=0.05 weight_decay=0, "
                     "init gaussian scale=0.01, cpu float64")
    assert second == f"outputs: {tmp_path / 'run'} (watch: tensorboard --logdir {tmp_path / 'run'})"


def test_the_downstairs_header_shows_the_depth_it_integrates(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="dlntorch"):
        summary = run(make_cfg("replicas=2", "optim=downstairs", "optim.depth=inf", "init=balanced",
                               "init.scale=0.3", "run.time=1"))
    assert ", depth inf, " in caplog.messages[0]
    assert table(summary).splitlines()[0] == caplog.messages[0]
    assert summary["dynamics_depth"] == "inf" and summary["depth"] == 3


def test_the_planned_jobs_of_a_sweep_are_the_product_of_its_overrides(tmp_path):
    OmegaConf.save({"hydra": {"overrides": {"task": ["model.depth=1,2,3", "init.scale=1e-2,1e-1", "replicas=4"]},
                              "sweeper": {"params": {"seed": "range(4)", "model.depth": "1,2"}}}},
                   tmp_path / "multirun.yaml")
    assert planned_jobs(tmp_path) == 3 * 2 * 4            # the command line's depth list wins
    assert planned_jobs(tmp_path / "missing") is None


# -- 8. smaller ones -------------------------------------------------------------------------------

def test_the_conf_link_at_the_root_resolves_to_the_package_config():
    link = REPO / "conf"
    assert link.is_symlink() and (link / "config.yaml").is_file()
    assert link.resolve() == (REPO / "dlntorch" / "conf").resolve()


def test_every_tasks_loss_default_is_half_sum_or_says_why():
    for path in sorted((REPO / "dlntorch" / "conf" / "task").glob("*.yaml")):
        text = path.read_text()
        loss = OmegaConf.create(text.replace("# @package _global_", "")).get("loss") or \
            OmegaConf.create(text).get("task", {}).get("loss")
        assert loss == "half_sum" or f"{loss}, not" in text, path.name
