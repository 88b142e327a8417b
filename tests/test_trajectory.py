"""The streamed trajectory (dlntorch.trajectory): rows appended to row files, trajectory.npz
assembled from them, cut back to a checkpoint's rows on resume; and a run SIGKILLed mid-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlntorch.analysis import load_run
from dlntorch.train import run
from dlntorch.trajectory import MANIFEST, Trajectory, read_rows

B = 5


def row(i: int) -> dict[str, np.ndarray]:
    """A logged row of every kind of column: 0-d step and t, (B,), (B, k), (B, m, n), a bool flag."""
    rng = np.random.default_rng(i)
    return {"step": np.asarray(10 * i), "t": np.asarray(0.1 * i), "energy": rng.random(B),
            "singular_values": rng.random((B, 2)), "product": rng.random((B, 2, 3)),
            "diverged": (rng.random(B) > 0.5).astype(np.float64)}


def expected(rows: int) -> dict[str, np.ndarray]:
    return {k: np.stack([row(i)[k] for i in range(rows)]) for k in row(0)}


def assert_arrays_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_rows_stream_to_files_and_assemble_into_the_npz(tmp_path):
    trajectory = Trajectory(tmp_path / "trajectory")
    for i in range(7):
        trajectory.append(row(i))
    assert len(trajectory) == 7 and not trajectory._memory         # nothing but the last row in memory
    np.testing.assert_array_equal(trajectory.last["energy"], row(6)["energy"])
    # a row file is the array's bytes in C order
    assert (tmp_path / "trajectory" / "product.rows").stat().st_size == 7 * B * 2 * 3 * 8
    trajectory.save(tmp_path / "trajectory.npz")
    with np.load(tmp_path / "trajectory.npz") as data:
        assert_arrays_equal({k: data[k] for k in data.files}, expected(7))
    assert_arrays_equal(trajectory.arrays(), expected(7))
    np.testing.assert_array_equal(trajectory.replicas("singular_values", slice(1, 4)),
                                  expected(7)["singular_values"][:, 1:4])


def test_the_streamed_npz_deflates_by_the_same_rule_as_the_whole_one(tmp_path):
    """Assembled from row files or written whole, each member is deflated exactly where
    logger.deflates says it pays: a column of noise is stored, a constant flag deflated."""
    import zipfile

    from dlntorch.logger import deflates, write_npz
    from tests.test_logger import deflated_sizes, level_one_sizes
    rng = np.random.default_rng(0)
    rows = [{"noise": rng.random(4096), "flag": np.zeros(4096)} for _ in range(20)]
    streamed = Trajectory(tmp_path / "trajectory")
    for r in rows:
        streamed.append(r)
    streamed.save(tmp_path / "streamed.npz")
    whole = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    with open(tmp_path / "whole.npz", "wb") as handle:
        write_npz(handle, whole)
    kinds = {}
    for name in ("streamed", "whole"):
        with zipfile.ZipFile(tmp_path / f"{name}.npz") as archive:
            kinds[name] = {i.filename: i.compress_type for i in archive.infolist()}
    assert kinds["streamed"] == kinds["whole"] == {
        "noise.npy": zipfile.ZIP_STORED, "flag.npy": zipfile.ZIP_DEFLATED}
    assert not deflates(whole["noise"]) and deflates(whole["flag"])
    assert deflated_sizes(tmp_path / "streamed.npz") == level_one_sizes(tmp_path / "streamed.npz")  # level 1
    with np.load(tmp_path / "streamed.npz") as data:
        assert_arrays_equal({k: data[k] for k in data.files}, whole)


def test_restore_cuts_the_files_back_to_the_checkpoints_rows(tmp_path):
    """A crash after the checkpoint at row 4: rows past it and a partial row in the files; the
    resumed trajectory continues from row 4 and ends as an uninterrupted one."""
    folder = tmp_path / "trajectory"
    first = Trajectory(folder)
    for i in range(4):
        first.append(row(i))
    first.save(tmp_path / "trajectory.npz")           # the checkpoint's npz: 4 rows
    first.append(row(4))
    first.append(row(5))
    first.flush()
    with open(folder / "energy.rows", "ab") as handle:
        handle.write(b"\x01\x02\x03")                  # killed mid-write
    resumed = Trajectory(folder)
    resumed.restore(tmp_path / "trajectory.npz", 4)
    assert len(resumed) == 4
    np.testing.assert_array_equal(resumed.last["product"], row(3)["product"])
    for i in range(4, 9):
        resumed.append(row(i))
    resumed.save(tmp_path / "resumed.npz")
    with np.load(tmp_path / "resumed.npz") as data:
        assert_arrays_equal({k: data[k] for k in data.files}, expected(9))


def test_restore_without_row_files_rebuilds_them_from_the_npz(tmp_path):
    """A run dir from before the row files (or with them removed) resumes from trajectory.npz."""
    folder = tmp_path / "trajectory"
    first = Trajectory(folder)
    for i in range(3):
        first.append(row(i))
    first.save(tmp_path / "trajectory.npz")
    first.discard()
    assert not folder.exists()
    resumed = Trajectory(folder)
    resumed.restore(tmp_path / "trajectory.npz", 2)
    assert len(resumed) == 2 and (folder / MANIFEST).is_file()
    resumed.append(row(2))
    assert_arrays_equal(resumed.arrays(), expected(3))
    assert_arrays_equal(read_rows(tmp_path / "trajectory.npz", 2), expected(2))


def test_a_completed_run_keeps_the_npz_and_removes_its_row_files(make_cfg):
    cfg = make_cfg("task=seed2x2", "replicas=3", "run.steps=300", "run.log_points=12")
    summary = run(cfg)
    out = load_run(cfg.run.out_dir)
    assert not (out.path / "trajectory").exists()
    assert out.trajectory["energy"].shape == (len(out.t), 3) and out.t[-1] == summary["t"]


# a run long enough to be killed while it logs: 40000 cheap steps, checkpoints every 10000 and
# 400 logged rows, so rows are appended past the checkpoint before the kill
KILLED = ["replicas=4", "run.steps=40000", "run.log_points=400", "run.stop_energy=0", "run.progress=false",
          "run.checkpoint_every=10000", "run.histogram_points=0"]


@pytest.mark.slow
def test_a_sigkilled_run_leaves_a_trajectory_that_reads_back_to_its_last_checkpoint(
        tmp_path, make_cfg, killed_past_checkpoint):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dlntorch", f"hydra.run.dir={out}", *KILLED]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # killed once a few rows past the checkpoint have reached the energy's row file
    killed_past_checkpoint(command, out, lambda: out / "trajectory" / "energy.rows", 4 * 8 * 5, env, tmp_path)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    rows = saved["trajectory_rows"]
    assert 0 < saved["step"] < 40000 and rows > 0
    assert (out / "trajectory" / "energy.rows").stat().st_size > rows * 4 * 8   # more than the checkpoint's

    reference = run(make_cfg(*KILLED, out="reference"))
    with np.load(tmp_path / "reference" / "trajectory.npz") as data:
        whole = {k: data[k] for k in data.files}
    # the file reads back whole, to (at least) the last checkpoint, and those rows are the run's
    unfinished = load_run(out)
    assert unfinished.summary["status"] == "unfinished" and len(unfinished.step) == rows
    assert unfinished.step[-1] == whole["step"][whole["step"] <= saved["step"]][-1]   # the last logged by then
    for key, values in unfinished.trajectory.items():
        np.testing.assert_array_equal(values, whole[key][:rows], err_msg=key)

    resumed = subprocess.run(command + ["resume=true"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    with np.load(out / "trajectory.npz") as data:
        assert sorted(data.files) == sorted(whole)
        for key in data.files:
            np.testing.assert_array_equal(data[key], whole[key], err_msg=key)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["energy"] == reference["final"]["energy"]
    assert not (out / "trajectory").exists()
