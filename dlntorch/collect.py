"""One table per sweep: every run's summary.json in a pandas DataFrame.

    python -m dlntorch.collect outputs/multirun/2025-01-01/12-00-00              # sweep.csv + table
    python -m dlntorch.collect outputs/multirun/2025-01-01/12-00-00 --per-replica

    from dlntorch.collect import collect
    runs = collect("outputs/multirun/2025-01-01/12-00-00")                      # one row per run
    replicas = collect("outputs/multirun/...", per_replica=True)                # one row per replica

A run dir is a folder with summary.json, checkpoint.pt or Hydra's .hydra/ (nested sweeps and
single runs work too). Each row has the run's folder, its swept values — from .hydra/overrides.yaml,
or for runs started from Python the config keys that differ between the runs — its status and
why when it is not completed, the scalars of summary.json (steps, t, wall_time, diverged_count,
near_rank_one, …) and every aggregate as `observable.stat` (energy.median, effective_rank.q90, …).

Statuses: `completed`; `failed` (the job raised: summary.json holds the error, see dlntorch.cli);
`unfinished` (no summary yet: killed, timed out, out of memory in the kernel's eyes, or still
running — with the step of its last checkpoint when there is one; rerun the same command with
resume=true to continue it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from .config import CHECKPOINT, FINISHED, SUMMARY, leaves, total_steps

HYDRA_DIR = ".hydra"
SCALARS = ("stopped_by", "steps", "t", "wall_time", "replicas", "depth", "diverged_count",
           "converged", "near_rank_one", "gradient_evaluations")
# config keys that never distinguish runs (paths, display, bookkeeping)
VOLATILE = ("run.out_dir", "run.progress", "resume", "threads", "run.checkpoint_every",
            "run.checkpoint_minutes")
# what the printed table shows after the swept columns, when present
SHOWN = ("status", "energy.median", "effective_rank.median", "near_rank_one", "diverged_count",
         "steps", "wall_time")


# ------------------------------------------------------------------------ finding runs

def find_runs(root: str | Path) -> list[Path]:
    """Run dirs under `root` (or `root` itself), in natural order (2 before 10)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    found: list[Path] = []

    def visit(folder: Path) -> None:
        if is_run_dir(folder):
            found.append(folder)
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and not child.is_symlink():
                visit(child)

    visit(root)
    return sorted(found, key=lambda p: _natural(p.relative_to(root)))


def is_run_dir(folder: Path) -> bool:
    return any((folder / name).exists() for name in (SUMMARY, CHECKPOINT, HYDRA_DIR))


def _natural(path: Path) -> list[Any]:
    # a sweep's job dirs start with the job number (2_model.depth=3 before 10_model.depth=2)
    return [(0, int(number), rest) if number else (1, 0, part)
            for part in path.parts for number, rest in [re.match(r"(\d*)(.*)", part).groups()]]


# ------------------------------------------------------------------------ reading one run

def read_summary(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(summary, None), or (None, why it could not be read)."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as error:
        return None, f"summary.json is unreadable ({type(error).__name__}: {error})"


def read_overrides(run_dir: Path) -> dict[str, Any] | None:
    """The command-line overrides of a Hydra job as {key: typed value}, or None if not a Hydra job.
    Group choices read `optim: langevin`; `+key=v` and `++key=v` read `key: v`; deletions are left out."""
    path = run_dir / HYDRA_DIR / "overrides.yaml"
    if not path.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    lines = OmegaConf.to_container(OmegaConf.load(path)) or []
    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for line in lines:
        try:
            override = parser.parse_override(str(line))
        except Exception:               # not something Hydra parses: keep it as text
            key, _, value = str(line).lstrip("+~").partition("=")
            out[key] = value
            continue
        if override.is_delete():
            continue
        value = override.value()
        out[override.key_or_group] = value if isinstance(value, (bool, int, float, str)) or value is None \
            else str(value)
    return out


def checkpoint_info(run_dir: Path) -> dict[str, Any] | None:
    """step, t and config of checkpoint.pt, and how long ago it was written; None if none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    info: dict[str, Any] = {"age_s": time.time() - path.stat().st_mtime}
    try:
        import torch
        payload = torch.load(path, map_location="cpu", weights_only=False)
        info.update(step=payload.get("step"), t=payload.get("t"), config=payload.get("config"))
    except Exception as error:          # noqa: BLE001 — reported, not raised
        info["error"] = f"{type(error).__name__}: {error}"
    return info


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _planned_steps(config: dict[str, Any] | None) -> int | None:
    try:
        return total_steps(OmegaConf.create(config))
    except Exception:  # noqa: BLE001 — an old or partial config: no plan to show
        return None


def run_status(run_dir: Path) -> tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]:
    """(status, why, summary, config) of one run dir; config from summary.json or checkpoint.pt."""
    summary, unreadable = read_summary(run_dir)
    if summary is not None:
        status, config = summary.get("status", "completed"), summary.get("config")
        if status == "completed":
            return "completed", "", summary, config
        if status == "diverged":
            return "diverged", "every replica diverged (see the lr bound printed by the run)", summary, config
        if status == "failed":
            error = summary.get("error") or {}
            message = " ".join(str(error.get("message", "")).split())
            return "failed", f"{error.get('type', 'Error')}: {message}", summary, config
        return str(status), f"summary.json has status {status!r}", summary, config
    ckpt = checkpoint_info(run_dir)
    if ckpt is not None:
        if "error" in ckpt:
            why = f"no summary.json; checkpoint.pt is unreadable ({ckpt['error']})"
        else:
            planned = _planned_steps(ckpt.get("config"))
            of = f" of {planned}" if planned else ""
            why = (f"no summary.json; last checkpoint at step {ckpt['step']}{of} (t = {ckpt['t']:.4g}), written "
                   f"{_ago(ckpt['age_s'])}: killed, timed out or still running; rerun with resume=true to continue")
        return "unfinished", (unreadable + "; " if unreadable else "") + why, None, ckpt.get("config")
    why = unreadable or ("no summary.json and no checkpoint.pt: killed before its first checkpoint, "
                         "or still running (see its log, and .submitit/ for SLURM jobs)")
    return "unfinished", why, None, None


# ------------------------------------------------------------------------ the table

def _leaves(node: Any) -> dict[str, Any]:
    """Config leaves as table cells (lists and other values as text)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in leaves(node).items()}


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between runs (the implicit sweep of Python-driven runs)."""
    flat = [_leaves(c) for c in configs if c]
    keys: list[str] = []
    for cfg in flat:
        keys += [k for k in cfg if k not in keys]
    return [k for k in keys if not k.startswith(VOLATILE)
            and len({json.dumps(c.get(k), sort_keys=True) for c in flat}) > 1]


def collect(sweep_dir: str | Path, per_replica: bool = False, write: bool = True) -> pd.DataFrame:
    """Every run under `sweep_dir` as a DataFrame: one row per run (default) or per replica.

    Columns: `run` (folder relative to sweep_dir), the swept values, `status` (completed | diverged |
    failed | unfinished), `why` (empty when completed), the scalars of summary.json and each aggregate as
    `observable.stat`; per replica: `replica` and each final per-replica observable (singular
    values as singular_value_1, …). Failed and unfinished runs keep their row (NaN metrics).
    `write`: also save sweep.csv (sweep_replicas.csv per replica) in sweep_dir, and .parquet
    beside it when pyarrow is installed. The list of swept columns is in `df.attrs["swept"]`.
    """
    root = Path(sweep_dir)
    runs = find_runs(root)
    records: list[dict[str, Any]] = []
    for run_dir in runs:
        status, why, summary, config = run_status(run_dir)
        overrides = read_overrides(run_dir)
        records.append({"dir": run_dir, "status": status, "why": why, "summary": summary,
                        "overrides": overrides, "config": config})

    swept: list[str] = []
    for rec in records:
        for key in rec["overrides"] or {}:
            if key not in swept:
                swept.append(key)
    if any(rec["overrides"] is None for rec in records):
        plain = [rec for rec in records if rec["overrides"] is None]
        swept += [k for k in _differing([rec["config"] for rec in plain]) if k not in swept]

    rows: list[dict[str, Any]] = []
    for rec in records:
        config = _leaves(rec["config"])
        base: dict[str, Any] = {"run": rec["dir"].relative_to(root).as_posix() or "."}
        for key in swept:
            if rec["overrides"] is not None and key in rec["overrides"]:
                base[key] = rec["overrides"][key]
            else:
                base[key] = config.get(key)
        base.update(status=rec["status"], why=rec["why"])
        summary = rec["summary"] if rec["status"] in FINISHED else None
        if not per_replica:
            row = dict(base)
            for key in SCALARS:
                if key not in row:      # a swept top-level key (replicas) keeps its value
                    row[key] = (summary or {}).get(key)
            for name, stats in ((summary or {}).get("aggregates") or {}).items():
                for stat, value in stats.items():
                    row[f"{name}.{stat}"] = value
            rows.append(row)
            continue
        if summary is None:
            rows.append(dict(base, replica=None))
            continue
        final = summary.get("final") or {}
        for i in range(int(summary.get("replicas") or len(final.get("energy", [])))):
            row = dict(base, replica=i)
            for name, values in final.items():
                value = values[i] if i < len(values) else None
                if isinstance(value, list):
                    for j, v in enumerate(value, 1):
                        row[f"{name.removesuffix('s')}_{j}"] = v
                else:
                    row[name] = value
            rows.append(row)

    df = pd.DataFrame(rows)
    for column in ("steps", "replicas", "depth", "diverged_count", "converged", "near_rank_one",
                   "gradient_evaluations", "replica"):
        if column in df and df[column].map(lambda v: v is None or pd.isna(v) or float(v).is_integer()).all():
            df[column] = df[column].astype("Int64")    # integers stay integers beside failed runs' blanks
    if df.empty:
        df = pd.DataFrame(columns=["run", "status", "why"])
    df.attrs["swept"] = swept
    if write:
        stem = "sweep_replicas" if per_replica else "sweep"
        df.to_csv(root / f"{stem}.csv", index=False)
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            pass
        else:
            df.to_parquet(root / f"{stem}.parquet", index=False)
    return df


# ------------------------------------------------------------------------ printing

def table(df: pd.DataFrame, swept: Iterable[str] | None = None, max_rows: int = 60) -> str:
    """A compact text table: the swept values that vary (all swept if none do) and the headline
    metrics, one line per run."""
    swept = list(df.attrs.get("swept", []) if swept is None else swept)
    varying = [k for k in swept if k in df and df[k].astype(str).nunique(dropna=False) > 1]
    columns = ["run"] + (varying or swept) + [c for c in SHOWN if c in df]
    shown = df[columns].astype(object)
    for column in shown:
        floats = column in ("energy.median", "effective_rank.median", "wall_time", "t")
        shown[column] = shown[column].map(lambda v, floats=floats: "" if v is None or (not isinstance(v, str)
                                                                                       and pd.isna(v))
                                          else f"{v:.3g}" if floats else v)
    return shown.to_string(index=False, max_rows=max_rows)


def problems(df: pd.DataFrame) -> list[str]:
    """One line per run that failed or is unfinished, with why."""
    if "status" not in df:
        return []
    bad = df[df["status"] != "completed"].drop_duplicates("run")
    return [f"{r.run}: {r.status}: {r.why}" for r in bad.itertuples()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlntorch.collect",
        description="Read every run of a sweep into one table: writes sweep.csv in the sweep dir, "
                    "prints a compact table and lists the runs that failed or are unfinished.")
    parser.add_argument("sweep_dir", help="a multirun dir (hydra.sweep.dir), or any folder of runs")
    parser.add_argument("--per-replica", action="store_true",
                        help="one row per replica (writes sweep_replicas.csv) besides the run table")
    parser.add_argument("--no-write", action="store_true", help="print only; write no csv/parquet")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a run failed or is unfinished (for scripts)")
    args = parser.parse_args(argv)

    try:
        df = collect(args.sweep_dir, write=not args.no_write)
    except FileNotFoundError as error:
        print(f"dlntorch.collect: error: {error}", file=sys.stderr)
        return 2
    if "run" not in df or df.empty:
        print(f"dlntorch.collect: no runs under {args.sweep_dir} (a run dir has summary.json, "
              "checkpoint.pt or .hydra/)", file=sys.stderr)
        return 1
    if args.per_replica:
        collect(args.sweep_dir, per_replica=True, write=not args.no_write)
    counts = df["status"].value_counts()
    print(table(df))
    print()
    print(f"{len(df)} runs: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    bad = problems(df)
    if bad:
        print("not completed:")
        for line in bad:
            print(f"  {line}")
    if not args.no_write:
        written = "sweep.csv" + (" and sweep_replicas.csv" if args.per_replica else "")
        print(f"wrote {written} in {args.sweep_dir}")
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:     # `... | head`: the reader has gone; nothing left to say
        sys.stderr.close()
        sys.exit(0)
