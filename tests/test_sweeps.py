"""Sweeps: launchers (joblib, submitit_local), one table per sweep (dlntorch.collect), failures that
stay with their job, and the presets (hparams_search, hydra/launcher, local/example)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from dlntorch.cli import available_cores, record_failure
from dlntorch.collect import collect
from dlntorch.collect import main as collect_main
from dlntorch.config import ConfigError
from dlntorch.train import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["replicas=4", "run.steps=200", "run.log_points=20", "run.progress=false"]
GRID = ["model.depth=2,3", "init.scale=1e-2,1e-1"]


def multirun(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "dlntorch", "-m", f"hydra.sweep.dir={sweep}", *TINY, *args],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return done, sweep


def assert_grid_table(sweep: Path) -> None:
    df = collect(sweep)
    assert len(df) == 4 and (df["status"] == "completed").all(), df[["run", "status", "why"]]
    assert {"model.depth", "init.scale"} <= set(df.attrs["swept"])
    assert sorted(zip(df["model.depth"], df["init.scale"])) == [(2, 0.01), (2, 0.1), (3, 0.01), (3, 0.1)]
    # the table's values are the runs' own
    for _, row in df.iterrows():
        summary = json.loads((sweep / row["run"] / "summary.json").read_text())
        assert summary["depth"] == row["depth"] == row["model.depth"]
        assert summary["config"]["init"]["scale"] == row["init.scale"]
        assert summary["aggregates"]["energy"]["median"] == row["energy.median"]
    assert (sweep / "sweep.csv").is_file()


# each launcher's jobs take their share of the cores: joblib's 2 parallel jobs half each,
# submitit_local's jobs (all started at once) one thread each
LAUNCHERS = {"joblib": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], lambda: max(available_cores() // 2, 1)),
             "submitit_local": (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"], lambda: 1)}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_parallel_multirun_gives_every_summary_and_one_table(tmp_path, launcher):
    args, threads = LAUNCHERS[launcher]
    # four 200-step jobs take seconds; the bound is not a speed target but a hang check: the
    # process once waited at its exit for joblib's idle workers to time out (loky: 300 s)
    done, sweep = multirun(tmp_path, *args, *GRID, timeout=150)
    assert done.returncode == 0, done.stderr
    assert len(list(sweep.glob("*/summary.json"))) == 4
    assert_grid_table(sweep)
    for path in sweep.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        assert summary["config"]["threads"] == threads()
        assert summary["environment"]["threads"] == summary["config"]["threads"]


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_others_complete(tmp_path):
    """One job gets an invalid value, one diverges with on_divergence=error, and one does both."""
    done, sweep = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                           "run.on_divergence=error", "optim.lr=0.05,-1", "init.scale=1e-2,10")
    assert done.returncode != 0                  # Hydra reports the sweep failed, after every job ran
    df = collect(sweep).set_index("run")
    job = {run.split("_", 1)[0]: run for run in df.index}     # job dirs are <number>_<overrides>
    assert df.loc[job["0"], "status"] == "completed"
    assert df.loc[job["1"], "status"] == "failed" and df.loc[job["1"], "why"].startswith("DivergenceError: ")
    for number in ("2", "3"):
        assert df.loc[job[number], "status"] == "failed"
        assert df.loc[job[number], "why"] == "ConfigError: optim.lr=-1 is not allowed: it must be a finite number > 0."
    # the completed job's outputs are whole
    good = json.loads((sweep / job["0"] / "summary.json").read_text())
    assert good["status"] == "completed" and good["steps"] == 200
    assert (sweep / job["0"] / "trajectory.npz").is_file() and list((sweep / job["0"] / "tb").glob("events.*"))
    failed = json.loads((sweep / job["1"] / "summary.json").read_text())
    assert failed["status"] == "failed" and "DivergenceError" in failed["error"]["traceback"]
    assert failed["config"]["init"]["scale"] == 10 and failed["seeds"]["seed"] == 0
    # the command line lists them too
    listed = subprocess.run([sys.executable, "-m", "dlntorch.collect", str(sweep), "--strict"], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 1
    assert "1 completed" in listed.stdout and "3 failed" in listed.stdout
    assert f"{job['2']}: failed: ConfigError: optim.lr=-1 is not allowed" in listed.stdout


@pytest.mark.slow
def test_a_single_run_that_fails_says_one_sentence_and_records_it(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "dlntorch", f"hydra.run.dir={out}", *TINY, "init.scale=10",
                           "run.on_divergence=error"], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("dlntorch: error: DivergenceError: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------ in-process

def test_collect_reads_runs_started_from_python(tmp_path, make_cfg, capsys):
    """No .hydra/ here: the swept columns are the config keys that differ between the runs."""
    for name, args in {"a": ["seed=1", "init.scale=0.01"], "b": ["seed=2", "init.scale=0.01"],
                       "c": ["seed=1", "init.scale=0.1"]}.items():
        run(make_cfg("replicas=3", "run.steps=50", "run.log_points=5", *args, out=f"sweep/{name}"))
    # d failed on a bad value; e was killed after a checkpoint; f before any
    bad = make_cfg("replicas=3", "optim.lr=-1", out="sweep/d")
    with pytest.raises(ConfigError) as error:
        run(bad)
    record_failure(bad, error.value)
    unfinished = tmp_path / "sweep" / "e"
    run(make_cfg("replicas=3", "run.steps=50", "run.log_points=5", "seed=3", out="sweep/e"))
    (unfinished / "summary.json").unlink()
    (tmp_path / "sweep" / "f" / ".hydra").mkdir(parents=True)

    df = collect(tmp_path / "sweep")
    assert df["run"].tolist() == ["a", "b", "c", "d", "e", "f"]
    assert set(df.attrs["swept"]) >= {"seed", "init.scale", "optim.lr"}
    assert df["status"].tolist() == ["completed"] * 3 + ["failed", "unfinished", "unfinished"]
    assert df.loc[0, "seed"] == 1 and df.loc[2, "init.scale"] == 0.1
    assert df.loc[3, "why"].startswith("ConfigError: optim.lr=-1")
    assert "last checkpoint at step 50 of 50" in df.loc[4, "why"] and "resume=true" in df.loc[4, "why"]
    assert "no checkpoint.pt" in df.loc[5, "why"]
    assert df.loc[0, "energy.median"] == json.loads((tmp_path / "sweep/a/summary.json").read_text())[
        "aggregates"]["energy"]["median"]
    assert (tmp_path / "sweep" / "sweep.csv").read_text().startswith("run,")

    replicas = collect(tmp_path / "sweep", per_replica=True)
    assert len(replicas) == 3 * 3 + 3                       # 3 per completed run, 1 per other
    assert {"replica", "energy", "effective_rank", "singular_value_1", "singular_value_2"} <= set(replicas)
    assert (tmp_path / "sweep" / "sweep_replicas.csv").is_file()

    assert collect_main([str(tmp_path / "sweep"), "--no-write"]) == 0
    printed = capsys.readouterr().out
    assert "6 runs: 3 completed, 1 failed, 2 unfinished" in printed or \
        "6 runs: 3 completed, 2 unfinished, 1 failed" in printed
    assert "d: failed: ConfigError" in printed and "e: unfinished: " in printed


def test_a_completed_summary_is_never_overwritten_by_a_failure(make_cfg):
    cfg = make_cfg("replicas=2", "run.steps=20", "run.log_points=5")
    summary = run(cfg)
    assert record_failure(cfg, RuntimeError("late")) is None
    assert json.loads((Path(summary["out_dir"]) / "summary.json").read_text())["status"] == "completed"


def test_threads_is_applied_and_checked(make_cfg):
    before = __import__("torch").get_num_threads()
    summary = run(make_cfg("replicas=2", "run.steps=20", "run.log_points=5", "threads=1"))
    assert summary["environment"]["threads"] == 1
    with pytest.raises(ConfigError, match="threads=0 is not allowed"):
        run(make_cfg("threads=0", out="zero"))
    __import__("torch").set_num_threads(before)


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module("dlntorch.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_sweep_presets_compose():
    cfg = compose_with_hydra("hparams_search=depth_scale")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["model.depth"] == "1,2,3,4,6"
    cfg = compose_with_hydra("hparams_search=dynamics")
    assert "langevin" in cfg.hydra.sweeper.params["optim"]


def test_the_launcher_presets_and_the_slurm_example_compose():
    cores = compose_with_hydra("hydra/launcher=cores")
    assert cores.hydra.launcher._target_.endswith("JoblibLauncher")
    slurm = compose_with_hydra("hydra/launcher=slurm")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.cpus_per_task == 2
    example = compose_with_hydra("local=example")
    launcher = example.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert example.run.checkpoint_minutes == 10
