"""CUDA-graph replay of the fast path: K eager steps captured once, replayed as one launch
(tiny matrices are launch-bound: ~20 launches per step otherwise). Any capture failure leaves
the eager path, which runs the same kernels."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch
from torch import Tensor


class CapturedSteps:
    """`steps` eager steps captured as one CUDA graph under `key` (the hyper-parameters baked in)."""

    def __init__(self, key: Hashable, graph: torch.cuda.CUDAGraph, steps: int):
        self.key, self.graph, self.steps = key, graph, steps

    @classmethod
    def capture(cls, key: Hashable, state: list[Tensor], run: Callable[[int], None],
                steps: int) -> CapturedSteps | None:
        """Capture `run(steps)`, which updates `state` in place; `state` is left as it was. None
        (with a warning) if the capture fails."""
        snapshot = [s.clone() for s in state]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):        # warm-up: allocator, library handles
                run(steps)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):          # records; runs nothing
                run(steps)
            return cls(key, graph, steps)
        except Exception as error:  # noqa: BLE001 — any capture failure: the eager path
            warnings.warn(f"CUDA graph capture failed ({error}); running eagerly", RuntimeWarning, stacklevel=2)
            return None
        finally:
            for s, saved in zip(state, snapshot):  # undo the warm-up
                s.copy_(saved)

    def replay(self, steps: int) -> int:
        """Replay as often as fits in `steps`; returns the steps done."""
        for _ in range(steps // self.steps):
            self.graph.replay()
        return steps - steps % self.steps
