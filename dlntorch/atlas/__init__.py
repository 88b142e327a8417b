"""The atlas: one instrument per open problem, each writing table.csv, settings.json and
figure.png (see common.py).

    python -m dlntorch.atlas p8_conservation --quick --out /tmp/p8

    from dlntorch.atlas import measure
    book = measure("p8_conservation", out="/tmp/p8", quick=True)
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from .common import Notebook, run_instrument

INSTRUMENTS = ("p1_low_rank", "p2_full_rank", "p3_free_energy", "p4_infinite_depth", "p5_low_rank_noise",
               "p6_singular_varieties", "p7_balance", "p8_conservation", "p9_rank_jumps",
               "practical_vs_flow", "edge_of_stability",   # flow versus practice
               "saxe2014", "razin2020", "shin_yun2025", "kleinman2024", "arora2019")   # reproductions


def measure(instrument: str, out: str | Path | None = None, quick: bool = False,
            command: Sequence[str] | None = None) -> Notebook:
    """Run one instrument in this process and write its three files into `out`."""
    if instrument not in INSTRUMENTS:
        raise ValueError(f"instrument={instrument!r} is not allowed: choose one of {', '.join(INSTRUMENTS)}.")
    module = importlib.import_module(f".{instrument}", __name__)
    return run_instrument(instrument, module.measure, None if out is None else Path(out), quick, command)
