"""The run loop's timing hooks: how an instrument (scripts/bench.py) learns where a run spends
its time without patching the loop."""
from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager

_NOTHING = contextlib.nullcontext()


class Hooks:
    """`phase(name)` wraps each stretch of a run:

    - "advance": a chunk of steps and the stop test after it (the loop's one host sync);
    - "log": a logged time's snapshot, with any flush it sets off;
    - "flush": the pending snapshots observed as one batch, their rows to trajectory and TensorBoard;
    - "scalars": those rows' TensorBoard records (inside "flush");
    - "finish": the final checkpoint and the reports.

    These hooks do nothing; subclass them to watch the loop (Stopwatch times it)."""

    def phase(self, name: str) -> AbstractContextManager:
        return _NOTHING


class Stopwatch(Hooks):
    """Hooks that add up the wall seconds of each phase in `seconds` and count them in `calls`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
