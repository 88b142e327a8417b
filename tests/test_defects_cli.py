"""Issue 9's defects as a user meets them on the command line (subprocesses: slow): Ctrl-C and
resume, exit codes, unknown keys, cli.log, and what a multirun prints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dlntorch.train import run

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAME = ("status", "stopped_by", "steps", "t", "gradient_evaluations", "seeds", "diverged_count", "converged",
        "near_rank_one", "final", "aggregates", "events")


def dlntorch(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dlntorch", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


# long enough to be interrupted after a few seconds, short enough to finish in the test
LONG = ["replicas=4", "run.steps=300000", "run.log_points=50", "run.stop_energy=0"]


def test_ctrl_c_checkpoints_says_how_to_resume_and_resume_finishes_the_run(tmp_path, make_cfg):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dlntorch", *LONG, f"hydra.run.dir={out}"]
    job = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "tb").is_dir():          # the loop is about to start
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(3)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 130, stderr
    assert "Traceback" not in stderr
    message = [line for line in stderr.splitlines() if line.startswith("dlntorch: ")]
    assert len(message) == 1
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 300000, "the run finished before it could be interrupted: make it longer"
    assert message[0].startswith(f"dlntorch: interrupted by SIGINT at step {step} (t = ")
    resume = " ".join([*LONG, f"hydra.run.dir={out}", "resume=true"])
    assert message[0].endswith(f"checkpoint and trajectory in {out}; resume with: python -m dlntorch {resume}")
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(command + ["resume=true"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume=true: continuing from the checkpoint in {out} at step {step} (t = " in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    reference = run(make_cfg(*LONG, out="reference"))
    for key in SAME:
        assert json.dumps(summary[key], sort_keys=True) == json.dumps(reference[key], sort_keys=True), key


def test_exit_codes_unknown_keys_and_the_log_file(tmp_path):
    typo = dlntorch("+model.dept=4", f"hydra.run.dir={tmp_path / 'typo'}", cwd=tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.strip() == ("dlntorch: error: model.dept is not a key of the config (did you mean "
                                   "model.depth?); the keys of model are depth, widths.")

    diverged = dlntorch("replicas=4", "init.scale=0.5", "optim.lr=5", f"hydra.run.dir={tmp_path / 'diverged'}",
                        cwd=tmp_path)
    assert diverged.returncode == 3, diverged.stderr
    assert "dlntorch: 4 of 4 replicas diverged at optim.lr=5; lr ≲ 2/λ_max = " in diverged.stdout + diverged.stderr
    assert json.loads((tmp_path / "diverged" / "summary.json").read_text())["status"] == "diverged"

    ok = dlntorch("replicas=2", "run.steps=100", f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    logged = (tmp_path / "ok" / "cli.log").read_text()
    assert ok.stdout.splitlines()[0].startswith("dlntorch: seed2x2 2x2, widths [2, 2, 2, 2], depth 3, 2 replicas")
    assert logged.splitlines() == ok.stdout.splitlines()     # the printed lines, as printed


def test_a_multirun_counts_its_jobs_and_ends_with_the_collect_command(tmp_path):
    sweep = tmp_path / "sweep"
    done = dlntorch("-m", "model.depth=1,2", "replicas=2", "run.steps=50", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    jobs = [line for line in lines if line.startswith("job ")]
    assert [line.split(":")[0] for line in jobs] == ["job 1 of 2 done", "job 2 of 2 done"]
    assert "model.depth=1 replicas=2 run.steps=50 (completed, median E " in jobs[0]
    assert lines[-2:] == [f"sweep done: {sweep}", f"the table: python -m dlntorch.collect {sweep}"]
