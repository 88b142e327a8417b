"""Detectors over logged time series (T, B): rank plateaus and jumps, first passages.

Problem 9 (jumps in rank) made measurable. The rank seen at scale `tol` of W(t),
r(t) = #{i : s_i(t) > tol · s_1(t)}, stays constant for long stretches of log t (a plateau: the
dynamics near a saddle), then changes quickly (a jump). On the logged grid (half log-spaced) a
*plateau* is a maximal run of logged times with one value of r lasting at least `min_decades` of
log10 t, and a *jump* the passage between two consecutive plateaus of different r. (The effective
rank is no good here: it is an integer only when the nonzero singular values are equal.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plateau:
    rank: int
    t_start: float
    t_end: float


@dataclass(frozen=True)
class Jump:
    t_from: float      # end of the plateau left
    t_to: float        # start of the plateau reached
    rank_from: int
    rank_to: int

    @property
    def time(self) -> float:
        """One time for the jump: the midpoint in log t of its two ends (the true passage of a
        clean step lies between them; flicker near a noisy passage widens both ends alike)."""
        return float(np.sqrt(self.t_from * self.t_to))


def rank_at_scale(singular_values: np.ndarray, tol: float = 1e-2) -> np.ndarray:
    """r = #{i : s_i > tol · s_1} from singular values (..., k) sorted descending; −1 where
    they are not finite (diverged replicas)."""
    s = np.asarray(singular_values, dtype=float)
    rank = (s > tol * s[..., :1]).sum(-1)
    return np.where(np.isfinite(s).all(-1), rank, -1).astype(np.int64)


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal values down each column of an integer array (T, B), all columns at
    once: (replica, label, first index, last index) per run, ordered by replica, then time."""
    T = labels.shape[0]
    change = np.ones(labels.shape, dtype=bool)
    change[1:] = labels[1:] != labels[:-1]
    replica, first = np.nonzero(change.T)                  # row-major: replica, then time
    last_run = np.append(replica[1:] != replica[:-1], True)
    last = np.where(last_run, T - 1, np.append(first[1:], T) - 1)
    return replica, labels[first, replica], first, last


def plateaus(t: np.ndarray, rank: np.ndarray, min_decades: float = 0.25) -> list[list[Plateau]]:
    """Per replica, the plateaus of an integer rank series `rank` (T, B) (−1: unknown) on the
    times `t` (T,); only t > 0 counts, since plateaus are measured in log t."""
    t = np.asarray(t, dtype=float)
    positive = t > 0
    t, labels = t[positive], np.asarray(rank)[positive]
    B = labels.shape[1]
    if t.size == 0:
        return [[] for _ in range(B)]
    log_t = np.log10(t)
    replica, label, first, last = _runs(labels)
    keep = (label >= 0) & (log_t[last] - log_t[first] >= min_decades)
    found: list[list[Plateau]] = [[] for _ in range(B)]
    for b, r, s, e in zip(replica[keep].tolist(), label[keep].tolist(), t[first[keep]].tolist(),
                          t[last[keep]].tolist()):
        found[b].append(Plateau(r, s, e))
    return found


def rank_jumps(t: np.ndarray, rank: np.ndarray, min_decades: float = 0.25) -> list[list[Jump]]:
    """Per replica, the jumps between consecutive plateaus of different rank."""
    return [[Jump(a.t_end, b.t_start, a.rank, b.rank) for a, b in zip(runs, runs[1:]) if a.rank != b.rank]
            for runs in plateaus(t, rank, min_decades)]


def first_passage(t: np.ndarray, x: np.ndarray, level: float) -> np.ndarray:
    """Per replica, the first logged time with x < level (NaN if never), (B,)."""
    below = np.asarray(x) < level
    hit = below.any(0)
    return np.where(hit, np.asarray(t, dtype=float)[below.argmax(0)], np.nan)


def learning_times(t: np.ndarray, singular_values: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Per replica and mode, the time s_i(t) first reaches `fraction` of its last logged value,
    (B, k); NaN where it never does or starts there. Interpolated linearly in (log t, s_i)
    between the two logged times around the passage, so the answer does not sit on the grid.

    The incremental-learning time of mode i: under E = ½‖W − diag(s)‖² from a small balanced
    aligned start each mode follows its own scalar flow, and this is its time to half its target.
    """
    t = np.asarray(t, dtype=float)
    s = np.asarray(singular_values, dtype=float)
    positive = t > 0
    t, s = t[positive], s[positive]
    level = fraction * s[-1]                       # (B, k)
    above = s >= level
    hit = above.any(0) & ~above[0]
    j = np.where(hit, above.argmax(0), 1)          # first index at or above the level
    take = lambda a, i: np.take_along_axis(a, i[None], 0)[0]  # noqa: E731
    s_lo, s_hi = take(s, j - 1), take(s, j)
    log_lo, log_hi = np.log(t[j - 1]), np.log(t[j])
    weight = np.clip((level - s_lo) / np.where(s_hi > s_lo, s_hi - s_lo, 1.0), 0.0, 1.0)
    return np.where(hit, np.exp(log_lo + weight * (log_hi - log_lo)), np.nan)


def summarise_events(trajectory: dict[str, np.ndarray], energy_level: float = 1e-8,
                     rank_tol: float = 1e-2) -> dict[str, list]:
    """Per-replica event records for summary.json: the time E first drops below `energy_level`,
    and the jumps of the rank at scale `rank_tol` (each [t_from, t_to, rank_from, rank_to])."""
    t = trajectory["t"]
    out: dict[str, list] = {"convergence_time": first_passage(t, trajectory["energy"], energy_level).tolist()}
    if "singular_values" in trajectory:
        jumps = rank_jumps(t, rank_at_scale(trajectory["singular_values"], rank_tol))
        out["rank_jumps"] = [[[j.t_from, j.t_to, j.rank_from, j.rank_to] for j in js] for js in jumps]
        out["rank_jump_count"] = [len(js) for js in jumps]
    return out
