"""dlntorch's performance benchmark: every target of the Speed issue as a ratio measured side by
side in ONE process (interleaved repetitions, minimum over repeats: other tenants of the machine
only ever add time), printed as a table and written as JSON.

Baseline: what a new user writes — one network, autograd, torch.optim.SGD, no logging
(`Baseline` below). "The lab" is dlntorch's own run loop (`train.Lab`: its dynamics advanced in
chunks of run.stop_check_every steps, each followed by the stop test) on the same task, the same
initial condition and the same learning rate.

Sections (CPU unless said):
  1  seed 2x2, depth 3, GD, float64: replica-steps/s at B = 1, 64, 1024, 4096, 16384 against the
     baseline's steps/s; the step time at B = 1.
  2  100x100 rank-5 completion, depth 3, 2000 observations, float32 and float64, B = 1: the step
     time against the baseline's, and the fraction of the CPU's matmul rate achieved (a bare loop
     of the same 100x100 matmuls, measured in the same run: a step needs 6 of them).
  3  memory: peak RSS per replica (fresh child processes at two B; the slope), the largest B
     under --memory-budget-gb, and the RSS growth over 1e5 steps of the run loop.
  4  --device cuda (or auto on a CUDA machine): replica-steps/s on the 2x2 task for B up to 2^20,
     eager and with CUDA graphs, modelled memory traffic against --peak-bandwidth (H200: 4.3 TB/s),
     peak memory per replica (torch.cuda.max_memory_allocated). Prints 'skipped: no CUDA' otherwise.
  5  exact flows, seed 2x2, depth 3, dopri5 at rtol 1e-10 / atol 1e-12 to t = 200 on the flow's
     logged grid, B = 1024: batched ∇E evaluations and wall time of a step size per replica
     (dlntorch.solvers) against one shared step (torchdiffeq, dlntorch.dynamics.flows), against the most
     any of 32 replicas needs alone, and each replica's error against a tight reference;
     torchode (per-instance steps, dense output) alongside when it is installed.
  6  noise models (dlntorch.noise; balanced on 2x2 factors) and optim=rle (downstairs, 2x2) on the seed
     2x2 task, depth 3, B = 4096, one step outside the run loop: seconds per replica-step of each
     model and its ratio to isotropic (target ≤ 10x),
     the share of a step spent in the fibre's projection solve (the normal equations of
     dlntorch.fibre.minimum_norm_generator), and the cost of the SVD of τ (the fallback) against
     that solve (`--sections 6`).
  7  run.compile: the compiled GD step at B = 4096 (planes) against the eager one, and the compile time.
  8  streaming trajectory: peak RSS (getrusage) of whole default-task runs in child processes, the
     per-replica slope (B = 1e5 to 4e5; --stream-million: to 1e6), the largest B in
     --memory-budget-gb, 174 logged rows against 6 at B = 1e4.
  9  logging and fixed costs: the wall time of a whole run (built, trained, reported) with the
     default log grid against run.log_points=2, 20000 steps, interleaved, at B = 256 and 4096
     (seed 2x2) and for the 100x100 run; `python -m dlntorch` at B = 4096 start to exit against
     the baseline's steps/s; and, from a child process whose hooks mark its first and last step,
     the time from process start to the first step and from the last step to exit.

Rows with a target report through `target(...)` (value, bound, pass) and `unmeasured(...)` (a
target this machine cannot measure, such as the GPU's without CUDA), so every section's rows
read alike in the table and in the JSON.

    python scripts/bench.py --quick                  # smoke run, well under a minute
    python scripts/bench.py --json outputs/bench.json  # the full table (a few minutes on 2 cores)
    python scripts/bench.py --device cuda --sections 4
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (fewer repeats, shorter chunks)")
    ap.add_argument("--json", default="outputs/bench.json", help="where the table goes as JSON ('' for nowhere)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="section 4 runs on CUDA when this is cuda or auto and CUDA is present")
    ap.add_argument("--sections", default="1,2,3,4,5,6,7,8,9", help="comma-separated subset of 1,…,9")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 7; quick 3)")
    ap.add_argument("--memory-budget-gb", type=float, default=8.0, help="CPU memory budget for 'largest B'")
    ap.add_argument("--peak-bandwidth", type=float, default=4.3e12, help="the card's memory bandwidth, B/s")
    ap.add_argument("--probe", nargs=3, metavar=("CASE", "B", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--process-probe", nargs=2, metavar=("B", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--run-probe", nargs=2, type=int, metavar=("B", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--stream-million", action="store_true", help="section 8 also runs B = 1e6 (minutes)")
    return ap.parse_args(argv)


ARGS = parse_args()
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from dlntorch.hooks import Stopwatch  # noqa: E402
from dlntorch.train import Lab  # noqa: E402

torch.set_num_threads(ARGS.threads)

SEED = ["task=seed2x2", "model.depth=3", "optim=gd"]                       # the default run's task
# optim.lr=0.01: with the gd default lr 0.05 this task diverges within ~30 steps (its largest
# curvature grows with σ_max(W*)^{2−2/N} ~ 45^{4/3}); 0.01 is stable and reaches E ≈ 1e-3 in 3000
# steps. Timing NaN arithmetic would measure nothing useful.
COMPLETION = ["task=completion", "task.size=100", "task.rank=5", "task.observations=2000",
              "model.depth=3", "optim=gd", "optim.lr=0.01", "replicas=1"]
CASES = {"seed2x2": SEED, "completion100": COMPLETION}
TMP = Path(tempfile.mkdtemp(prefix="dlntorch-bench-"))


# ------------------------------------------------------------------------------ helpers

def config(*overrides: str, out: str = "run"):
    """The composed Hydra config, as `python -m dlntorch <overrides>` would build it."""
    GlobalHydra.instance().clear()
    with initialize_config_module("dlntorch.conf", version_base="1.3"):
        device = [] if any(o.startswith("device=") for o in overrides) else ["device=cpu"]
        return compose("config", overrides=[f"run.out_dir={TMP / out}", "run.progress=false",
                                            *device, *overrides])


def make_lab(*overrides: str, out: str = "run") -> Lab:
    return Lab(config(*overrides, out=out))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Baseline:
    """The plain single-network loop a new user writes: autograd, torch.optim.SGD, no logging.

    Same task (mask, observed values), same initial factors (replica 0 of the lab's) and lr."""

    def __init__(self, factors, mask, target, lr):
        self.start = [f.detach().clone() for f in factors]
        self.W = [f.clone().requires_grad_() for f in self.start]
        self.mask, self.target = mask, target
        self.optimizer = torch.optim.SGD(self.W, lr=lr)

    def reset(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.W, self.start):
                w.copy_(w0)

    def run(self, steps: int) -> None:
        W1, W2, W3 = self.W
        for _ in range(steps):
            self.optimizer.zero_grad()
            W = W3 @ W2 @ W1
            loss = 0.5 * ((self.mask * (W - self.target)) ** 2).sum()
            loss.backward()
            self.optimizer.step()


def baseline_for(lab: Lab) -> Baseline:
    factors = [f[0] for f in lab.dynamics.factors()]
    return Baseline(factors, lab.task.mask.clone(), lab.task.values.clone(), lab.cfg.optim.lr)


class LabLoop:
    """The lab's run loop without logging: advance run.stop_check_every steps, then the stop test
    (its one host sync), as Lab.train does between logged times. `reset` restores the initial
    factors so that every timed chunk runs the same stretch of the trajectory."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.start = [f.clone() for f in lab.dynamics.factors()]
        self.every = lab.cfg.run.stop_check_every

    def reset(self) -> None:
        self.lab.net.set_factors(self.start)

    def run(self, steps: int) -> None:
        dyn, check = self.lab.dynamics, self.lab.check
        while steps > 0:
            k = min(self.every, steps)
            dyn.advance(k)
            check()
            steps -= k


def calibrate(runner, device, target_s: float) -> int:
    """Steps per timed chunk so that one chunk takes about target_s."""
    n = 1
    while True:
        runner.reset()
        sync(device)
        t0 = time.perf_counter()
        runner.run(n)
        sync(device)
        dt = time.perf_counter() - t0
        if dt > target_s / 4 or n >= 1 << 20:
            return max(1, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def race(runners: dict, device, repeats: int, target_s: float) -> dict[str, dict]:
    """Interleave the runners' timed chunks `repeats` times; seconds per step (min, median)."""
    steps = {name: calibrate(r, device, target_s) for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            r.reset()
            sync(device)
            t0 = time.perf_counter()
            r.run(steps[name])
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps[name])
    return {name: {"min": min(ts), "median": float(np.median(ts)), "steps": steps[name], "all": ts}
            for name, ts in times.items()}


ROWS: list[dict] = []


def row(section: str, name: str, value, unit: str, target: str | None = None, ok: bool | None = None,
        note: str = "") -> dict:
    r = {"section": section, "name": name, "value": value, "unit": unit, "target": target,
         "pass": ok, "note": note}
    ROWS.append(r)
    return r


def target(section: str, name: str, value, unit: str, *, at_most: float | None = None,
           at_least: float | None = None, note: str = "") -> dict:
    """A row with a target of the Speed issues: `value` ≤ `at_most` or ≥ `at_least` (in `unit`);
    its pass is whether it holds, None when `value` is not a number (not measured here)."""
    bound, sign = (at_most, "≤") if at_most is not None else (at_least, "≥")
    spacer = "" if unit == "x" else " "
    text = f"{sign} {fmt(bound)}{spacer}{unit}".rstrip()
    measured = isinstance(value, (int, float)) and math.isfinite(value)
    ok = None if not measured else value <= at_most if at_most is not None else value >= at_least
    return row(section, name, value, unit, text, ok, note)


NO_DEVICE = "unmeasured (no device lent)"


def unmeasured(section: str, name: str, target_text: str, why: str = NO_DEVICE, note: str = "") -> dict:
    """A target row this machine cannot measure (a GPU target without CUDA): its value says why."""
    return row(section, name, why, "", target_text, None, note)


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    a = abs(value)
    if a >= 1e5 or (a < 1e-2 and a > 0):
        return f"{value:.3g}"
    return f"{value:,.3g}" if a < 100 else f"{value:,.0f}"


def print_table(rows: list[dict]) -> None:
    head = ("section", "measurement", "value", "unit", "target", "pass")
    body = [(r["section"], r["name"], fmt(r["value"]), r["unit"], r["target"] or "",
             {True: "PASS", False: "FAIL", None: ""}[r["pass"]]) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head))
    print(line(["-" * w for w in widths]))
    for cells in body:
        print(line(cells))


# ------------------------------------------------------------------------------ section 1

def section_seed(repeats: int, chunk_s: float, quick: bool) -> dict:
    print("\n[1] seed 2x2, depth 3, GD, float64, CPU", flush=True)
    Bs = [1, 64, 1024, 4096, 16384]
    labs = {B: make_lab(*SEED, f"replicas={B}", out=f"seed{B}") for B in Bs}
    base = baseline_for(labs[1])
    runners = {"baseline": base, **{f"lab B={B}": LabLoop(lab) for B, lab in labs.items()}}
    res = race(runners, "cpu", repeats, chunk_s)
    t_base = res["baseline"]["min"]
    out = {"baseline_step_s": t_base, "baseline_steps_per_s": 1 / t_base, "lab": {}}
    row("1 seed2x2", "baseline (autograd + SGD, 1 net)", 1 / t_base, "steps/s")
    for B in Bs:
        t = res[f"lab B={B}"]["min"]
        ratio = B / t * t_base
        out["lab"][B] = {"step_s": t, "replica_steps_per_s": B / t, "ratio": ratio,
                         "layout": labs[B].dynamics.layout}
        target, ok = {1024: ("≥ 100x", ratio >= 100), 4096: ("≥ 1000x", ratio >= 1000)}.get(B, (None, None))
        row("1 seed2x2", f"lab B={B} ({labs[B].dynamics.layout}) replica-steps/s / baseline steps/s",
            ratio, "x", target, ok, note=f"{B / t:.3g} replica-steps/s")
    r1 = res["lab B=1"]["min"] / t_base
    row("1 seed2x2", "lab B=1 step time / baseline step time", r1, "x", "≤ 1.0x", r1 <= 1.0,
        note=f"{res['lab B=1']['min'] * 1e6:.1f} µs vs {t_base * 1e6:.1f} µs")
    out["b1_step_ratio"] = r1
    return out


# ------------------------------------------------------------------------------ section 2

class MatmulLoop:
    """The physical limit: the same 100x100 matmuls as a step, bare (6 per step at depth 3)."""

    def __init__(self, n: int, dtype):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(n, n, generator=g, dtype=dtype) for _ in range(2))
        self.out = torch.empty(n, n, dtype=dtype)

    def reset(self) -> None:
        pass

    def run(self, steps: int) -> None:
        for _ in range(steps):
            torch.mm(self.a, self.b, out=self.out)


def section_completion(repeats: int, chunk_s: float, quick: bool) -> dict:
    print("\n[2] 100x100 rank-5 completion, depth 3, 2000 observations, B = 1, CPU", flush=True)
    out = {}
    for dtype in ("float32", "float64"):
        lab = make_lab(*COMPLETION, f"dtype={dtype}", out=f"completion-{dtype}")
        base = baseline_for(lab)
        runners = {"baseline": base, "lab": LabLoop(lab), "matmul": MatmulLoop(100, getattr(torch, dtype))}
        res = race(runners, "cpu", repeats, chunk_s)
        t_base, t_lab, t_mm = (res[k]["min"] for k in ("baseline", "lab", "matmul"))
        ratio = t_lab / t_base
        flops = 2 * 100 ** 3
        frac_lab, frac_base = 6 * t_mm / t_lab, 6 * t_mm / t_base
        out[dtype] = {"baseline_step_s": t_base, "lab_step_s": t_lab, "matmul_s": t_mm, "ratio": ratio,
                      "matmul_gflops": flops / t_mm / 1e9, "lab_matmul_fraction": frac_lab,
                      "baseline_matmul_fraction": frac_base}
        row("2 completion", f"{dtype}: lab step / baseline step", ratio, "x", "≤ 1.1x", ratio <= 1.1,
            note=f"{t_lab * 1e6:.0f} µs vs {t_base * 1e6:.0f} µs")
        row("2 completion", f"{dtype}: lab's fraction of the matmul rate (6 matmuls/step)", 100 * frac_lab, "%",
            note=f"bare 100x100 matmul {t_mm * 1e6:.1f} µs = {flops / t_mm / 1e9:.1f} GFLOP/s (1 thread); "
                 f"baseline reaches {100 * frac_base:.0f} %")
    return out


# ------------------------------------------------------------------------------ section 3

def rss_kib(field: str = "VmRSS") -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", text).group(1))
    except (OSError, AttributeError):
        import resource
        if field == "VmHWM":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak // 1024 if sys.platform == "darwin" else peak
        return None


def probe(case: str, B: int, steps: int) -> None:
    """Child process: build the lab at B, run `steps` steps of the loop and one logged row; print
    the process's peak RSS and the bytes per replica of one logged row."""
    lab = make_lab(*CASES[case], f"replicas={B}", out=f"probe-{case}-{B}")
    loop = LabLoop(lab)
    loop.run(steps)
    stepping = rss_kib("VmHWM")
    row_ = next(lab.recorder.rows([lab.recorder.snapshot()]))
    row_bytes = sum(v.nbytes for v in row_.values()) / B
    print(json.dumps({"peak_kib": stepping, "peak_observe_kib": rss_kib("VmHWM"), "row_bytes": row_bytes,
                      "layout": lab.dynamics.layout}))


def run_probes(specs: list[tuple[str, int, int]]) -> dict:
    procs = {spec: subprocess.Popen([sys.executable, __file__, "--threads", str(ARGS.threads),
                                     "--probe", *map(str, spec)], stdout=subprocess.PIPE, text=True)
             for spec in specs}
    out = {}
    for spec, p in procs.items():
        text, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory probe {spec} failed")
        out[spec] = json.loads(text.strip().splitlines()[-1])
    return out


def section_memory(quick: bool) -> dict:
    print("\n[3] memory (CPU)", flush=True)
    budget = ARGS.memory_budget_gb * 2 ** 30
    pairs = {"seed2x2": (4096, 65536 if quick else 262144, 200),
             "completion100": (1, 16 if quick else 64, 10)}
    probes = run_probes([(case, B, steps) for case, (b1, b2, steps) in pairs.items() for B in (b1, b2)])
    out = {}
    for case, (b1, b2, steps) in pairs.items():
        p1, p2 = probes[(case, b1, steps)], probes[(case, b2, steps)]
        per = (p2["peak_kib"] - p1["peak_kib"]) * 1024 / (b2 - b1)
        fixed = p1["peak_kib"] * 1024 - per * b1
        per_observe = (p2["peak_observe_kib"] - p1["peak_observe_kib"]) * 1024 / (b2 - b1)
        row_bytes = p2["row_bytes"]
        state_bytes = _state_bytes(case)
        largest = int((budget - fixed) / per)
        # a run also keeps its logged rows (up to run.log_points of them) in memory
        points = 200
        largest_run = int((budget - fixed) / (max(per, per_observe) + points * row_bytes))
        out[case] = {"peak_per_replica_bytes": per, "peak_per_replica_with_observe_bytes": per_observe,
                     "fixed_bytes": fixed, "factor_bytes": state_bytes,
                     "row_bytes_per_replica": row_bytes, "largest_B_steps": largest,
                     "largest_B_run_default_grid": largest_run, "probes": {b1: p1, b2: p2}}
        row("3 memory", f"{case}: peak RSS per replica, stepping", per / 1024, "KiB",
            note=f"slope between B={b1} and B={b2} ({p2['layout']} layout); the factors alone: {state_bytes} B; "
                 f"fixed {fixed / 2 ** 20:.0f} MiB (interpreter, torch, hydra)")
        row("3 memory", f"{case}: peak RSS per replica, stepping + one logged point", per_observe / 1024, "KiB",
            note="observables: SVDs, balancedness, entropy at a logged time")
        row("3 memory", f"{case}: largest B in {ARGS.memory_budget_gb:g} GiB (stepping)", largest, "replicas",
            note=f"a whole run, which also keeps its ≤ {points} logged rows ({row_bytes:.0f} B/replica each) "
                 f"in memory: {largest_run:,}")
    out["growth"] = growth(10_000 if quick else 100_000)
    return out


def _state_bytes(case: str) -> int:
    if case == "seed2x2":
        return 3 * 2 * 2 * 8
    return 3 * 100 * 100 * 8


def growth(steps: int) -> dict:
    """RSS along `steps` steps of the run loop, read at every tenth: a per-step leak grows
    linearly, a one-off allocation (allocator arenas, first use of a kernel) does not. The
    verdict is on the last nine tenths; the note gives the whole before → after too."""
    out = {}
    for B in (1, 1024):
        lab = make_lab(*SEED, f"replicas={B}", out=f"growth{B}")
        loop = LabLoop(lab)
        loop.run(1000)
        series = [rss_kib()]
        t0 = time.perf_counter()
        for _ in range(10):
            loop.run(steps // 10)
            series.append(rss_kib())
        wall = time.perf_counter() - t0
        if series[0] is None:
            row("3 memory", f"RSS growth over {steps:.0e} steps (seed2x2, B={B})", "no /proc", "")
            continue
        grown = (series[-1] - series[1]) * 1024
        out[B] = {"steps": steps, "rss_kib": series, "growth_bytes": grown,
                  "growth_bytes_per_step": grown / (steps * 0.9)}
        row("3 memory", f"RSS growth over {steps:.0e} steps (seed2x2, B={B}, {lab.dynamics.layout})",
            grown / 1024, "KiB", "≤ 1024 KiB (no per-step growth)", grown <= 1 << 20,
            note=f"RSS at every tenth: {series[0]} → {series[1]} → … → {series[-1]} KiB; "
                 f"{steps} steps in {wall:.1f} s")
    return out


# ------------------------------------------------------------------------------ section 4

def modelled_bytes(widths: list[int], layout: str, itemsize: int) -> tuple[int, int]:
    """Memory traffic per replica per step of the eager GD step on a completion task, counting
    every op as reading its operands and writing its result once (no cache reuse), and the
    compulsory traffic (read and write each factor once)."""
    def mm(m, k, n):  # (m x k)(k x n)
        if layout == "batch":
            return m * k + k * n + m * n
        return (m + n + m * n) + (k - 1) * (m + n + 2 * m * n)
    d = widths
    N, total = len(d) - 1, 0
    for p in range(2, N + 1):                      # prefix products
        total += mm(d[p], d[p - 1], d[0])
    total += 8 * d[N] * d[0]                       # ∇E: sub, mask, mask, scale (read + write each)
    for p in range(N, 1, -1):                      # grad_p and back_{p-1}
        total += mm(d[p], d[0], d[p - 1]) + mm(d[p - 1], d[p], d[0])
    sizes = sum(a * b for a, b in zip(d[:-1], d[1:]))
    total += 3 * sizes                             # p += -lr g: read p, g; write p
    return total * itemsize, 2 * sizes * itemsize


def section_cuda(repeats: int, chunk_s: float, quick: bool) -> dict:
    print("\n[4] CUDA", flush=True)
    if ARGS.device == "cpu" or not torch.cuda.is_available():
        why = "skipped: --device cpu" if ARGS.device == "cpu" else NO_DEVICE
        print(why)
        for path in ("eager", "CUDA graphs", "compiled"):
            unmeasured("4 cuda", f"{path}: replica-steps/s for B up to 2^20, bandwidth vs peak",
                       "measured on the card", why)
        return {"skipped": why}
    Bs = [2 ** k for k in ((10, 14, 18, 20) if quick else (10, 12, 14, 16, 18, 20))]
    return replica_sweep(torch.device("cuda"), Bs, repeats, chunk_s)


def replica_sweep(dev: torch.device, Bs: list[int], repeats: int, chunk_s: float) -> dict:
    """Replica-steps/s of the 2x2 task on `dev`, eager and with CUDA graphs (the flag is a no-op
    off CUDA, which is how this runs in a CPU dry run), modelled bandwidth, peak memory."""
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    base = baseline_for(make_lab(*SEED, "replicas=1", f"device={dev.type}", out="sweep-base"))
    t_base = race({"baseline": base}, dev, repeats, chunk_s)["baseline"]["min"]
    out: dict = {"device": name, "baseline_steps_per_s": 1 / t_base, "lab": {}}
    row("4 cuda", f"baseline on {name}", 1 / t_base, "steps/s")
    for B in Bs:
        lab = make_lab(*SEED, f"replicas={B}", f"device={dev.type}", out=f"sweep{B}")
        lab_g = make_lab(*SEED, f"replicas={B}", f"device={dev.type}", out=f"sweepg{B}")
        lab_g.dynamics.cuda_graphs = True
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        res = race({"eager": LabLoop(lab), "graphs": LabLoop(lab_g)}, dev, repeats, chunk_s)
        traffic, compulsory = modelled_bytes(lab.widths, lab.dynamics.layout, 8)
        entry = {"layout": lab.dynamics.layout, "graph_captured": lab_g.dynamics._graph is not None,
                 "peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
                 "modelled_bytes_per_replica_step": traffic, "compulsory_bytes_per_replica_step": compulsory}
        for mode in ("eager", "graphs"):
            t = res[mode]["min"]
            rs = B / t
            entry[mode] = {"step_s": t, "replica_steps_per_s": rs, "ratio": rs * t_base,
                           "modelled_bandwidth": traffic * rs, "compulsory_bandwidth": compulsory * rs}
            row("4 cuda", f"B=2^{int(math.log2(B))} {mode}: replica-steps/s / baseline", rs * t_base, "x",
                note=f"{rs:.3g} replica-steps/s; modelled traffic {traffic * rs / 1e12:.3g} TB/s = "
                     f"{100 * traffic * rs / ARGS.peak_bandwidth:.1f} % of {ARGS.peak_bandwidth / 1e12:.1f} TB/s "
                     f"(compulsory: {100 * compulsory * rs / ARGS.peak_bandwidth:.2f} %)")
        out["lab"][B] = entry
        del lab, lab_g
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        Bmax = Bs[-1]
        # the eager and the graph lab were both alive: half of the two labs' peak is one run's
        per = out["lab"][Bmax]["peak_bytes"] / 2 / Bmax
        free, total = torch.cuda.mem_get_info(dev)
        out["peak_per_replica_bytes"], out["largest_B"] = per, int(total / per)
        row("4 cuda", f"peak memory per replica (max_memory_allocated / 2 labs at B=2^{int(math.log2(Bmax))})",
            per, "B", note=f"largest B in the card's {total / 2 ** 30:.0f} GiB ≈ {int(total / per):,}")
    return out


# ------------------------------------------------------------------------------ section 5

FLOW = ["task=seed2x2", "model.depth=3", "optim=flow", "run.time=200"]   # dopri5, rtol 1e-10, atol 1e-12


def _flow_problem(B: int):
    """The flow run's start (its default init, B replicas), its ∇E and its logged times up to t = 200."""
    from dlntorch.dynamics.flows import upstairs_velocity
    lab = make_lab(*FLOW, f"replicas={B}", out=f"flow{B}")
    factors = tuple(f.detach().clone() for f in lab.net.factors)
    times = torch.as_tensor(lab.cfg.optim.lr * np.asarray(lab.grid, dtype=np.float64))
    times = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), times]))
    velocity = lambda state: upstairs_velocity(list(state), lab.task.gradient)  # noqa: E731
    return lab, factors, times, velocity


def _error_in_scales(states, reference, rtol: float, atol: float) -> torch.Tensor:
    """Per replica: max over times and entries of |y − y_ref| / (atol + rtol |y_ref|)."""
    worst = [((x - r).abs() / (atol + rtol * r.abs())).flatten(2).amax(2).amax(0) for x, r in zip(states, reference)]
    return torch.stack(worst).amax(0)


def _torchode_flow(factors, times, velocity, rtol: float, atol: float):
    """torchode's Dopri5 with its per-instance integral controller on the flattened factors;
    outputs at `times` by its dense-output interpolation. None when torchode is absent."""
    try:
        import torchode
    except ImportError:
        return None
    shapes = [f.shape[1:] for f in factors]
    sizes = [s.numel() for s in shapes]
    calls = 0

    def rhs(t, y):
        nonlocal calls
        calls += 1
        parts = [p.reshape(-1, *s) for p, s in zip(y.split(sizes, 1), shapes)]
        return torch.cat([v.flatten(1) for v in velocity(parts)], 1)

    term = torchode.ODETerm(rhs)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term),
                                      torchode.IntegralController(atol=atol, rtol=rtol, term=term), max_steps=10 ** 6)
    y0 = torch.cat([f.flatten(1) for f in factors], 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=times.expand(len(y0), -1).contiguous()))
    wall = time.perf_counter() - t0
    ys = sol.ys.transpose(0, 1)
    states = [p.reshape(len(times), -1, *s) for p, s in zip(ys.split(sizes, 2), shapes)]
    return {"evaluations": calls, "wall_s": wall, "states": states, "ok": bool((sol.status == 0).all())}


def section_flows(quick: bool) -> dict:
    """A step size per replica against one shared step, on the flow run's own grid."""
    from dlntorch.dynamics.flows import integrate_upstairs
    from dlntorch.solvers import dopri5
    B, alone_count, repeats = (256, 8, 1) if quick else (1024, 32, 3)
    rtol, atol = 1e-10, 1e-12
    print(f"\n[5] exact flows, seed 2x2, depth 3, dopri5 rtol {rtol:g} atol {atol:g}, t ≤ 200, B = {B}", flush=True)
    lab, factors, times, velocity = _flow_problem(B)
    alone = [dopri5(velocity, [f[b:b + 1] for f in factors], times, rtol=rtol, atol=atol).evaluations
             for b in range(alone_count)]
    # the accuracy a replica had before, on its own: torchdiffeq at B = 1 (a shared step shared with
    # nobody); inside a batch a shared step is set by the hardest replica and over-resolves the rest
    shared_alone = [integrate_upstairs([f[b:b + 1] for f in factors], lab.task.gradient, times, rtol=rtol,
                                       atol=atol)[0] for b in range(alone_count)]
    shared_alone = [torch.cat([path[p] for path in shared_alone], 1) for p in range(len(factors))]
    per_wall, per = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        per = dopri5(velocity, factors, times, rtol=rtol, atol=atol)
        per_wall.append(time.perf_counter() - t0)
    t0 = time.perf_counter()        # ~45 s at B = 1024: once; other tenants only ever add time
    shared_path, shared_evals = integrate_upstairs(factors, lab.task.gradient, times, rtol=rtol, atol=atol)
    shared_wall = time.perf_counter() - t0
    reference = dopri5(velocity, factors, times, rtol=rtol * 1e-3, atol=atol * 1e-3).states
    t_per = min(per_wall)
    worst_alone = max(alone)
    out = {"B": B, "output_times": len(times), "per_replica": {
        "evaluations": per.evaluations, "wall_s": per_wall, "accepted_max": int(per.accepted.max()),
        "rejected_total": int(per.rejected.sum()), "failed": int(per.failed.sum())},
        "shared": {"evaluations": shared_evals, "wall_s": shared_wall},
        "alone_evaluations": alone, "alone_max": worst_alone}
    row("5 flows", f"per-replica steps: batched ∇E evaluations / most of {alone_count} replicas alone",
        per.evaluations / worst_alone, "x", "≤ 1.5x", per.evaluations / worst_alone <= 1.5,
        note=f"{per.evaluations} vs {worst_alone} (alone: median {int(np.median(alone))}); shared steps: "
             f"{shared_evals} = {shared_evals / worst_alone:.1f}x; {len(times)} output times "
             f"to t = {float(times[-1]):g}")
    row("5 flows", f"B={B} wall time: shared / per-replica steps", shared_wall / t_per, "x", "≥ 5x",
        shared_wall / t_per >= 5, note=f"{shared_wall:.1f} s vs {t_per:.2f} s")
    errors = {"per_replica": _error_in_scales(per.states, reference, rtol, atol),
              "shared": _error_in_scales(shared_path, reference, rtol, atol)}
    first = [x[:, :alone_count] for x in reference]
    mine_first = _error_in_scales([x[:, :alone_count] for x in per.states], first, rtol, atol)
    theirs_first = _error_in_scales(shared_alone, first, rtol, atol)
    ratio = float(mine_first.max() / theirs_first.max())
    out["error_first_replicas"] = {"per_replica": mine_first.tolist(), "torchdiffeq_alone": theirs_first.tolist()}
    row("5 flows", f"accuracy of {alone_count} replicas: worst error per-replica in the batch / torchdiffeq alone",
        ratio, "x", "≤ 2x (unchanged)", ratio <= 2.0,
        note=f"{float(mine_first.max()):.3g} vs {float(theirs_first.max()):.3g} in units of atol + rtol|y_ref| "
             f"(medians {float(mine_first.median()):.2g} vs {float(theirs_first.median()):.2g})")
    tode = _torchode_flow(factors, times, velocity, rtol, atol)
    if tode is None:
        row("5 flows", "torchode (per-instance steps): not installed", "skipped", "")
    else:
        errors["torchode"] = _error_in_scales(tode["states"], reference, rtol, atol)
        out["torchode"] = {k: tode[k] for k in ("evaluations", "wall_s", "ok")}
        row("5 flows", f"B={B} wall time: torchode / per-replica steps", tode["wall_s"] / t_per, "x",
            note=f"{tode['wall_s']:.2f} s, {tode['evaluations']} evaluations (it steps past the output times and "
                 f"interpolates; ours lands on them)")
    for name, e in errors.items():
        q = torch.quantile(e, torch.tensor([0.5, 0.99], dtype=e.dtype)).tolist()
        out.setdefault("error_in_scales", {})[name] = {"median": q[0], "p99": q[1], "max": float(e.max())}
        row("5 flows", f"{name}: error vs reference (rtol·1e-3), in units of atol + rtol|y|, worst replica",
            float(e.max()), "", note=f"median {q[0]:.2g}, 99th percentile {q[1]:.2g}; a global error, so "
                                     f"a few tens of the per-step scale over ~600 steps")
    return out


# ------------------------------------------------------------------------------ section 6

class NoiseStepper:
    """B replicas of the seed 2x2 task, depth 3, one Langevin step (drift + a registered noise
    term) per call, outside the run loop: the cost of the noise models themselves. Starts at a
    balanced Gaussian point of product scale 1 (full rank: fibre_brownian needs it)."""

    def __init__(self, noise: str, B: int, kappa=None, lr: float = 0.001, beta: float = 1e3):
        from dlntorch.geometry import balanced_factors
        from dlntorch.noise import noise_term
        from dlntorch.tasks import Seed2x2
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(B, 2, 2, generator=gen, dtype=torch.float64)
        self.start = balanced_factors(W, [2, 2, 2, 2], generator=gen)
        self.task, self.term, self.lr, self.beta = Seed2x2(), noise_term(noise, kappa), lr, beta
        self.term.check_start(self.start)        # balanced: a whole step on d×d factors (and its start's checks)
        self.reset()

    def reset(self) -> None:
        self.factors = [f.clone() for f in self.start]
        self.generator = torch.Generator().manual_seed(1)
        self.state: dict = {}                    # balanced: its singular_hits count

    def run(self, n: int) -> None:
        from dlntorch.network import chain, factor_gradients
        from dlntorch.optim import langevin_update_
        with torch.no_grad():
            for _ in range(n):
                grads = factor_gradients(self.factors, self.task.gradient(chain(self.factors)))
                langevin_update_(self.factors, grads, self.lr, self.beta, 0.0, self.term, self.generator,
                                 state=self.state)


class RLEStepper(NoiseStepper):
    """optim=rle's step (dlntorch.rle.rle_step) on the product of the same start, N = 3 in time t:
    one SVD of W, the frame step in (r, U, V), the rebuilt W; the hits counted as the dynamics does."""

    def reset(self) -> None:
        from dlntorch.network import chain
        super().reset()
        self.W = chain(self.start)
        self.hits = torch.zeros(self.W.shape[0], dtype=torch.int64)

    def run(self, n: int) -> None:
        from dlntorch.rle import Clock, rle_step
        clock = Clock(3)
        with torch.no_grad():
            for _ in range(n):
                xi = torch.randn(self.W.shape, generator=self.generator, dtype=self.W.dtype)
                self.W, hit = rle_step(self.W, self.task.gradient(self.W), self.beta, self.lr, clock, xi, 1e-6)
                self.hits += hit


class ProjectionOnly(NoiseStepper):
    """The projection solve alone, per step: the minimum-norm generator of P_𝐖 x (τ^T τ in closed
    form, its Cholesky factorisation and the solve with one refinement, in the batch-last layout
    at this size: dlntorch.fibre.minimum_norm_generator), as the tangential step does it once and
    the fibre_brownian step twice."""

    def run(self, n: int) -> None:
        from dlntorch.fibre import flatten, minimum_norm_generator
        x = flatten(self.factors)
        for _ in range(n):
            minimum_norm_generator(self.factors, x)


class SvdOnly(NoiseStepper):
    """The batched SVD of τ (dlntorch.fibre.fibre_frame) alone: the fallback the solve avoids."""

    def run(self, n: int) -> None:
        from dlntorch.fibre import fibre_frame
        for _ in range(n):
            fibre_frame(self.factors)


def section_noise(repeats: int, chunk_s: float, quick: bool) -> dict:
    """Cost per replica-step of each noise model against isotropic at B = 4096 (seed 2x2, depth 3),
    and the fraction of a step spent in the projection solve (tangential: one; fibre_brownian: two).
    balanced: Brownian motion on M_0 plus the gradient from the same balanced start (a whole step in
    orbit coordinates); rle: the RLE downstairs on its product (2x2, N = 3)."""
    B = 4096
    models = {"isotropic": ("isotropic", None), "gl_walk": ("gl_walk", None),
              "tangential κ=0": ("tangential", 0.0), "tangential κ=0.5": ("tangential", 0.5),
              "fibre_brownian": ("fibre_brownian", None), "balanced": ("balanced", None)}
    runners = {name: NoiseStepper(noise, B, kappa) for name, (noise, kappa) in models.items()}
    runners["rle (downstairs)"] = RLEStepper("isotropic", B)
    models["rle (downstairs)"] = ("rle", None)
    runners["projection solve"] = ProjectionOnly("isotropic", B)
    runners["tangent-map SVD"] = SvdOnly("isotropic", B)
    result = race(runners, torch.device("cpu"), repeats, chunk_s)
    base = result["isotropic"]["min"]
    for name in models:
        ratio = result[name]["min"] / base
        row("6 noise", f"{name}: s per replica-step (B={B}, seed 2x2, depth 3)", result[name]["min"] / B, "s")
        if name != "isotropic":
            row("6 noise", f"{name} / isotropic, per step", ratio, "x", "≤ 10x", ratio <= 10)
    solve = result["projection solve"]["min"]
    row("6 noise", "projection solve share of a tangential κ=0 step",
        100 * solve / result["tangential κ=0"]["min"], "%")
    row("6 noise", "projection solve share of a fibre_brownian step (two solves)",
        100 * 2 * solve / result["fibre_brownian"]["min"], "%")
    row("6 noise", "SVD of τ (the fallback) / the Cholesky projection solve",
        result["tangent-map SVD"]["min"] / solve, "x")
    return {name: {k: v for k, v in r.items() if k != "all"} for name, r in result.items()}


# ------------------------------------------------------------------------------ section 9

# where logging goes, as the loop's timing hooks name it (dlntorch.hooks): snapshots (with the
# flushes they set off), their batched observables with the TensorBoard records (flush, which
# includes tb_scalars), the end (final row, histograms, hparams, checkpoint, trajectory.npz, summary)
LOGGING_PHASES = {"log": "snapshot", "flush": "flush", "scalars": "tb_scalars", "finish": "finish"}
TWO_POINTS = "run.log_points=2"      # the run with (almost) no logging: its first and last step


def timed_run(case: list[str], B: int, steps: int, *extra: str, out: str) -> tuple[float, Stopwatch, Lab]:
    """One run of exactly `steps` steps (no stop rule) through Lab.train: built, trained, reported;
    its wall seconds and its phases."""
    watch = Stopwatch()
    t0 = time.perf_counter()
    lab = Lab(config(*case, f"replicas={B}", f"run.steps={steps}", "run.stop_energy=0", *extra, out=out),
              hooks=watch)
    lab.train()
    return time.perf_counter() - t0, watch, lab


def logging_overhead(case: list[str], label: str, B: int, steps: int, repeats: int, limit: float) -> dict:
    """The run's wall time with the default log grid against run.log_points=2, interleaved."""
    walls: dict[str, list[float]] = {"default": [], "two": []}
    parts: dict[str, dict[str, float]] = {"default": {}, "two": {}}
    points = {}
    for i in range(repeats):
        for grid, extra in (("default", ()), ("two", (TWO_POINTS,))):
            wall, watch, lab = timed_run(case, B, steps, *extra, out=f"log-{label}-{B}-{grid}-{i}")
            walls[grid].append(wall)
            seen = {LOGGING_PHASES[k]: v for k, v in watch.seconds.items() if k in LOGGING_PHASES}
            parts[grid] = {k: min(v, parts[grid].get(k, math.inf)) for k, v in seen.items()}
            points[grid] = len(lab.state.trajectory)
    t_default, t_two = min(walls["default"]), min(walls["two"])
    overhead = t_default / t_two - 1
    n = points["default"]
    note = (f"{steps} steps, {n} vs {points['two']} logged points: {t_default:.2f} s vs {t_two:.2f} s; per point: "
            + ", ".join(f"{k} {1e3 * v / n:.2f} ms" for k, v in parts["default"].items() if k != "finish")
            + f"; end of run {parts['default'].get('finish', 0):.2f} s vs {parts['two'].get('finish', 0):.2f} s")
    target("9 logging", f"logging overhead, {label} B={B} (default grid vs {TWO_POINTS})", 100 * overhead, "%",
           at_most=100 * limit, note=note)
    return {"B": B, "steps": steps, "wall_s": walls, "overhead": overhead, "logged_points": points, "parts_s": parts}


def process_probe(B: int, steps: int) -> None:
    """Child process: the default seed run at B through Hydra's compose API and train.run, the way
    the CLI runs it, with hooks that mark (wall clock) when the run was composed, when its first
    step began and its last step ended, and when run() returned."""
    from dlntorch.cli import exit_without_teardown
    from dlntorch.hooks import Hooks
    from dlntorch.train import run
    imported = time.time()

    class Marks(Hooks):
        def __init__(self):
            self.first, self.last = None, None

        @contextlib.contextmanager
        def phase(self, name):
            if name == "advance" and self.first is None:
                self.first = time.time()
            yield
            if name == "advance":
                self.last = time.time()

    marks = Marks()
    cfg = config(*SEED, f"replicas={B}", f"run.steps={steps}", "run.stop_energy=0", out=f"probe-process-{B}")
    composed = time.time()
    run(cfg, hooks=marks)
    print(json.dumps({"imported": imported, "composed": composed, "first_step": marks.first,
                      "last_step": marks.last, "returned": time.time()}), flush=True)
    shutil.rmtree(TMP, ignore_errors=True)
    exit_without_teardown(0)     # as `python -m dlntorch` ends


def timed_process(argv: list[str]) -> tuple[float, float, str]:
    """Start `argv` as a child process (one torch thread), wait for it: (wall clock at start, at exit, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(ARGS.threads), "MKL_NUM_THREADS": str(ARGS.threads)}
    start = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    end = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]}… failed: {done.stderr[-2000:]}")
    return start, end, done.stdout


def whole_process(B: int, steps: int, repeats: int) -> dict:
    """`python -m dlntorch` at B over `steps` steps with default logging, start to exit, as a user
    runs it; and the same run in a probe child that marks its first and last step: what a run pays
    regardless of its length (interpreter, imports, composition, building; the end of the run)."""
    base = baseline_for(make_lab(*SEED, "replicas=1", out="process-base"))
    cli = [sys.executable, "-m", "dlntorch", *SEED, f"replicas={B}", f"run.steps={steps}", "run.stop_energy=0",
           "run.progress=false", "device=cpu", f"threads={ARGS.threads}", f"hydra.run.dir={TMP / 'cli'}"]
    probe = [sys.executable, __file__, "--threads", str(ARGS.threads), "--process-probe", str(B), str(steps)]
    walls, bases, marks = [], [], []
    for _ in range(repeats):         # each process paired with the plain loop timed just before it:
        # the machine's speed drifts between minutes, and the ratio is of the two
        bases.append(race({"baseline": base}, "cpu", 3, 0.12)["baseline"]["min"])
        start, end, _ = timed_process(cli)
        walls.append(end - start)
        start, end, text = timed_process(probe)
        m = json.loads(text.strip().splitlines()[-1])
        marks.append({"imports_s": m["imported"] - start, "compose_s": m["composed"] - m["imported"],
                      "start_to_first_step_s": m["first_step"] - start, "steps_s": m["last_step"] - m["first_step"],
                      "reports_s": m["returned"] - m["last_step"], "last_step_to_exit_s": end - m["last_step"],
                      "wall_s": end - start})
    ratios = sorted(B * steps / wall * t_base for wall, t_base in zip(walls, bases))
    ratio = float(np.median(ratios))
    wall, t_base = min(walls), float(np.median(bases))
    best = min(marks, key=lambda m: m["wall_s"])
    target("9 logging", f"whole process B={B}, {steps} steps, default logging: replica-steps/s / plain loop's",
           ratio, "x", at_least=2000,
           note=f"median of {len(ratios)} pairs (process, plain loop timed just before it): "
                f"{', '.join(f'{r:.0f}x' for r in ratios)}; python -m dlntorch start to exit {wall:.2f} s at best "
                f"({B * steps / wall:.3g} replica-steps/s); plain loop {1 / t_base:.0f} steps/s (median); "
                f"first to last step (logging included): {B * steps / best['steps_s'] * t_base:.0f}x")
    building = best["start_to_first_step_s"] - best["imports_s"] - best["compose_s"]
    row("9 logging", f"start → first step (B={B}, probe child)", best["start_to_first_step_s"], "s",
        note=f"interpreter + imports {best['imports_s']:.2f} s, Hydra composition {best['compose_s']:.2f} s, "
             f"run dir, network, dynamics, TensorBoard writer, first row {building:.2f} s")
    row("9 logging", f"last step → exit (B={B}, probe child)", best["last_step_to_exit_s"], "s",
        note=f"final row, checkpoint, trajectory.npz, summary.json, histograms, hparams {best['reports_s']:.2f} s; "
             f"interpreter exit {best['last_step_to_exit_s'] - best['reports_s']:.2f} s")
    return {"B": B, "steps": steps, "cli_wall_s": walls, "probe": marks,
            "baseline_steps_per_s": [1 / t for t in bases], "ratios": ratios, "ratio": ratio}


def section_logging(repeats: int, quick: bool) -> dict:
    """What logging costs, small and large, and what a run pays regardless of its length."""
    steps = 2000 if quick else 20_000
    print(f"\n[9] logging and fixed costs: default runs over {steps} steps, CPU", flush=True)
    out = {"overhead": {}}
    for B in (256, 4096):
        out["overhead"][B] = logging_overhead(SEED, "seed2x2", B, steps, repeats, 0.25)
    out["overhead"]["completion100"] = logging_overhead(COMPLETION, "completion100", 1, steps, repeats, 0.10)
    out["process"] = whole_process(4096, steps, 1 if quick else 3)
    return out


# ------------------------------------------------------------------------------ section 7

def section_compile(repeats: int, chunk_s: float, quick: bool) -> dict:
    """run.compile: the lab's loop at B = 4096 (seed 2x2, depth 3, GD: the planes layout), eager
    against compiled, interleaved; the compile's cost is the first compiled step's wall time."""
    print("\n[7] run.compile: compiled against eager GD step (CPU)", flush=True)
    B = 4096
    eager = make_lab(*SEED, f"replicas={B}", "run.compile=off", out="compile-eager")
    fast = make_lab(*SEED, f"replicas={B}", "run.compile=on", out="compile-on")
    started = time.perf_counter()
    fast.dynamics.advance(fast.cfg.run.stop_check_every)   # compiles (a warm inductor cache makes it seconds)
    first = time.perf_counter() - started
    if not fast.dynamics.compiles:
        return row("7 compile", f"compiled GD step at B={B} / eager", float("nan"), "x", "≥ 1.8x", False,
                   note="torch.compile failed here: the run fell back to eager (see the warning)")
    res = race({"eager": LabLoop(eager), "compiled": LabLoop(fast)}, "cpu", repeats, chunk_s)
    ratio = res["eager"]["min"] / res["compiled"]["min"]
    print(f"  compile time {fast.dynamics.compile_seconds:.1f} s (first chunk {first:.1f} s)", flush=True)
    row("7 compile", f"compile time, GD step at B={B} ({fast.dynamics.layout})", fast.dynamics.compile_seconds, "s",
        note="the first compiled step's wall time; a cold inductor cache costs several times a warm one")
    return row("7 compile", f"compiled GD step at B={B} ({fast.dynamics.layout}) / eager step", ratio, "x", "≥ 1.8x",
               ratio >= 1.8, note=f"eager {res['eager']['min'] * 1e6:.0f} µs, compiled "
                                  f"{res['compiled']['min'] * 1e6:.0f} µs per step (loop with stop checks)")


# ------------------------------------------------------------------------------ section 8

def run_probe(B: int, steps: int) -> None:
    """Child process: one whole default-task run (`python -m dlntorch replicas=B run.steps=steps`,
    default logging: TensorBoard, trajectory.npz, summary.json) and its peak RSS (getrusage)."""
    import resource

    from dlntorch.train import run
    started = time.perf_counter()
    # as the command line runs it: the summary's per-replica columns stay arrays (train.run)
    summary = run(config(f"replicas={B}", f"run.steps={steps}", out=f"stream-{B}-{steps}"), columns="arrays")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = len(np.load(TMP / f"stream-{B}-{steps}" / "trajectory.npz")["t"])
    print(json.dumps({"peak_kib": peak // 1024 if sys.platform == "darwin" else peak, "rows": rows,
                      "wall_s": time.perf_counter() - started, "steps": summary["steps"]}))


def run_probes_serially(specs: list[tuple[int, int]]) -> dict:
    """One child at a time (a whole run at large B takes both cores' memory bandwidth)."""
    out = {}
    for B, steps in specs:
        done = subprocess.run([sys.executable, __file__, "--threads", str(ARGS.threads), "--run-probe", str(B),
                               str(steps)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"run probe B={B} steps={steps} failed: {done.stderr[-2000:]}")
        out[(B, steps)] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def section_streaming(quick: bool) -> dict:
    """Peak RSS of whole default-task runs: at two large B over a short run (the per-replica slope
    and the largest B in --memory-budget-gb; --stream-million: the larger B is 1e6, minutes), and
    the small B over 174 logged rows against 6 (streamed rows: the peak no longer grows with them
    by rows × B × row bytes). The slope is taken from B = 1e5 up, where the recorder observes the
    same ~4e5 pending replicas at once or one row at a time (at B = 1e4 it batches K ≤ 6 rows of
    fewer replicas, and a slope from there mixes that batching in)."""
    print("\n[8] streaming trajectory: peak RSS of whole runs (CPU)", flush=True)
    budget = ARGS.memory_budget_gb * 2 ** 30
    small, mid, large = (2000, 5000, 20000) if quick else (10000, 100000, 10 ** 6 if ARGS.stream_million else 400000)
    short = 5                   # steps: 6 logged rows (at large B the peak does not depend on their count)
    probes = run_probes_serially([(small, short), (mid, short), (large, short), (small, 2000)])
    p1, p2, long = probes[(mid, short)], probes[(large, short)], probes[(small, 2000)]
    base = probes[(small, short)]
    per = (p2["peak_kib"] - p1["peak_kib"]) * 1024 / (large - mid)
    fixed = p1["peak_kib"] * 1024 - per * mid
    # --quick's sizes can be too close for the RSS to resolve a slope: then no largest B is claimed
    largest = int((budget - fixed) / per) if per > 0 else math.nan
    row("8 streaming", "peak RSS per replica, whole default run", per, "B",
        note=f"slope between B={mid} and B={large} ({p1['rows']} logged rows); fixed {fixed / 2 ** 20:.0f} MiB")
    row("8 streaming", f"peak RSS, {long['rows']} logged rows / {base['rows']} (B={small})",
        long["peak_kib"] / base["peak_kib"], "x",
        note=f"{long['peak_kib'] / 1024:.0f} MiB vs {base['peak_kib'] / 1024:.0f} MiB: rows are streamed; what "
             "grows is the recorder's batched observe (up to FLUSH_ELEMENTS snapshot entries at once)")
    row("8 streaming", f"largest B of a whole default run in {ARGS.memory_budget_gb:g} GiB", largest, "replicas",
        "≥ 5e6", largest >= 5e6 if per > 0 else None,
        note="from the slope; the logged rows' count does not enter" if per > 0 else
             f"no slope resolved between B={mid} and B={large} (use the full sizes)")
    out = {"per_replica_bytes": per, "fixed_bytes": fixed, "largest_B": largest,
           "probes": {f"B={B} steps={steps}": p for (B, steps), p in probes.items()}}
    row("8 streaming", f"peak RSS, whole default run at B={large:.0e}", p2["peak_kib"] / 2 ** 20, "GiB",
        note=f"{p2['rows']} logged rows, {p2['wall_s']:.0f} s")
    return out


# ------------------------------------------------------------------------------ main

def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}


def main() -> int:
    if ARGS.probe:
        case, B, steps = ARGS.probe
        probe(case, int(B), int(steps))
        return 0
    if ARGS.process_probe:
        process_probe(*map(int, ARGS.process_probe))
    if ARGS.run_probe:
        run_probe(*ARGS.run_probe)
        return 0
    quick = ARGS.quick
    repeats = ARGS.repeats or (3 if quick else 7)
    chunk_s = 0.03 if quick else 0.12
    sections = {s.strip() for s in ARGS.sections.split(",") if s.strip()}
    started = time.perf_counter()
    info = machine()
    print(f"dlntorch bench — {datetime.date.today().isoformat()} — {info['cpu']}, {info['cores']} cores, "
          f"{info['threads']} torch thread(s), torch {info['torch']}; repeats {repeats}, "
          f"{'quick' if quick else 'full'}", flush=True)
    details = {}
    if "1" in sections:
        details["seed2x2"] = section_seed(repeats, chunk_s, quick)
    if "2" in sections:
        details["completion100"] = section_completion(repeats, chunk_s, quick)
    if "3" in sections:
        details["memory"] = section_memory(quick)
    if "4" in sections:
        details["cuda"] = section_cuda(repeats, chunk_s, quick)
    if "5" in sections:
        details["flows"] = section_flows(quick)
    if "6" in sections:
        details["noise"] = section_noise(repeats, chunk_s, quick)
    if "7" in sections:
        details["compile"] = section_compile(repeats, chunk_s, quick)
    if "8" in sections:
        details["streaming"] = section_streaming(quick)
    if "9" in sections:
        details["logging"] = section_logging(1 if quick else 3, quick)
    wall = time.perf_counter() - started
    print()
    print_table(ROWS)
    for r in ROWS:
        if r["note"]:
            print(f"  · {r['name']}: {r['note']}")
    failed = [r["name"] for r in ROWS if r["pass"] is False]
    print(f"\n{sum(r['pass'] is True for r in ROWS)} pass, {len(failed)} fail; {wall:.0f} s")
    if ARGS.json:
        path = Path(ARGS.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(["python", *sys.argv]), "machine": info, "quick": quick,
                   "repeats": repeats, "wall_s": wall, "rows": ROWS, "details": details}
        path.write_text(json.dumps(payload, indent=2, default=_jsonable))
        print(f"wrote {path}")
    return 0


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
