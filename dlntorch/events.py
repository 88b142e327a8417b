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


def rank_at_scale(singular_values: np.ndarray, tol: float = 1e-2) -> np.ndarray:
    """r = #{i : s_i > tol · s_1} from singular values (..., k) sorted descending; −1 where
    they are not finite (diverged replicas)."""
    s = np.asarray(singular_values, dtype=float)
    rank = (s > tol * s[..., :1]).sum(-1)
    return np.where(np.isfinite(s).all(-1), rank, -1).astype(np.int64)


def _runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs (label, first index, last index) of a 1-D integer array."""
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change - 1, [labels.size - 1]])
    return [(int(labels[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def plateaus(t: np.ndarray, rank: np.ndarray, min_decades: float = 0.25) -> list[list[Plateau]]:
    """Per replica, the plateaus of an integer rank series `rank` (T, B) (−1: unknown) on the
    times `t` (T,); only t > 0 counts, since plateaus are measured in log t."""
    t = np.asarray(t, dtype=float)
    positive = t > 0
    t, labels = t[positive], np.asarray(rank)[positive]
    log_t = np.log10(t) if t.size else t
    found: list[list[Plateau]] = []
    for b in range(labels.shape[1]):          # analysis, not the hot loop: runs are ragged
        found.append([Plateau(r, float(t[s]), float(t[e])) for r, s, e in _runs(labels[:, b])
                      if r >= 0 and log_t[e] - log_t[s] >= min_decades])
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
