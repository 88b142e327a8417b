"""Hydra callbacks (registered in conf/config.yaml under hydra.callbacks): a multirun says how far
it has got as its jobs finish, and at its end where the sweep is and how to read it."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import SUMMARY

log = logging.getLogger(__name__)


def planned_jobs(sweep_dir: Path) -> int | None:
    """The number of jobs of the sweep in `sweep_dir`: the product of the sizes of its sweep
    overrides (the command line's and hydra.sweeper.params', from multirun.yaml), parsed as
    Hydra parses them. None when multirun.yaml is missing or unreadable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml")
        params = OmegaConf.select(saved, "hydra.sweeper.params", default=None) or {}
        # the sweeper's params first: the command line's value of a key replaces them
        overrides = [f"{key}={value}" for key, value in params.items()] + list(saved.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 — a count to show, never a reason to fail the sweep
        return None
    by_key = {override.key_or_group: override for override in parsed}
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
                     for o in by_key.values())


def _job_line(job_dir: Path, overrides: list[str]) -> str:
    """<overrides> (status, median E, wall) of the job that wrote `job_dir`."""
    try:
        summary = json.loads((job_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return f"{' '.join(overrides)} (no summary.json)"
    status = summary.get("status", "?")
    energy = ((summary.get("aggregates") or {}).get("energy") or {}).get("median")
    parts = [status] + ([f"median E {energy:.3g}"] if isinstance(energy, (int, float)) else []) + \
        ([f"{summary['wall_time']:.1f} s"] if isinstance(summary.get("wall_time"), (int, float)) else [])
    return f"{' '.join(overrides)} ({', '.join(parts)})"


class SweepProgress(Callback):
    """`job k of n done: <overrides> (status, median E, wall)` after each job of a multirun (k:
    the jobs with a summary.json so far, so parallel launchers count right), and the sweep dir
    with the `python -m dlntorch.collect` command at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra = config.hydra
        if str(hydra.mode) != "RunMode.MULTIRUN":
            return
        sweep = Path(hydra.sweep.dir)
        done = len(list(sweep.glob(f"*/{SUMMARY}")))
        planned = planned_jobs(sweep)
        line = _job_line(Path(hydra.runtime.output_dir), list(hydra.overrides.task))
        log.info(f"job {done} of {planned if planned is not None else '?'} done: {line}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = config.hydra.sweep.dir
        # printed: Hydra's own log format (time, [HYDRA]) would bury the command to copy
        print(f"sweep done: {sweep}\nthe table: python -m dlntorch.collect {sweep}", flush=True)
