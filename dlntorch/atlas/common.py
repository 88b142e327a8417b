"""What every atlas instrument shares: the command line, the record of a run (settings.json),
the table (table.csv), the figure (figure.png), and the statistics the sentences quote.

An instrument is a module of this package with a function `measure(book: Notebook) -> None`
that trains through the lab's public API (`book.train(cfg)`, which records every config), then
calls `book.table`, `book.figure` and `book.say`. `python -m dlntorch.atlas <instrument>` makes
the Notebook, runs it and writes the three files into --out (default outputs/atlas/<instrument>/).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..logger import Z95

# --------------------------------------------------------------------------- statistics

# Z95, the standard normal's 97.5 % quantile, is dlntorch.logger's (the runs' 95 % bands use it too)
# Student's t 97.5 % quantiles for 1..30 degrees of freedom (a 95 % two-sided interval); beyond
# 30 the normal quantile is within 4 % of them.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    """Student's t quantile for a 95 % two-sided interval with `dof` degrees of freedom."""
    if dof < 1:
        return math.inf
    return _T975[dof - 1] if dof <= len(_T975) else Z95


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (95 % by default): unlike p ± z·se it
    stays inside [0, 1] and does not collapse at 0 or n successes. (nan, nan) for 0 trials."""
    if trials <= 0:
        return (math.nan, math.nan)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (max(0.0, centre - half), min(1.0, centre + half))


def standard_error(values: Iterable[float]) -> float:
    """The standard error of the mean of the finite values (nan below two of them)."""
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else math.nan


def fit_slope(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares line y = slope·x + intercept over the finite pairs, with the slope's
    standard error and 95 % interval (Student's t with n − 2 degrees of freedom)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = x.size
    if n < 2 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "se": math.nan, "low": math.nan, "high": math.nan, "n": n}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    se = math.sqrt((residual @ residual) / (n - 2) / ((x - x.mean()) @ (x - x.mean()))) if n > 2 else math.nan
    half = t975(n - 2) * se
    return {"slope": float(slope), "intercept": float(intercept), "se": se,
            "low": float(slope - half), "high": float(slope + half), "n": n}


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """The power law y ∝ x^slope as a line in log10–log10 (positive finite pairs only)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    return fit_slope(np.log10(x[keep]), np.log10(y[keep]))


def interval(fit: dict[str, float], digits: int = 2) -> str:
    """'slope [low, high]' of a fit, for the sentences."""
    return f"{fit['slope']:.{digits}f} [{fit['low']:.{digits}f}, {fit['high']:.{digits}f}]"


# --------------------------------------------------------------------------- the record


def versions() -> dict[str, str]:
    import torch

    from .. import __version__
    return {"dlntorch": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _plain(value: Any) -> Any:
    """JSON-able: numpy scalars and arrays as Python numbers and lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Notebook:
    """One instrument's run: where it writes, whether it is quick, and everything it records."""

    def __init__(self, instrument: str, out: Path, quick: bool, command: Sequence[str] | None = None):
        self.instrument, self.out, self.quick = instrument, Path(out), bool(quick)
        self.command = list(command) if command is not None else [sys.executable, "-m", "dlntorch.atlas", instrument]
        self.configs: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}
        self.findings: dict[str, Any] = {}
        self.sentences: list[str] = []
        self.started = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)

    # -- training through the lab's API -------------------------------------------------
    def train(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """dlntorch.train.run(cfg) into out/runs/<k>, quietly and on one thread; the config is
        recorded (as given) in settings.json."""
        from ..train import run
        cfg = copy.deepcopy(cfg)
        k = len(self.configs)
        cfg.setdefault("run", {})
        cfg["run"].setdefault("out_dir", str(self.out / "runs" / f"{k:04d}"))
        cfg["run"].setdefault("progress", False)
        cfg.setdefault("threads", 1)
        cfg.setdefault("device", "cpu")
        self.configs.append(cfg)
        return run(cfg)

    def note(self, **settings: Any) -> None:
        """Settings that are not run configs (grids, thresholds, seeds of in-process draws)."""
        self.settings.update(settings)

    def say(self, sentence: str, **findings: Any) -> None:
        """A measured sentence for the docs (printed, and kept in settings.json) and its numbers."""
        self.sentences.append(sentence)
        self.findings.update(findings)
        print(sentence)

    # -- the three files ----------------------------------------------------------------
    def table(self, rows: list[dict[str, Any]], name: str = "table.csv") -> Path:
        """rows (dicts with the same keys, in order) as a CSV; lists are written space-separated."""
        path = self.out / name
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                                 for k, v in row.items()})
        return path

    def figure(self, fig, name: str = "figure.png") -> Path:
        """Save a matplotlib figure at slide resolution and close it."""
        import matplotlib.pyplot as plt
        path = self.out / name
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def finish(self) -> Path:
        """settings.json: the command, date, versions, quick flag, runtime, every config, the
        instrument's own settings, its findings and sentences."""
        record = {"instrument": self.instrument, "command": " ".join(self.command), "quick": self.quick,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "versions": versions(), "runtime_seconds": round(time.monotonic() - self.started, 2),
                  "settings": self.settings, "configs": self.configs,
                  "findings": self.findings, "sentences": self.sentences}
        path = self.out / "settings.json"
        path.write_text(json.dumps(_plain(record), indent=2, ensure_ascii=False) + "\n")
        return path


def slide_axes(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.5):
    """A headless figure whose text reads at slide size (14 pt labels, 12 pt ticks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 13, "axes.labelsize": 14, "axes.titlesize": 14,
                         "xtick.labelsize": 12, "ytick.labelsize": 12, "legend.fontsize": 11})
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


# --------------------------------------------------------------------------- the command line


def parser(instruments: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlntorch.atlas",
                                description="One instrument per open problem: table.csv, settings.json, figure.png.")
    p.add_argument("instrument", choices=list(instruments))
    p.add_argument("--quick", action="store_true", help="a seconds-long version (for the tests)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/atlas/<instrument>/)")
    return p


def run_instrument(name: str, measure: Callable[[Notebook], None], out: Path | None = None,
                   quick: bool = False, command: Sequence[str] | None = None) -> Notebook:
    """Measure with a fresh Notebook, then write settings.json; returns the notebook."""
    import torch
    torch.set_num_threads(1)       # the lab's runs are tiny matrices; threads only fight
    book = Notebook(name, out if out is not None else Path("outputs") / "atlas" / name, quick, command)
    measure(book)
    book.finish()
    return book
