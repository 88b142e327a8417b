"""The layouts of the fast path and their buffers.

batch:  the parameters themselves, (B, d_out, d_in); mm = bmm into a buffer.
planes: a copy with the replica axis last and contiguous, (d_out, d_in, B); C = A B as
        C = Σ_k A[:, k] ⊗ B[k, :], elementwise over B (d ops, each vectorised over d²B) —
        faster than B tiny matmuls for small widths and many replicas (dlntorch.tiny).
The update kernels (dlntorch.optim) and the chain rule (network.factor_gradients) run on
either: they are given the layout's `mm` and `T`, and its `view` of tensors drawn in the
parameters' shape. `mm(a, b)` without `out` is the same product out of place (run.compile).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tiny import planes_mm, planes_T


class Workspace:
    """The buffers of the closed-form step, allocated once per shape, and the layout's matmul,
    transpose and views (`to_task`: the product as the task sees it, (B, m, n); `view`: a
    tensor drawn in the parameters' shape, on this layout)."""

    def __init__(self, factors: list[Tensor], layout: str):
        f0 = factors[0]
        self.key = _key(factors)
        B, shapes = f0.shape[0], [tuple(f.shape[1:]) for f in factors]
        d0 = shapes[0][1]
        like = dict(dtype=f0.dtype, device=f0.device)
        if layout == "batch":
            new = lambda r, c: torch.empty(B, r, c, **like)  # noqa: E731
            self.mm, self.T, self.planes = _bmm, _batch_T, None
            self.to_task, self.from_task, self.view = _same, _same, _same
            self.entries = None
        else:
            new = lambda r, c: torch.empty(r, c, B, **like)  # noqa: E731
            self.mm, self.T = planes_mm, planes_T
            self.to_task, self.from_task, self.view = _replica_first, _replica_last, _replica_last
            # the planes are views of one (Σ_p d_p d_{p−1}, B) buffer, `entries`: the whole
            # state as one tensor of rows, one row per scalar entry (the compiled multi-step
            # program, dynamics/compiled.py, reads and writes it in one piece)
            sizes = [r * c for r, c in shapes]
            self.entries = torch.empty(sum(sizes), B, **like)
            self.planes = [rows.view(r, c, B) for rows, (r, c) in zip(self.entries.split(sizes), shapes)]
        # prefix[p] = W_{p+1} ⋯ W_1 (index 0 unused: it is W_1 itself), back[p] = (W_N ⋯ W_{p+2})^T ∇E
        self.prefix = [None] + [new(s[0], d0) for s in shapes[1:]]
        self.back = [new(s[1], d0) for s in shapes[1:]]
        self.grads = [None] + [new(*s) for s in shapes[1:]]
        self.shapes, self.like, self._noise = [(B, *s) for s in shapes], like, None
        self.versions: list[tuple[int, int]] = []

    @property
    def noise(self) -> list[Tensor]:
        """Langevin's noise buffers, (B, d_out, d_in) as the optimizer draws them (allocated on first use)."""
        if self._noise is None:
            self._noise = [torch.empty(s, **self.like) for s in self.shapes]
        return self._noise

    def stale(self, factors: list[Tensor]) -> bool:
        return self.key != _key(factors)


def _key(factors: list[Tensor]) -> list[tuple]:
    # the storage too: a captured CUDA graph (batch layout) holds the parameters' addresses
    return [(f.shape, f.dtype, f.device, f.data_ptr()) for f in factors]


def _bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.bmm(a, b, out=out)


def _batch_T(x: Tensor) -> Tensor:
    return x.mT


def _same(x: Tensor) -> Tensor:
    return x


def _replica_first(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1)


def _replica_last(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0)
