"""The streamed trajectory (dlntorch.trajectory): rows written into the regions of one row file,
trajectory.npz written from it or made from it in place, continued after a checkpoint's rows on
resume; and a run SIGKILLed mid-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlntorch.analysis import load_run
from dlntorch.npzfile import write_npz
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


def npz_arrays(path) -> dict[str, np.ndarray]:
    """Every member of an npz, after zipfile has checked each one's CRC-32."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None           # the first member whose CRC is wrong, if any
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_rows_stream_to_the_row_file_and_assemble_into_the_npz(tmp_path):
    trajectory = Trajectory(tmp_path / "trajectory", capacity=10)
    for i in range(7):
        trajectory.append(row(i))
    assert len(trajectory) == 7 and not trajectory._memory         # nothing but the last row in memory
    np.testing.assert_array_equal(trajectory.last["energy"], row(6)["energy"])
    # a region is the array's bytes in C order, at the place the manifest names
    data = tmp_path / "trajectory" / json.loads((tmp_path / "trajectory" / MANIFEST).read_text())["data"]
    region = np.fromfile(data, np.float64, count=7 * B * 2 * 3, offset=trajectory._offset("product", 0))
    np.testing.assert_array_equal(region.reshape(7, B, 2, 3), expected(7)["product"])
    trajectory.save(tmp_path / "trajectory.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "trajectory.npz"), expected(7))
    assert_arrays_equal(trajectory.arrays(), expected(7))
    np.testing.assert_array_equal(trajectory.replicas("singular_values", slice(1, 4)),
                                  expected(7)["singular_values"][:, 1:4])


@pytest.mark.parametrize("rows", [10, 7])
def test_sealing_makes_the_row_file_the_npz_in_place(tmp_path, rows):
    """The row file becomes trajectory.npz (the same file: no copy), as compact as an npz written
    whole from the same arrays, whether its regions are full (10 of 10 rows) or not (7: each
    member after the first moves down); then the trajectory reads from it."""
    folder = tmp_path / "trajectory"
    trajectory = Trajectory(folder, capacity=10)
    for i in range(rows):
        trajectory.append(row(i))
    inode = (folder / trajectory.data).stat().st_ino
    trajectory.seal(tmp_path / "trajectory.npz")
    assert (tmp_path / "trajectory.npz").stat().st_ino == inode
    assert_arrays_equal(npz_arrays(tmp_path / "trajectory.npz"), expected(rows))
    with open(tmp_path / "whole.npz", "wb") as handle:
        write_npz(handle, expected(rows))
    assert (tmp_path / "trajectory.npz").stat().st_size == (tmp_path / "whole.npz").stat().st_size
    assert_arrays_equal(trajectory.arrays(), expected(rows))
    trajectory.discard()
    assert not folder.exists() and (tmp_path / "trajectory.npz").is_file()


def test_sealing_moves_members_down_in_overlapping_pieces(tmp_path, monkeypatch):
    """Pieces of 256 bytes, members moved down by less than that (after the product's region, one
    row of 240 bytes unused, then more): a piece's source and destination overlap, and every
    member still reads back exactly."""
    import dlntorch.npzfile
    monkeypatch.setattr(dlntorch.npzfile, "COPY_BYTES", 256)
    trajectory = Trajectory(tmp_path / "trajectory", capacity=8)
    for i in range(7):
        trajectory.append(row(i))
    trajectory.seal(tmp_path / "trajectory.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "trajectory.npz"), expected(7))


def test_more_rows_than_the_capacity_move_to_a_larger_row_file(tmp_path):
    folder = tmp_path / "trajectory"
    trajectory = Trajectory(folder, capacity=2)
    for i in range(7):
        trajectory.append(row(i))
    assert trajectory.capacity == 8 and sorted(p.name for p in folder.iterdir()) == [MANIFEST, "rows.8"]
    assert json.loads((folder / MANIFEST).read_text())["data"] == "rows.8"
    assert_arrays_equal(trajectory.arrays(), expected(7))
    trajectory.seal(tmp_path / "trajectory.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "trajectory.npz"), expected(7))


def test_a_dropped_observable_leaves_the_sealed_npz_compact(tmp_path):
    """A name missing from a row leaves the trajectory; its region is skipped when sealing."""
    trajectory = Trajectory(tmp_path / "trajectory", capacity=6)
    for i in range(6):
        trajectory.append({k: v for k, v in row(i).items() if i < 2 or k != "singular_values"})
    want = {k: v for k, v in expected(6).items() if k != "singular_values"}
    trajectory.seal(tmp_path / "trajectory.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "trajectory.npz"), want)
    with open(tmp_path / "whole.npz", "wb") as handle:
        write_npz(handle, want)
    assert (tmp_path / "trajectory.npz").stat().st_size == (tmp_path / "whole.npz").stat().st_size


def test_the_streamed_npz_deflates_by_the_same_rule_as_the_whole_one(tmp_path):
    """Assembled from row files or written whole, each member is deflated exactly where
    logger.deflates says it pays: a column of noise is stored, a constant flag deflated."""
    import zipfile

    from dlntorch.npzfile import deflates
    from tests.test_logger import deflated_sizes, level_one_sizes
    rng = np.random.default_rng(0)
    # the flag first: sealed, it is deflated over its region and the noise behind it moves down
    rows = [{"flag": np.zeros(4096), "noise": rng.random(4096)} for _ in range(20)]
    streamed = Trajectory(tmp_path / "trajectory")
    for r in rows:
        streamed.append(r)
    streamed.save(tmp_path / "streamed.npz")
    streamed.seal(tmp_path / "sealed.npz")
    whole = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    with open(tmp_path / "whole.npz", "wb") as handle:
        write_npz(handle, whole)
    kinds = {}
    for name in ("streamed", "sealed", "whole"):
        with zipfile.ZipFile(tmp_path / f"{name}.npz") as archive:
            kinds[name] = {i.filename: i.compress_type for i in archive.infolist()}
        assert deflated_sizes(tmp_path / f"{name}.npz") == level_one_sizes(tmp_path / f"{name}.npz")  # level 1
        assert_arrays_equal(npz_arrays(tmp_path / f"{name}.npz"), whole)
    assert kinds["streamed"] == kinds["sealed"] == kinds["whole"] == {
        "flag.npy": zipfile.ZIP_DEFLATED, "noise.npy": zipfile.ZIP_STORED}
    assert not deflates(whole["noise"]) and deflates(whole["flag"])


def test_restore_continues_after_the_checkpoints_rows(tmp_path):
    """A crash after the checkpoint at row 4: rows past it and a partial row in the row file; the
    resumed trajectory continues from row 4 and ends as an uninterrupted one."""
    folder = tmp_path / "trajectory"
    first = Trajectory(folder, capacity=9)
    for i in range(4):
        first.append(row(i))
    first.save(tmp_path / "trajectory.npz")           # the checkpoint's npz: 4 rows
    first.append(row(4))
    first.append(row(5))
    os.pwrite(first._fd, b"\x01\x02\x03", first._offset("energy", 6))     # killed mid-write
    resumed = Trajectory(folder, capacity=9)
    resumed.restore(tmp_path / "trajectory.npz", 4)
    assert len(resumed) == 4 and resumed.data == first.data     # the same row file, continued
    np.testing.assert_array_equal(resumed.last["product"], row(3)["product"])
    for i in range(4, 9):
        resumed.append(row(i))
    resumed.save(tmp_path / "resumed.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "resumed.npz"), expected(9))
    resumed.seal(tmp_path / "sealed.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "sealed.npz"), expected(9))


def test_a_kill_while_sealing_resumes_from_the_checkpoints_npz(tmp_path, monkeypatch):
    """Sealing rewrites the row file; killed in the middle (here: the directory never written),
    the row file is not trusted again: the resumed trajectory is rebuilt from the checkpoint's npz."""
    import dlntorch.npzfile
    folder = tmp_path / "trajectory"
    first = Trajectory(folder, capacity=8)
    for i in range(3):
        first.append(row(i))
    first.save(tmp_path / "trajectory.npz")           # the checkpoint's npz: 3 rows
    for i in range(3, 6):
        first.append(row(i))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(dlntorch.npzfile, "write_directory", killed)
    with pytest.raises(KeyboardInterrupt):
        first.seal(tmp_path / "final.npz")
    monkeypatch.undo()
    assert json.loads((folder / MANIFEST).read_text())["sealing"] and not (tmp_path / "final.npz").exists()
    resumed = Trajectory(folder, capacity=8)
    resumed.restore(tmp_path / "trajectory.npz", 3)
    for i in range(3, 8):
        resumed.append(row(i))
    resumed.seal(tmp_path / "final.npz")
    assert_arrays_equal(npz_arrays(tmp_path / "final.npz"), expected(8))


def test_restore_without_a_row_file_rebuilds_it_from_the_npz(tmp_path):
    """A run dir from before this layout (or with the row file removed) resumes from trajectory.npz."""
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
    # a row-file folder of the earlier layout (a file per observable, a manifest of names only)
    resumed.discard()
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({k: {"dtype": "<f8", "shape": list(v.shape)} for k, v in row(0).items()}))
    older = Trajectory(folder)
    older.restore(tmp_path / "trajectory.npz", 3)
    assert_arrays_equal(older.arrays(), expected(3))


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


def rows_written(folder) -> tuple:
    """The row file a run's manifest names, the rows its last region holds, and a row's bytes there."""
    trajectory = Trajectory(folder)
    assert trajectory._reopen(0)
    last = max(trajectory.regions, key=trajectory.regions.get)
    trajectory.close()
    path, size = folder / trajectory.data, trajectory._row_bytes(last)
    return path, (path.stat().st_size - trajectory._offset(last, 0)) // size, size


@pytest.mark.slow
def test_a_sigkilled_run_leaves_a_trajectory_that_reads_back_to_its_last_checkpoint(
        tmp_path, make_cfg, killed_past_checkpoint):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dlntorch", f"hydra.run.dir={out}", *KILLED]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # killed once 5 rows past the checkpoint have reached the row file's last region (a scalar
    # observable at 4 replicas: every row of this run is small, so they are ordered by size)
    killed_past_checkpoint(command, out, lambda: rows_written(out / "trajectory")[0], 5 * 8, env, tmp_path)
    assert rows_written(out / "trajectory")[2] == 8
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    rows = saved["trajectory_rows"]
    assert 0 < saved["step"] < 40000 and rows > 0
    assert rows_written(out / "trajectory")[1] > rows             # more than the checkpoint's

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
