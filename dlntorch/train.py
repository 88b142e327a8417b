"""The run loop: `run(cfg) -> summary`, usable from Python and from the CLI.

config → validate → task → network + initial condition → dynamics → loop over chunks of steps,
each followed by the stop test; at logged times a snapshot (recorder.py observes them in batches
into the trajectory and TensorBoard); checkpoints and resume through the run dir (rundir.py); at
the end the final checkpoint, then the reports (report.summarise → summary.json, hparams).
Everything batched over the replica axis; the loop never syncs with the device except at logged
times and stop checks. `hooks` (hooks.py) let an instrument time each stretch of the loop.
"""
from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import as_config, derive_seeds, resolve_depth, total_steps, validate
from .dynamics import Dynamics, build_dynamics
from .errors import ConfigError
from .hooks import Hooks
from .init import initial_factors
from .logger import log_steps
from .network import DeepLinearNetwork, default_widths
from .recorder import Recorder
from .report import depth_text, header, headline, hparams, summarise, sweep_of_this_job
from .rundir import RunDir, RunState, hydra_overrides
from .tasks import Task, build_task
from .trajectory import Trajectory

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """A replica diverged and run.on_divergence=error."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint; the message is the one line that
    says where, at which step, and the command that resumes it. `exit_code`: 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class Signals:
    """While a run's loop runs, SIGINT and SIGTERM (SLURM's warning before a time limit) only
    set `caught`: the loop checkpoints after the current advance and stops. A second signal
    stops at once (KeyboardInterrupt). The previous handlers come back on exit."""

    NAMES = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.caught: int | None = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.caught is not None:
            raise KeyboardInterrupt
        self.caught = signum

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():   # signals reach only the main thread
            for signum in self.NAMES:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------ configuration

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: this machine has no CUDA device; "
                          "use device=cpu or device=auto.")
    return torch.device(name)


def resolve_widths(model: Any, shape: tuple[int, int]) -> list[int]:
    """[d_0, …, d_N]; the ends must match the task's (m, n)."""
    m, n = shape
    if model.widths is None:
        return default_widths(resolve_depth(model), m, n)
    widths = [int(w) for w in model.widths]
    if widths[0] != n or widths[-1] != m:
        raise ConfigError(f"model.widths={widths} is not allowed: its ends must match the task's "
                          f"{m}x{n} matrix: d_0 = {n} and d_N = {m}.")
    return widths


# ------------------------------------------------------------------------ the loop

class Lab:
    """One run: its config, task, network, dynamics, run dir, logged rows and state."""

    def __init__(self, cfg: DictConfig, hooks: Hooks | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.seeds = derive_seeds(cfg)
        self.task: Task = build_task(cfg.task, self.seeds["task"]).to(self.device, self.dtype)
        self.widths = resolve_widths(cfg.model, self.task.shape)
        start = initial_factors(cfg.init, self.widths, cfg.replicas, self.seeds["init"])
        self.rundir = RunDir.create(cfg)       # only once every input has been read and checked
        self.total_steps = total_steps(cfg)
        self.grid = log_steps(self.total_steps, cfg.run.log_points)
        self.net = DeepLinearNetwork(self.widths, cfg.replicas, self.dtype, self.device)
        self.net.set_factors([f.to(self.device, self.dtype) for f in start])
        self.dynamics: Dynamics = build_dynamics(cfg, self.net, self.task, self.seeds["dynamics"])
        self.state = RunState(diverged=torch.zeros(cfg.replicas, dtype=torch.bool, device=self.device),
                              G0=[g.detach().clone() for g in self.net.balancedness()],
                              W0=self.net.product().detach().clone(),
                              trajectory=Trajectory(self.rundir.rows, capacity=len(self.grid)))
        self.hooks = hooks or Hooks()
        self.recorder = Recorder(self.dynamics, self.task, self.state, cfg.run, self.grid, self.dynamics.beta,
                                 self.hooks)
        self.signals = Signals()

    def wall(self) -> float:
        return time.monotonic() - self.started

    def checkpoint(self) -> None:
        # events up to this step reach the disk before the checkpoint names the step: a resumed
        # run purges the events past it (purge_step), so every step is in TensorBoard exactly once
        self.recorder.flush(to_disk=True)
        self.save()

    def save(self) -> None:
        """trajectory.npz and checkpoint.pt of the state as it is (the logged rows flushed)."""
        self.rundir.save(self.state, self.dynamics, self.cfg, self.state.elapsed + self.wall())
        self.last_checkpoint = (self.state.step, time.monotonic())

    def checkpoint_due(self) -> bool:
        every, minutes = self.cfg.run.checkpoint_every, self.cfg.run.checkpoint_minutes
        last_step, last_time = self.last_checkpoint
        return (every > 0 and self.state.step - last_step >= every) or \
            (time.monotonic() - last_time) / 60 >= minutes

    def check(self) -> bool:
        """Divergence bookkeeping and the stop test (one host sync). True: stop now."""
        s = self.state
        energy = self.dynamics.energy()
        newly = ~torch.isfinite(energy) & ~s.diverged
        s.diverged |= ~torch.isfinite(energy)
        self.dynamics.freeze(s.diverged)
        if self.cfg.run.on_divergence == "error" and bool(newly.any()):
            raise DivergenceError(f"{int(newly.sum())} replica(s) diverged at step {s.step} (t = {s.t:g}) "
                                  "and run.on_divergence=error")
        live = energy[~s.diverged]
        if self.pending_switches():
            self.live = (live.numel(), float(live.median()) if live.numel() else float("nan"))
            return False      # a scheduled switch is still to come: fitting the smaller set is not the end
        if live.numel() == 0:
            self.live = (0, float("nan"))
            return True
        # the stop test and the bar's median energy in one transfer from the device
        below, median = torch.stack([(live < self.cfg.run.stop_energy).all().to(live.dtype), live.median()]).tolist()
        self.live = (live.numel(), median)
        return below > 0

    def stops_here(self, end: int) -> bool:
        """Whether the stop test may end the run at step `end`: a step-based run only every
        run.stop_check_every steps (and at its last), never at a logged step between them, so that
        where a run stops does not depend on run.log_points (the test still runs at logged steps:
        their rows carry the divergence flags as of that step); an exact flow at each of its ends."""
        return not self.dynamics.step_based or end % self.cfg.run.stop_check_every == 0 or end == self.total_steps

    def announce(self, resumed: bool) -> None:
        """The header, where the outputs go and how to watch them, before the first step; with
        resume=true, whether the run continues from a checkpoint or starts fresh."""
        cfg, s = self.cfg, self.state
        log.info(header(OmegaConf.to_container(cfg, resolve=True), self.widths,
                        self.dynamics.depth, self.device))
        log.info("outputs: %s (watch: tensorboard --logdir %s)", self.rundir.path, self.rundir.path)
        if cfg.resume:
            log.info(f"resume=true: continuing from the checkpoint in {self.rundir.path} at step {s.step} "
                     f"(t = {s.t:.4g})" if resumed else
                     f"resume=true: no checkpoint in {self.rundir.path}: starting fresh")

    def interrupt(self, signum: int) -> Interrupted:
        """Checkpoint (trajectory so far included) and the one line saying how to resume."""
        self.checkpoint()
        self.recorder.tb.close()
        s, out = self.state, self.rundir.path
        given = hydra_overrides()
        if given is None:       # called from Python: the same config again
            how = f"the same config with resume=true and run.out_dir={out}"
        else:                   # the command line again, into this run dir
            kept = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "resume")]
            how = shlex.join(["python", "-m", "dlntorch", *kept, f"hydra.run.dir={out}", "resume=true"])
        return Interrupted(f"dlntorch: interrupted by {signal.Signals(signum).name} at step {s.step} "
                           f"(t = {s.t:.4g}); checkpoint and trajectory in {out}; resume with: {how}", signum)

    def diverged_line(self) -> str | None:
        """Any divergence: the count, and 2/λ_max at t = 0 (the sharpest replica's), the largest
        learning rate under which gradient descent is stable at the start."""
        count = int(self.state.diverged.sum())
        if count == 0:
            return None
        from .sharpness import largest_stable_lr
        start = initial_factors(self.cfg.init, self.widths, self.cfg.replicas, self.seeds["init"])
        bound = largest_stable_lr([f.to(self.device, self.dtype) for f in start], self.task)
        return (f"dlntorch: {count} of {self.cfg.replicas} replicas diverged at optim.lr={self.cfg.optim.lr:g}; "
                f"lr ≲ 2/λ_max = {bound:.3g} at t = 0 (λ_max: the Hessian's top eigenvalue at the start, "
                f"sharpest replica; it grows as W does, so the stable lr may be lower)")

    # -- task.schedule: the observed set switches at given steps --------------------------
    def pending_switches(self) -> list[int]:
        schedule = self.task.schedule
        return [] if schedule is None else [at for at in schedule.switches if self.state.step < at < self.total_steps]

    def segment(self, ends: np.ndarray) -> np.ndarray:
        """The pauses up to the next switch: a flow integrates ahead through the pauses it is
        planned, so it is planned one segment at a time and never integrates across a switch."""
        upcoming = self.pending_switches()
        return ends if not upcoming else ends[ends <= upcoming[0]]

    def follow_schedule(self, mark: bool = True) -> None:
        """At a switch step (or on resuming past one): observe the scheduled set. The pending
        rows are observed first, with the set they were logged under; a TensorBoard marker
        `task/observations` records the start and each switch (`mark`; a resumed run has it)."""
        s = self.state
        if self.task.schedule is None:
            return
        self.recorder.flush()
        if self.task.follow_schedule(s.step):
            self.dynamics.task_changed()
        if mark and s.step in self.task.schedule.steps:
            self.recorder.tb.writer.add_scalar("task/observations", self.task.schedule.count_at(s.step), s.step)

    def train(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        self.started = time.monotonic()
        resumed = cfg.resume and self.rundir.restore(s, self.dynamics, cfg, self.device)
        if resumed and (previous := self.rundir.completed()) is not None:
            log.info(f"resume=true: the run in {self.rundir.path} had finished; nothing left to do")
            return previous           # nothing left to do: the run had finished
        # resuming purges the events past the checkpoint; past a final checkpoint, the final
        # step's own events too (the reports may have been half written), which finish rewrites
        self.announce(resumed)
        self.recorder.open(self.rundir.events,
                           purge_step=None if not resumed else s.step if s.finished else s.step + 1)
        self.last_checkpoint = (s.step, time.monotonic())
        ends = chunk_ends(self.grid, cfg.run.stop_check_every if self.dynamics.step_based else None,
                          self.total_steps)
        if self.task.schedule is not None:     # the loop pauses, and logs, at every switch
            switches = np.asarray([a for a in self.task.schedule.switches if a < self.total_steps], dtype=np.int64)
            self.grid, ends = np.union1d(self.grid, switches), np.union1d(ends, switches)
            self.follow_schedule(mark=not resumed)
        self.dynamics.plan(self.segment(ends))
        if s.finished:        # killed after its final checkpoint: only the reports are left
            return self.finish()
        bar = progress_bar(cfg, self.total_steps, s.step, self.dynamics.depth)
        if s.step == 0 and len(s.trajectory) == 0:
            self.check()
            self.recorder.log()
        with self.signals:
            for end in ends[ends > s.step]:
                with self.hooks.phase("advance"):
                    self.dynamics.advance(int(end) - s.step)
                    s.gradient_evaluations = self.dynamics.gradient_evaluations
                    s.step, s.t = int(end), self.dynamics.time(int(end))
                    if self.task.schedule is not None and s.step in self.task.schedule.switches:
                        self.follow_schedule()
                        self.dynamics.plan(self.segment(ends))
                    s.stopped = self.check() and self.stops_here(int(end))
                if end in self.grid or s.stopped or end == self.total_steps:
                    self.recorder.log()
                if bar is not None:
                    bar.set_postfix(live=self.live[0], E=f"{self.live[1]:.3g}", refresh=False)
                    bar.update(int(end) - bar.n)
                if s.stopped:
                    break
                if self.signals.caught is not None:
                    if bar is not None:
                        bar.close()
                    raise self.interrupt(self.signals.caught)
                if self.checkpoint_due():
                    self.checkpoint()
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The final checkpoint before any report is written (the state is final): a kill in
        between resumes straight to the reports, with the final row, the stop reason and no step
        twice. The summary reads the rows first (computed, not yet written); then the checkpoint
        is written by a second thread (the row file becomes trajectory.npz in place: headers,
        CRCs, deflate, which release the GIL) while TensorBoard's last records are; summary.json,
        which marks the run complete, only once the checkpoint is on disk."""
        with self.hooks.phase("finish"), ThreadPoolExecutor(max_workers=1) as writer:
            s = self.state
            saved = None
            if s.finished:        # resumed past the final checkpoint: its step was purged
                self.recorder.scalars([s.trajectory.last])
            else:
                if self.recorder.last_step() != s.step:
                    self.recorder.log()
                self.recorder.flush(to_disk=True)
            final = s.trajectory.last
            summary = summarise(self.cfg, s, final, out=self.rundir.path, seeds=self.seeds,
                                device=self.device, widths=self.widths, total_steps=self.total_steps,
                                counters=self.dynamics.counters(), wall_time=s.elapsed + self.wall(),
                                dynamics_depth=self.dynamics.depth, stochastic=self.dynamics.stochastic)
            if not s.finished:    # the rows are read: the row file may become trajectory.npz
                s.finished = True
                saved = writer.submit(self.save)
            if self.task.schedule is not None:
                summary["schedule"] = self.task.schedule.record(self.dynamics.time)
            self.recorder.histograms(s.step, final)
            self.recorder.close(s.step, hparams(summary["config"], hydra_overrides(), sweep_of_this_job()),
                                headline(summary))
            # encoded and written while the checkpoint is (JSON of 4096 replicas: ~0.1 s); named
            # summary.json only once the checkpoint is on disk (its error raised, nothing named)
            self.rundir.write_summary(summary, before_rename=None if saved is None else saved.result)
            s.trajectory.discard()      # complete: trajectory.npz holds every row
            if (line := self.diverged_line()) is not None:
                log.warning(line)
            return summary


def chunk_ends(grid: np.ndarray, every: int | None, total: int) -> np.ndarray:
    """Where the loop pauses: logged steps, stop checks every `every` steps, and the end."""
    ends = [grid, [total]]
    if every:
        ends.append(np.arange(every, total + 1, every))
    return np.unique(np.concatenate(ends)).astype(np.int64)


def progress_bar(cfg: DictConfig, total: int, start: int, depth: Any):
    """The bar (N: the depth the dynamics integrates); its postfix, set at stop checks, shows the
    live replicas and their median energy."""
    if not cfg.run.progress:
        return None
    from tqdm.auto import tqdm
    # delay: the bar appears only on runs that take more than a few seconds
    return tqdm(total=total, initial=start, delay=3, unit="step", dynamic_ncols=True,
                desc=f"{cfg.task.name} N={depth_text(depth)}", file=sys.stderr)



def run(cfg: Any, hooks: Hooks | None = None, columns: str = "lists") -> dict[str, Any]:
    """Train as `cfg` says and return the summary (also written to summary.json).

    `threads` sets torch's threads for this process (launcher jobs get cores // parallel jobs).
    With `resume=true` and a checkpoint.pt in the run dir the run continues from it (a completed
    run just returns its summary); otherwise it starts afresh, and TensorBoard events that an
    earlier attempt left in the run dir move to superseded/<time>/ (renamed so that TensorBoard
    does not read them), so no step appears twice. `hooks` watch the loop (see dlntorch.hooks).
    SIGINT / SIGTERM during the loop checkpoint the run and raise `Interrupted` (its message says
    how to resume). A run with divergences logs one line with the count and 2/λ_max at t = 0.

    `columns`: the per-replica columns of the summary (final, events) as `lists`, as summary.json
    holds them, or as numpy `arrays` (8 bytes a number against a Python float's 32: ~1 KB a
    replica less at the end of a run; what the command line asks for, which needs only the
    aggregates). A completed run resumed returns its summary.json as written (lists).
    """
    if columns not in ("lists", "arrays"):
        raise ValueError(f"columns={columns!r} is not allowed: use 'lists' (as summary.json) or 'arrays' (numpy).")
    cfg = as_config(cfg)
    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    lab = Lab(cfg, hooks)
    if not (cfg.resume and lab.rundir.has_checkpoint()):
        lab.rundir.set_superseded_events_aside()
    summary = lab.train()
    del lab             # its state and last row go before the summary's arrays become lists
    return as_lists(summary) if columns == "lists" else summary


def as_lists(value: Any) -> Any:
    """The summary as summary.json holds it: each array (a per-replica column, kept as an array
    until written) a list, converted in place one at a time, so that each array goes as its list
    comes (the summary of 5e6 replicas: ~1 GB of arrays, ~5 GB of lists)."""
    if isinstance(value, dict):
        for key in value:
            value[key] = as_lists(value[key])
    elif isinstance(value, np.ndarray):
        return value.tolist()
    return value
