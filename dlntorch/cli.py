"""The command line: a thin @hydra.main around `train.run`, and the printed report."""
from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from .config import ConfigError


def report(summary: dict[str, Any]) -> str:
    """A short table of what happened, for the terminal."""
    cfg, agg = summary["config"], summary["aggregates"]
    lines = [
        f"dlntorch: {cfg['task']['name']} {summary['widths'][-1]}x{summary['widths'][0]}, depth {summary['depth']}, "
        f"{summary['replicas']} replicas, {cfg['optim']['name']} lr={cfg['optim']['lr']:g}, init {cfg['init']['name']} "
        f"scale={cfg['init']['scale']:g}",
        f"stopped by {summary['stopped_by']} at step {summary['steps']} (t = {summary['t']:.4g}) "
        f"after {summary['wall_time']:.1f} s",
        f"outputs: {summary['out_dir']}",
        "",
        f"{'observable':<22}{'median':>12}{'min':>12}{'max':>12}",
    ]
    for key in ("energy", "effective_rank", "stable_rank", "balancedness", "balancedness_drift",
                "hyperbola_distance", "test_error"):
        if key in agg:
            a = agg[key]
            lines.append(f"{key:<22}{a['median']:>12.3e}{a['min']:>12.3e}{a['max']:>12.3e}")
    near = summary["near_rank_one"]
    tol = cfg["run"]["rank_one_tol"]
    lines += ["",
              f"near rank one (effective rank < {tol:g}): {near} / {summary['replicas']}"
              f" ({100 * near / summary['replicas']:.0f} %)",
              f"diverged: {summary['diverged_count']}"]
    return "\n".join(lines)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from .train import run   # torch is imported here, after Hydra has parsed the command line

    try:
        summary = run(cfg)
    except ConfigError as error:
        if _multirun():
            raise     # Hydra marks this job failed and the sweep's other jobs go on
        print(f"dlntorch: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(report(summary))
    return float(summary["aggregates"]["energy"]["median"])   # for sweepers that optimise
