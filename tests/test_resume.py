"""Checkpoint and resume: a killed run, resumed, ends exactly where an uninterrupted one does, with
every TensorBoard step once; a checkpoint write cut short leaves the previous one usable."""
from __future__ import annotations

import collections
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlntorch import logger
from dlntorch.collect import collect
from dlntorch.config import ConfigError
from dlntorch.train import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAME = ("final", "aggregates", "steps", "t", "gradient_evaluations", "seeds", "diverged_count",
        "near_rank_one", "stopped_by")


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag as TensorBoard shows it: (step, value), purged events left out."""
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def raw_steps(tb_dir: Path) -> collections.Counter:
    """(tag, step) counts in the event files as written, before TensorBoard's purge."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    counts: collections.Counter = collections.Counter()
    for path in sorted(glob.glob(str(tb_dir / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                counts[(value.tag, event.step)] += 1
    return counts


def canonical(value) -> str:
    """JSON text: NaN equals NaN, tuples equal lists, floats compare bit for bit (repr round-trips)."""
    return json.dumps(value, sort_keys=True)


def assert_same_run(summary: dict, reference: dict) -> None:
    for key in SAME:
        assert canonical(summary[key]) == canonical(reference[key]), key


def assert_tensorboard_like(tb_dir: Path, reference_tb: Path) -> None:
    shown, expected = scalars(tb_dir), scalars(reference_tb)
    assert set(shown) == set(expected)
    for tag, points in shown.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag} has a step twice"
        assert points == expected[tag], tag


# a run long enough to be killed midway: 40000 cheap steps (~2 s), checkpoints every 10000
KILLED = ["replicas=4", "run.steps=40000", "run.log_points=20", "run.stop_energy=0", "run.progress=false",
          "run.checkpoint_every=10000"]


@pytest.mark.slow
@pytest.mark.parametrize("dynamics", [["optim=gd"], ["optim=langevin", "optim.beta=1e3"]],
                         ids=["gd", "langevin"])
def test_a_run_killed_midway_resumes_to_the_uninterrupted_result(tmp_path, make_cfg, dynamics,
                                                                killed_past_checkpoint):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dlntorch", f"hydra.run.dir={out}", *KILLED, *dynamics]
    # killed once events past the checkpoint have reached the disk, so the resumed run has some to purge
    killed_past_checkpoint(command, out, lambda: sorted((out / "tb").glob("events.out.tfevents.*"))[0], 20_000,
                           ENV, tmp_path)
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 40000

    unfinished = collect(out, write=False)
    assert unfinished["status"].tolist() == ["unfinished"]
    assert f"last checkpoint at step {step} of 40000" in unfinished["why"][0]

    resumed = subprocess.run(command + ["resume=true"], env=ENV, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())

    reference = run(make_cfg(*KILLED, *dynamics, out="reference"))
    assert_same_run(summary, reference)
    with np.load(out / "trajectory.npz") as a, np.load(tmp_path / "reference" / "trajectory.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert_tensorboard_like(out / "tb", tmp_path / "reference" / "tb")
    # the purge was exercised: the killed process had written events past its checkpoint
    assert any(n > 1 for n in raw_steps(out / "tb").values())


def test_a_checkpoint_write_cut_between_temp_file_and_rename_leaves_the_previous_one(tmp_path, make_cfg,
                                                                                     monkeypatch):
    args = ["replicas=4", "run.steps=400", "run.log_points=30", "run.stop_energy=0", "run.checkpoint_every=100",
            "optim=langevin", "optim.beta=1e3"]
    replace, calls = os.replace, []

    def crash_on_second_checkpoint(src, dst):
        if Path(dst).name == "checkpoint.pt":
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("simulated crash between the temporary file and the rename")
        return replace(src, dst)

    monkeypatch.setattr(logger.os, "replace", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        run(make_cfg(*args))
    monkeypatch.undo()

    out = tmp_path / "run"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)    # whole and readable
    assert checkpoint["step"] == 100
    assert not list(out.glob(".checkpoint.pt.*")), "the temporary file was left behind"
    assert not (out / "summary.json").exists()
    # trajectory.npz was already rewritten for step 200: the checkpoint's row count still rules
    with np.load(out / "trajectory.npz") as saved:
        assert len(saved["step"]) > checkpoint["trajectory_rows"]

    summary = run(make_cfg(*args, "resume=true"))
    reference = run(make_cfg(*args, out="reference"))
    assert_same_run(summary, reference)
    assert_tensorboard_like(out / "tb", tmp_path / "reference" / "tb")


def test_resuming_a_completed_run_returns_its_summary_and_writes_nothing(tmp_path, make_cfg):
    args = ["replicas=4", "run.steps=100", "run.log_points=10"]
    first = run(make_cfg(*args))
    events = sorted((tmp_path / "run" / "tb").iterdir())
    again = run(make_cfg(*args, "resume=true"))
    assert canonical(again) == canonical(first)
    assert sorted((tmp_path / "run" / "tb").iterdir()) == events


def test_resume_refuses_a_checkpoint_written_under_other_values(tmp_path, make_cfg):
    run(make_cfg("replicas=4", "run.steps=100", "run.log_points=10"))
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.05 but this run has optim\.lr=0\.1"):
        run(make_cfg("replicas=4", "run.steps=100", "run.log_points=10", "optim.lr=0.1", "resume=true"))


def test_a_fresh_run_into_a_used_run_dir_sets_the_old_events_aside(tmp_path, make_cfg):
    args = ["replicas=4", "run.steps=100", "run.log_points=10"]
    run(make_cfg(*args))
    tb = tmp_path / "run" / "tb"
    run(make_cfg(*args))                # resume=false: starts again from step 0
    # moved beside tb/ and renamed: TensorBoard reads only files named *tfevents* (one file: hparams share it)
    assert len(list((tmp_path / "run" / "superseded").glob("*/events.out.superseded.*"))) == 1
    for tag, points in scalars(tb).items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), tag


def test_a_run_killed_between_its_final_checkpoint_and_its_summary_resumes_to_the_reports(
        tmp_path, make_cfg, monkeypatch):
    """The final checkpoint is written before the reports: resuming writes them once, with the
    stop reason of the run, and no event twice."""
    base = ["replicas=4", "init.scale=0.5", "run.stop_energy=1e-6"]
    reference = run(make_cfg(*base, out="reference"))
    assert reference["stopped_by"] == "stop_energy"

    import dlntorch.rundir as rundir
    real_write_json = rundir.write_json

    def killed(path, data, before_rename=None):
        if before_rename is not None:
            before_rename()           # the final checkpoint is on disk …
        raise KeyboardInterrupt       # … and the process dies before summary.json is named
    monkeypatch.setattr(rundir, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*base, out="killed"))
    monkeypatch.setattr(rundir, "write_json", real_write_json)
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = run(make_cfg(*base, "resume=true", out="killed"))
    assert_same_run(resumed, reference)
    assert_tensorboard_like(tmp_path / "killed" / "tb", tmp_path / "reference" / "tb")
