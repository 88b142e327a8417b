"""The command line, as a user types it (subprocesses: marked slow, still run in CI)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def dlntorch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dlntorch", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_default_run_prints_its_table_and_writes_every_output(tmp_path):
    done = dlntorch(f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"outputs: {tmp_path / 'run'}" in done.stdout
    assert "near rank one" in done.stdout and "effective_rank" in done.stdout
    out = tmp_path / "run"
    for name in ("summary.json", "trajectory.npz", "checkpoint.pt", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["near_rank_one"] > 0.9 * summary["replicas"]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("energy/median", "balancedness/median", "balancedness_drift/max", "effective_rank/median"):
        assert tag in tags


def test_outputs_go_under_outputs_of_the_working_directory(tmp_path):
    done = dlntorch("replicas=2", "run.steps=20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*/summary.json"))) == 1


def test_a_two_by_two_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    done = dlntorch("-m", "model.depth=1,2", "init.scale=1e-2,1e-1", "replicas=4", "run.steps=100",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    assert sorted((s["depth"], s["config"]["init"]["scale"]) for s in summaries) == \
        [(1, 0.01), (1, 0.1), (2, 0.01), (2, 0.1)]
    for run_dir in sweep.glob("[0-9]*"):
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_bad_input_is_one_sentence_and_a_nonzero_exit(tmp_path):
    done = dlntorch("model.depth=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "dlntorch: error: model.depth=0 is not allowed: it must be an integer ≥ 1."
    assert not (tmp_path / "run" / "summary.json").exists() or \
        json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_a_typo_fails_in_hydra(tmp_path):
    done = dlntorch("model.deph=3", cwd=tmp_path)
    assert done.returncode != 0 and "deph" in done.stderr


def test_console_script(tmp_path):
    exe = shutil.which("dlntorch", path=os.path.dirname(sys.executable))
    assert exe is not None
    done = subprocess.run([exe, "replicas=2", "run.steps=10", f"hydra.run.dir={tmp_path / 'run'}"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
