"""Rank plateaus and jumps, first passages, on constructed series and on a real run."""
import numpy as np

from dlntorch.events import first_passage, plateaus, rank_at_scale, rank_jumps
from dlntorch.train import run


def staircase():
    """Incremental learning on a log grid: singular values 10, 5, 2 switched on by quick sigmoids
    in log t at t = 1, 10, 100 from a 1e-4 floor; a second replica stays at rank 2."""
    t = np.geomspace(1e-2, 1e4, 181)
    on = lambda t0: 1 / (1 + np.exp(-30 * (np.log10(t) - np.log10(t0))))  # noqa: E731
    first = np.stack([1e-4 + 10 * on(1.0), 1e-4 + 5 * on(10.0), 1e-4 + 2 * on(100.0)], axis=-1)
    second = np.broadcast_to([3.0, 1.0, 0.0], first.shape)
    s = np.stack([first, second], axis=1)            # (T, B, k), each row sorted descending
    return t, rank_at_scale(s)


def test_rank_at_scale():
    s = np.array([[10.0, 0.5, 0.01], [1.0, 0.0, 0.0], [np.nan, 1.0, 0.0]])
    np.testing.assert_array_equal(rank_at_scale(s, 1e-2), [2, 1, -1])


def test_plateaus_and_jumps_of_a_staircase():
    t, rank = staircase()
    runs = plateaus(t, rank)
    # the tiny start is "full" at this scale, then the modes switch on one by one
    assert [p.rank for p in runs[0]] == [3, 1, 2, 3] and [p.rank for p in runs[1]] == [2]
    jumps = rank_jumps(t, rank)
    assert [(j.rank_from, j.rank_to) for j in jumps[0]] == [(3, 1), (1, 2), (2, 3)] and jumps[1] == []
    # each switch-on jump ends where its mode crosses 1e-2·s_1, which for these sigmoids (slope
    # 30 per decade) is within 0.15 decades before its midpoint; jumps are short in log t
    for jump, centre in zip(jumps[0][1:], (10.0, 100.0)):
        assert -0.15 < np.log10(jump.t_to / centre) <= 0 and np.log10(jump.t_to / jump.t_from) < 0.1


def test_short_excursions_are_not_plateaus():
    t = np.geomspace(1, 1e4, 200)
    rank = np.where((t > 10) & (t < 11), 1, -1)      # known for 0.04 decades only
    assert plateaus(t, rank[:, None]) == [[]]


def plateaus_one_by_one(t, rank, min_decades=0.25):
    """The definition, replica by replica and time by time: maximal runs of one known rank
    (≥ 0) lasting at least `min_decades` of log10 t, t > 0 only."""
    keep = t > 0
    t, rank = t[keep], rank[keep]
    found = []
    for b in range(rank.shape[1]):
        runs, start = [], 0
        for i in range(1, len(t) + 1):
            if i == len(t) or rank[i, b] != rank[start, b]:
                if rank[start, b] >= 0 and np.log10(t[i - 1]) - np.log10(t[start]) >= min_decades:
                    runs.append((int(rank[start, b]), float(t[start]), float(t[i - 1])))
                start = i
        found.append(runs)
    return found


def test_plateaus_of_many_replicas_at_once_follow_the_definition():
    rng = np.random.default_rng(0)
    t = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 120)])
    rank = np.cumsum(rng.random((121, 300)) < 0.04, axis=0) % 3 - (rng.random((121, 300)) < 0.02)
    rank[:, :3], rank[:, 3:6] = -1, 2            # never known; one plateau from first to last
    for decades in (0.25, 0.0):
        got = [[(p.rank, p.t_start, p.t_end) for p in runs] for runs in plateaus(t, rank, decades)]
        assert got == plateaus_one_by_one(t, rank, decades)
    assert plateaus(np.array([0.0]), np.zeros((1, 2), dtype=np.int64)) == [[], []]


def test_first_passage():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    x = np.array([[1.0, 1.0], [0.5, 1.0], [1e-9, 1.0], [1e-12, 1.0]])
    np.testing.assert_array_equal(first_passage(t, x, 1e-8), [2.0, np.nan])


def test_summary_records_convergence_times_and_rank_jumps(make_cfg):
    summary = run(make_cfg("replicas=8"))
    times = np.asarray(summary["events"]["convergence_time"], dtype=float)
    assert np.isfinite(times).all() and (times <= summary["t"]).all()
    # a 2x2 series only moves between ranks 1 and 2, each jump forward in time; most replicas
    # (the low-rank bias) end their last jump at rank one
    jumps = summary["events"]["rank_jumps"]
    assert all({a, b} == {1, 2} and t0 < t1 for js in jumps for t0, t1, a, b in js)
    assert sum(js[-1][3] == 1 for js in jumps if js) >= 6


# ------------------------------------------------------------------ the detector, hardened

from dlntorch.events import learning_times  # noqa: E402


def switch_on_series(t, jump_times, targets, floor=1e-6, steepness=30.0, noise=0.0, seed=0):
    """Singular values (T, 1, k): mode i rises from `floor` to targets[i] by a sigmoid in log10 t
    centred at jump_times[i]; `noise` multiplies each value by exp(noise·ξ) (ξ standard normal)."""
    rise = [1 / (1 + np.exp(-steepness * (np.log10(t) - np.log10(t0)))) for t0 in jump_times]
    s = np.stack([floor + target * r for target, r in zip(targets, rise)], axis=-1)
    if noise:
        s = s * np.exp(noise * np.random.default_rng(seed).standard_normal(s.shape))
    return -np.sort(-s, axis=-1)[:, None, :]


def test_exact_recovery_of_a_clean_staircase():
    """Rank steps placed between grid points are recovered exactly: each jump's two ends are
    the logged times just before and just after the step."""
    t = np.geomspace(1e-2, 1e4, 121)                  # 20 points a decade
    steps = [0.31, 4.7, 77.0]                         # off the grid
    rank = np.searchsorted(np.asarray(steps), t, side="right")[:, None]   # 0, 1, 2, 3
    jumps = rank_jumps(t, rank)[0]
    assert [(j.rank_from, j.rank_to) for j in jumps] == [(0, 1), (1, 2), (2, 3)]
    for jump, step in zip(jumps, steps):
        before, after = t[t < step][-1], t[t > step][0]
        assert (jump.t_from, jump.t_to) == (before, after)
        assert jump.t_from < jump.time < jump.t_to


def test_noisy_staircase_within_one_logged_point():
    """10 % multiplicative noise on the singular values flickers the rank near each passage;
    short excursions are not plateaus, and each jump's time stays within one logged point
    (1/20 decade) of the noiseless passage of s_i through tol·s_1."""
    t = np.geomspace(1e-2, 1e4, 121)
    spacing = np.log10(t[1] / t[0])
    targets, centres, tol = (10.0, 5.0, 2.0), (0.3, 5.0, 80.0), 1e-2
    clean = rank_jumps(t, rank_at_scale(switch_on_series(t, centres, targets), tol))[0]
    for seed in range(20):
        noisy = rank_jumps(t, rank_at_scale(switch_on_series(t, centres, targets, noise=0.1, seed=seed), tol))[0]
        assert [(j.rank_from, j.rank_to) for j in noisy] == [(j.rank_from, j.rank_to) for j in clean]
        for a, b in zip(noisy, clean):
            assert abs(np.log10(a.time / b.time)) <= spacing + 1e-12


def test_learning_times_of_a_staircase_interpolate_between_grid_points():
    """Sigmoid modes reach half their target exactly at their centres; the interpolated passage
    is within 1 % of it on a 20-points-a-decade grid (linear interpolation of a sigmoid over
    1/20 decade at its midpoint, where it is most linear)."""
    t = np.geomspace(1e-2, 1e4, 121)
    centres = (0.3, 5.0, 80.0)
    times = learning_times(t, switch_on_series(t, centres, (10.0, 5.0, 2.0), floor=0.0))[0]
    np.testing.assert_allclose(times, centres, rtol=1e-2)


def half_target_time(target: float, start: float, depth: int) -> float:
    """Time for one mode of the balanced aligned flow σ' = N σ^{2−2/N} (target − σ) to go from
    `start` to target/2: ∫ dσ / (N σ^{2−2/N} (target − σ)); logistic at N = 2, mpmath beyond."""
    if depth == 2:
        return float(np.log(target / start - 1) / (2 * target))
    import mpmath
    rate = lambda x: depth * x ** (2 - mpmath.mpf(2) / depth) * (target - x)  # noqa: E731
    return float(mpmath.quad(lambda x: 1 / rate(x), [start, target / 4, target / 2]))


def test_real_run_jump_times_match_the_closed_form(make_cfg, tmp_path):
    """E = ½‖W − diag(s)‖² (every entry observed), balanced start W0 = σ0 I aligned with the
    target: each mode learns on its own; the detected learning times match the closed form
    within 5 %, and the rank jump 1 → 2 (tol = s_2/(2 s_1): mode 2 at half its target) brackets
    mode 2's time (the run goes on to t = 200 past convergence: at N ≥ 3 the last jump comes so
    late in log t that a run stopped at E < 1e-10 would end its last plateau short of 0.25 decades)."""
    import torch
    targets, start = (1.0, 0.5), 1e-4
    task_file, init_file = tmp_path / "task.npz", tmp_path / "init.pt"
    np.savez(task_file, mask=np.ones((2, 2)), values=np.diag(targets))
    torch.save({"product": start * torch.eye(2, dtype=torch.float64)}, init_file)
    for depth in (2, 3):
        summary = run(make_cfg("task=completion", f"task.file={task_file}", "task.loss=half_sum",
                               f"model.depth={depth}", "init=file", f"init.file={init_file}",
                               "optim=flow", "run.steps=4000", "run.stop_energy=0", "run.log_points=400", "replicas=2",
                               out=f"depth{depth}"))
        from dlntorch.analysis import load_run
        trajectory = load_run(summary["out_dir"]).trajectory
        expected = [half_target_time(s, start, depth) for s in targets]
        times = learning_times(trajectory["t"], trajectory["singular_values"])
        np.testing.assert_allclose(times, np.broadcast_to(expected, times.shape), rtol=0.05)
        rank = rank_at_scale(trajectory["singular_values"], targets[1] / (2 * targets[0]))
        for jumps in rank_jumps(trajectory["t"], rank):
            last = jumps[-1]
            assert (last.rank_from, last.rank_to) == (1, 2)
            assert last.t_from <= 1.05 * expected[1] and last.t_to >= expected[1] / 1.05
