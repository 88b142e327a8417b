"""The command line: a thin @hydra.main around `train.run`, the printed report, and what a job
does when it fails (records it, so a sweep's table shows it) or runs under a parallel launcher
(takes its share of the cores, no more)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from .config import ConfigError, register
from .report import table
from .rundir import record_failure  # what a failed job leaves in its run dir

log = logging.getLogger(__name__)
register()   # the schemas, each optimiser's own among them, before Hydra composes


# ------------------------------------------------------------------------ where the job runs

def _hydra_config() -> Any | None:
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get() if HydraConfig.initialized() else None


def _multirun() -> bool:
    from hydra.types import RunMode
    hc = _hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def available_cores() -> int:
    """Cores this process may use (its CPU affinity: a SLURM allocation, taskset, a container)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:      # macOS, Windows
        return os.cpu_count() or 1


def launcher_threads() -> int | None:
    """Torch threads for one job of a parallel launcher, so that jobs × threads ≤ cores.

    joblib runs n_jobs jobs at once on this machine: cores // n_jobs each (n_jobs = -1 means all
    cores, -2 all but one, as joblib counts). submitit jobs get their cpus_per_task; without it,
    a SLURM job uses the cores of its allocation (its affinity) and a local one a single core, since
    submitit_local starts every job of the array at once. The basic launcher runs one job at a time
    in this process: torch's default. None means "leave torch's default".
    """
    hc = _hydra_config()
    if hc is None or not _multirun():
        return None
    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    cores = available_cores()
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs") or -1)
        if n_jobs < 0:
            n_jobs = max(cores + 1 + n_jobs, 1)
        return max(cores // n_jobs, 1)
    if "submitit" in target.lower():
        cpus = launcher.get("cpus_per_task")
        if cpus:
            return int(cpus)
        return cores if "slurm" in target.lower() else 1
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, ConfigError) else f"{type(error).__name__}: {text}"


# exit codes: 1 an error, 2 bad input (ConfigError), 3 every replica diverged, 128 + the signal
# (130 SIGINT, 143 SIGTERM) a run interrupted after its checkpoint
EXIT_DIVERGED = 3


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from .train import Interrupted, run

    if cfg.threads is None:
        cfg.threads = launcher_threads()
    try:
        summary = run(cfg, columns="arrays")     # the table and the objective need only the aggregates
    except Interrupted as stop:
        # checkpointed: one line (where, which step, how to resume), no traceback, no failure record
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as error:
        where = record_failure(cfg, error)
        if _multirun():
            # Hydra marks this job failed, the batch's other jobs go on, and the sweep exits
            # non-zero at the end; summary.json keeps the error for `dlntorch.collect`
            log.error("job failed: %s%s", _one_line(error), f" (recorded in {where})" if where else "")
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not isinstance(error, ConfigError):
            raise
        detail = f" (traceback in {where})" if where and not isinstance(error, ConfigError) else ""
        print(f"dlntorch: error: {_one_line(error)}{detail}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    log.info(table(summary))     # through logging: on the console and in the job's cli.log
    if summary["status"] == "diverged" and not _multirun():
        sys.exit(EXIT_DIVERGED)
    return float(summary["aggregates"]["energy"]["median"])   # for sweepers that optimise


def entry() -> None:
    """`python -m dlntorch` and the `dlntorch` command: `main`, then the end of the process without
    the interpreter's teardown (see `exit_without_teardown`). Errors exit through sys.exit as
    before, with the teardown."""
    main()
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> None:
    """End the process as a normal exit would, less the interpreter's teardown: first what the
    interpreter does first, `threading._shutdown` (the hooks registered with threading's own
    atexit, where joblib's loky executor tells its workers to stop, then a join of the other
    threads), then the atexit handlers (logging's shutdown closes cli.log; multiprocessing joins
    its children: without the first step it waited for loky's idle workers to time out, 300 s
    after every joblib sweep), and stdout and stderr are flushed; then os._exit skips what
    follows, the freeing of every module and of libtorch's globals (1.5–2 s after `import torch`
    on a busy 2-core machine), which the OS does anyway. Every file dlntorch writes is closed
    before (atomic writes, the closed events file)."""
    import atexit
    import threading

    threading._shutdown()       # type: ignore[attr-defined]  # the interpreter's own first step
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
