"""The per-replica Dormand–Prince integrator: closed forms, every replica as if alone, frozen and
failing replicas that cost nothing and stall nothing."""
import math

import pytest
import torch

from dlntorch.dynamics.flows import upstairs_velocity
from dlntorch.network import chain
from dlntorch.solvers import Controller, dopri5
from dlntorch.tasks import Seed2x2

DT = torch.float64


def scale(reference, rtol, atol):
    """The solver's own error scale per entry: atol + rtol·|y|."""
    return atol + rtol * reference.abs()


def decay(state):
    """dy/dt = −λ y with λ carried in the state (dλ/dt = 0), so that rows stay paired with their
    λ when the solver works on a subset of the replicas."""
    y, lam = state
    return -lam * y, torch.zeros_like(lam)


def test_linear_decay_matches_the_closed_form_per_replica():
    B = 32
    g = torch.Generator().manual_seed(0)
    lam = torch.logspace(-2, 2, B, dtype=DT).view(B, 1)       # time scales 100 … 0.01: very different steps
    y0 = torch.randn(B, 3, generator=g, dtype=DT)
    times = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0], dtype=DT)
    rtol, atol = 1e-10, 1e-12
    sol = dopri5(decay, (y0, lam.expand(B, 1).clone()), times, rtol=rtol, atol=atol)
    exact = torch.exp(-lam * times.view(-1, 1, 1)) * y0
    # a decaying linear flow damps earlier local errors, so the global error stays at the local
    # tolerance's order; 3x its scale leaves room for the controller's safety margin only
    assert ((sol.states[0] - exact).abs() <= 3 * scale(exact, rtol, atol)).all()
    assert torch.equal(sol.states[1], lam.expand(B, 1).expand(len(times), B, 1))
    # each replica took its own steps: the fastest decay needs far more than the slowest
    assert sol.accepted[-1] > 10 * sol.accepted[0]
    # the batch ran as long as its hardest replica and no longer (one evaluation for k1 and one
    # for the step selection, six per step): nothing waited on anything else
    assert sol.evaluations == int(sol.replica_evaluations.max()) == 2 + 6 * int((sol.accepted + sol.rejected).max())


# --------------------------------------------------------------------- the seed task's flow

TASK = Seed2x2()


def seed_velocity(state):
    return upstairs_velocity(list(state), TASK.gradient)


def seed_start(B=64, seed=0):
    """Depth-3 factors at scales 1e-3 … 1.6: the smallest sit by the saddle W = 0 and leave it
    slowly, the largest converge to stiff minimisers; replica 0 is exactly at the saddle."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 0.2, B, dtype=DT).view(B, 1, 1)
    factors = [scales * 0.5 * torch.randn(B, 2, 2, generator=g, dtype=DT) for _ in range(3)]
    for f in factors:
        f[0] = 0.0
    return factors


RTOL, ATOL = 1e-8, 1e-10
TIMES = torch.linspace(0.0, 10.0, 11, dtype=DT)


@pytest.fixture(scope="module")
def seed_solutions():
    factors = seed_start()
    batch = dopri5(seed_velocity, factors, TIMES, rtol=RTOL, atol=ATOL)
    alone = [dopri5(seed_velocity, [f[b:b + 1] for f in factors], TIMES, rtol=RTOL, atol=ATOL)
             for b in range(factors[0].shape[0])]
    reference = dopri5(seed_velocity, factors, TIMES, rtol=1e-12, atol=1e-14)   # 1e-4 of the scale
    return factors, batch, alone, reference


def test_every_replica_follows_its_trajectory_alone(seed_solutions):
    factors, batch, alone, reference = seed_solutions
    for p in range(3):
        together = batch.states[p]
        apart = torch.cat([a.states[p] for a in alone], dim=1)
        ref = reference.states[p]
        # the same steps as alone (only rounding in the batched sums differs): far inside the scale
        assert ((together - apart).abs() <= 0.1 * scale(ref, RTOL, ATOL)).all()
        # and both within the tolerance of the tight reference: the controller holds each local
        # error to the scale; over a replica's ≤ 200 steps of a transient flow the accumulated
        # global error stays within a few tens of it (a wrong tableau or norm would be ≫ 1e3)
        assert ((together - ref).abs() <= 30 * scale(ref, RTOL, ATOL)).all()
    for b, a in enumerate(alone):
        assert (batch.accepted[b], batch.rejected[b]) == (a.accepted[0], a.rejected[0])
    # very different difficulty, yet the batch cost only what its hardest replica costs alone
    steps = batch.accepted + batch.rejected
    assert steps.max() > 5 * steps.min()
    assert batch.evaluations == max(a.evaluations for a in alone)
    # the replica at the saddle has zero velocity: it stays there exactly
    for x in batch.states:
        assert torch.equal(x[:, 0], torch.zeros_like(x[:, 0]))
    # the flow did its job: the tiny replicas are still by the saddle (E ≈ E(0) = 1), most of the
    # largest third reached the zero set (one may pass near another saddle on its way)
    E = TASK.energy(chain(batch.final()))
    assert (E[1:10] > 0.99).all() and int((E[-20:] < 1e-6).sum()) >= 18


def test_frozen_replicas_stay_put_and_cost_nothing(seed_solutions):
    factors, batch, _, _ = seed_solutions
    B = factors[0].shape[0]
    frozen = torch.zeros(B, dtype=torch.bool)
    frozen[[5, 40, 63]] = True           # 63: the hardest replica
    start = [f.clone() for f in factors]
    start[1][40] = math.nan              # a diverged replica's state: never touched, never in a norm
    sol = dopri5(seed_velocity, start, TIMES, rtol=RTOL, atol=ATOL, frozen=frozen)
    for x, x0 in zip(sol.states, start):
        torch.testing.assert_close(x[:, frozen], x0[frozen].expand(len(TIMES), *x0[frozen].shape),
                                   rtol=0, atol=0, equal_nan=True)
        assert torch.isfinite(x[:, ~frozen]).all()
    assert (sol.replica_evaluations[frozen] == 0).all() and (sol.accepted[frozen] == 0).all()
    # the others do exactly what they did without the frozen ones; freezing the hardest one
    # shortens the batch to the next hardest
    live = ~frozen
    for p in range(3):
        assert ((sol.states[p][:, live] - batch.states[p][:, live]).abs()
                <= 0.1 * scale(batch.states[p][:, live], RTOL, ATOL)).all()
    assert sol.evaluations == int(batch.replica_evaluations[live].max()) < batch.evaluations


def test_uncompacted_batch_gives_the_same_flow(seed_solutions):
    factors, batch, _, _ = seed_solutions
    whole = dopri5(seed_velocity, factors, TIMES, rtol=RTOL, atol=ATOL, compact=False)
    for x, y in zip(whole.states, batch.states):
        assert ((x - y).abs() <= 0.1 * scale(y, RTOL, ATOL)).all()
    assert whole.evaluations == batch.evaluations


def test_resume_with_the_last_step_continues_the_flow(seed_solutions):
    factors, batch, _, reference = seed_solutions
    first = dopri5(seed_velocity, factors, TIMES[:6], rtol=RTOL, atol=ATOL)
    second = dopri5(seed_velocity, first.final(), TIMES[5:], rtol=RTOL, atol=ATOL, first_step=first.step)
    for x, ref in zip(second.states, reference.states):
        # a restart only resets the PI controller's memory: the same tolerance as one call
        assert ((x - ref[5:]).abs() <= 30 * scale(ref[5:], RTOL, ATOL)).all()
    # no fresh step selection: the saved steps were good ones, few rejections follow
    assert int(second.rejected.sum()) <= int(batch.rejected.sum()) + factors[0].shape[0]


def test_done_replicas_stop_at_their_first_output_time_and_cost_nothing_after():
    """dy/dt = −λ y with done = |y| < 1e-3: replica b is done first at the output time t_k with
    e^{−λ_b t_k} < 1e-3 (closed form; the thresholds sit far from every output time, so the
    solver's 1e-10 errors cannot move the index), keeps its state there, and the undone replica
    follows the same trajectory as in a run without `done`."""
    lam = torch.tensor([[20.0], [2.0], [0.5], [0.01]], dtype=DT)     # done at t = 0.5, 5, 20, never
    y0 = torch.ones(4, 1, dtype=DT)
    times = torch.tensor([0.0, 0.1, 0.5, 1.0, 5.0, 10.0, 20.0, 400.0], dtype=DT)
    below = lambda state: state[0].abs().flatten(1).amax(1) < 1e-3                 # noqa: E731
    sol = dopri5(decay, (y0, lam), times, done=below)
    alone = dopri5(decay, (y0, lam), times)
    crossing = torch.log(torch.tensor(1e3, dtype=DT)) / lam.flatten()           # e^{−λt} = 1e-3
    expected = [int((times > c).nonzero()[0]) if bool((times > c).any()) else -1 for c in crossing]
    assert sol.stopped_at.tolist() == expected == [2, 4, 6, -1]
    for b, k in enumerate(expected):
        if k >= 0:
            # up to its stop: the same steps as without `done`; after it: its stopped state exactly
            assert ((sol.states[0][:k + 1, b] - alone.states[0][:k + 1, b]).abs() <= 1e-12).all()
            assert torch.equal(sol.states[0][k:, b], sol.states[0][k, b].expand(len(times) - k, 1))
    assert ((sol.states[0][:, 3] - alone.states[0][:, 3]).abs() <= 1e-12).all()
    # the stiffest replica stopped at t = 0.5 instead of stepping on, at h ≲ 3.3/λ (dopri5's
    # stability limit), for over 2000 more steps to t = 400
    assert int(sol.accepted[0]) + 2000 < int(alone.accepted[0])
    # a replica done at the start never moves
    start = dopri5(decay, (y0 * 1e-4, lam), times, done=below)
    assert start.stopped_at.tolist() == [0] * 4 and start.evaluations == 0
    assert torch.equal(start.states[0], (y0 * 1e-4).expand(len(times), 4, 1))


def overflowing_growth(state):
    """dy/dt = c y², y = y0/(1 − c y0 t), whose velocity turns NaN past y = 10 — as a replica's
    gradient does once it diverges."""
    y, c = state
    return torch.where(y > 10, math.nan, c * y ** 2), torch.zeros_like(c)


def test_a_diverging_replica_fails_alone():
    # c = 1: y passes 10 at t = 0.9, where no step can go on; the others stay below 10 up to t = 2
    c = torch.tensor([[0.0], [0.1], [1.0], [0.2]], dtype=DT)
    y0 = torch.ones(4, 1, dtype=DT)
    times = torch.tensor([0.0, 0.5, 2.0], dtype=DT)
    rtol, atol = 1e-9, 1e-12
    sol = dopri5(overflowing_growth, (y0, c), times, rtol=rtol, atol=atol)
    assert sol.failed.tolist() == [False, False, True, False]
    exact = y0 / (1 - c * y0 * times.view(-1, 1, 1))
    ok = ~sol.failed
    assert ((sol.states[0][:, ok] - exact[:, ok]).abs() <= 3 * scale(exact[:, ok], rtol, atol)).all()
    # the failed one reached t = 0.5 (y = 2) and reports its last state, just below 10, after that
    assert abs(float(sol.states[0][1, 2, 0]) - 2.0) <= 3 * (atol + rtol * 2.0)
    assert 9 < float(sol.states[0][2, 2, 0]) <= 10
    # it never held the others up: they needed a few dozen steps, the failure fewer than 200
    assert int((sol.accepted + sol.rejected)[ok].max()) < 60 and sol.evaluations < 6 * 200


def test_i_controller_and_bad_input():
    lam = torch.tensor([[1.0], [10.0]], dtype=DT)
    y0 = torch.ones(2, 1, dtype=DT)
    sol = dopri5(decay, (y0, lam), [0.0, 1.0], controller=Controller(beta=0.0))
    exact = torch.exp(-lam) * y0
    assert ((sol.states[0][-1] - exact).abs() <= 3 * scale(exact, 1e-10, 1e-12)).all()
    with pytest.raises(ValueError, match="strictly increasing"):
        dopri5(decay, (y0, lam), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="frozen has shape"):
        dopri5(decay, (y0, lam), [0.0, 1.0], frozen=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="first_step"):
        dopri5(decay, (y0, lam), [0.0, 1.0], first_step=-1.0)
    with pytest.raises(ValueError, match="leading replica axis"):
        dopri5(decay, (y0, lam[:1]), [0.0, 1.0])
    with pytest.raises(ValueError, match="safety"):
        Controller(safety=1.5)
