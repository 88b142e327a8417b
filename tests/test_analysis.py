"""dlntorch.analysis: runs as DataFrames and figures, read back against trajectory.npz itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dlntorch.analysis import aggregate_trajectory, load_run, main, plot_run, sweep_trajectories, trajectory_frame
from dlntorch.collect import collect
from dlntorch.train import run

TINY = ("replicas=4", "run.steps=300")
# a large start and step: most of the 64 replicas blow up within a few steps, some converge
DIVERGING = ("replicas=64", "init.scale=1.5", "optim.lr=0.2", "run.steps=300")


def npz(run_dir):
    with np.load(run_dir / "trajectory.npz") as data:
        return {k: data[k] for k in data.files}


def quantiles(values, diverged):
    """q10, median, q90 per row over the replicas that never diverged: numpy's own nanquantile."""
    kept = np.where(diverged.any(0), np.nan, values)
    return np.nanquantile(kept, [0.1, 0.5, 0.9], axis=1)


def test_load_run_and_trajectory_frame_give_the_npz_values_exactly(make_cfg, tmp_path):
    summary = run(make_cfg(*TINY, out="a"))
    r = load_run(tmp_path / "a")
    raw = npz(tmp_path / "a")
    T, B, k = len(raw["t"]), 4, 2
    assert r.summary["steps"] == summary["steps"] and r.config == summary["config"]
    assert r.t.shape == r.step.shape == (T,) and r.replicas == B and r.t[-1] == summary["t"]
    assert r.trajectory["energy"].shape == (T, B) and r.trajectory["singular_values"].shape == (T, B, k)
    assert "energy" in r.observables and "diverged" not in r.observables

    df = trajectory_frame(r)
    assert len(df) == T * B
    assert list(df.columns[:4]) == ["t", "step", "replica", "diverged"]
    assert np.array_equal(df["t"].to_numpy().reshape(T, B), np.repeat(raw["t"][:, None], B, 1))
    assert np.array_equal(df["step"].to_numpy().reshape(T, B)[:, 0], raw["step"])
    assert np.array_equal(df["replica"].to_numpy().reshape(T, B)[0], np.arange(B))
    for name in r.observables:
        assert np.array_equal(df[name].to_numpy().reshape(T, B), raw[name], equal_nan=True), name
    for i in range(k):
        assert np.array_equal(df[f"singular_value_{i + 1}"].to_numpy().reshape(T, B), raw["singular_values"][..., i])

    some = trajectory_frame(r, ["energy", "singular_value_2"], replicas=[1, 3])
    assert list(some.columns) == ["t", "step", "replica", "diverged", "energy", "singular_value_2"]
    assert np.array_equal(some["energy"].to_numpy().reshape(T, 2), raw["energy"][:, [1, 3]])
    assert np.array_equal(some["singular_value_2"].to_numpy().reshape(T, 2), raw["singular_values"][:, [1, 3], 1])
    with pytest.raises(KeyError, match="no observable 'energi'"):
        trajectory_frame(r, "energi")
    with pytest.raises(IndexError, match="replica 4 is not in"):
        trajectory_frame(r, replicas=4)


def test_sweep_trajectories_are_numpys_quantiles_per_run(make_cfg, tmp_path):
    for depth in (2, 3):
        run(make_cfg("replicas=6", "run.steps=300", f"model.depth={depth}", out=f"sweep/d{depth}"))
    failed = tmp_path / "sweep" / "d9"       # a failed job keeps its row in collect, not here
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed",
                                                     "error": {"type": "ValueError", "message": "boom"}}))
    df = sweep_trajectories(tmp_path / "sweep", "effective_rank")
    assert "model.depth" in df.attrs["swept"] and df.attrs["observable"] == "effective_rank"
    assert set(df["run"]) == {"d2", "d3"} and not (tmp_path / "sweep" / "sweep.csv").exists()
    finals = collect(tmp_path / "sweep", write=False).set_index("run")
    for depth in (2, 3):
        rows = df[df["model.depth"] == depth]
        assert set(rows["run"]) == {f"d{depth}"}
        raw = npz(tmp_path / "sweep" / f"d{depth}")
        q10, median, q90 = quantiles(raw["effective_rank"], raw["diverged"] > 0)
        assert np.array_equal(rows["t"].to_numpy(), raw["t"]) and (rows["live"] == 6).all()
        # the same linear interpolation, written two ways: equal to rounding
        for ours, theirs in ((rows["median"], median), (rows["q10"], q10), (rows["q90"], q90)):
            np.testing.assert_allclose(ours.to_numpy(), theirs, rtol=1e-13, atol=0)
        # the last logged time is the end of the run: the sweep table's final median, exactly
        assert rows["median"].iloc[-1] == finals.loc[f"d{depth}", "effective_rank.median"]

    with pytest.raises(ValueError, match="d9 is a failed run with no trajectory to load .ValueError: boom."):
        load_run(failed)


def test_diverged_replicas_are_left_out_of_the_bands(make_cfg, tmp_path):
    summary = run(make_cfg(*DIVERGING, out="hot"))
    r = load_run(tmp_path / "hot")
    raw = npz(tmp_path / "hot")
    dead = (raw["diverged"] > 0).any(0)
    assert 0 < dead.sum() < 64 and np.array_equal(r.live, ~dead)
    agg = aggregate_trajectory(r, "energy")
    q10, median, q90 = quantiles(raw["energy"], raw["diverged"] > 0)
    np.testing.assert_allclose(agg[["q10", "median", "q90"]].to_numpy().T, [q10, median, q90], rtol=1e-13, atol=0)
    assert (agg["live"] == 64 - dead.sum()).all()
    # counted while still finite, the replicas blowing up would stretch the band past 1e100
    finite = np.where(np.isfinite(raw["energy"]), raw["energy"], np.nan)
    assert np.nanquantile(finite, 0.9, axis=1).max() > 1e100 and agg["q90"].max() < 1e3
    assert agg["median"].iloc[-1] == summary["aggregates"]["energy"]["median"]

    ax = plot_run(r, ["energy"]).axes[0]
    line = next(line for line in ax.get_lines() if line.get_label() == "median")
    assert np.array_equal(line.get_ydata(), median[raw["t"] > 0])
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] < 1e3    # the band of survivors only


def test_plot_run_and_the_command_write_a_png(make_cfg, tmp_path, capsys):
    run(make_cfg(*TINY, out="a"))
    r = load_run(tmp_path / "a")
    fig = plot_run(r, path=tmp_path / "fig.png")
    assert [ax.get_title() for ax in fig.axes] == ["energy", "effective_rank", "balancedness", "singular_values"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    png = (tmp_path / "fig.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    assert main([str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'a' / 'figure.png'}"
    assert (tmp_path / "a" / "figure.png").stat().st_size > 10_000
    assert main([str(tmp_path / "a"), "--out", str(tmp_path / "e.png"), "--observables", "energy"]) == 0
    assert (tmp_path / "e.png").is_file()


def test_a_missing_or_unfinished_run_is_one_sentence(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_run(missing)
    message = str(error.value)
    assert message == f"{missing} does not exist or is not a folder, so there is no run to load"
    assert main([str(missing)]) == 2
    assert capsys.readouterr().err == f"dlntorch.analysis: error: {message}\n"

    with pytest.raises(FileNotFoundError, match="is not a run dir: it has no summary.json"):
        load_run(tmp_path)
    (tmp_path / "killed" / ".hydra").mkdir(parents=True)    # a Hydra job killed before any output
    with pytest.raises(FileNotFoundError, match=r"killed is not a completed run \(unfinished: no summary.json"):
        load_run(tmp_path / "killed")
