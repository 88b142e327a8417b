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
