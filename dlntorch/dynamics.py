"""Dynamics: what moves the state between two pauses of the run loop.

`StepDynamics` wraps an Optimizer (gd, sgd, momentum, adam, langevin): t = lr × step.
The exact flows (optim=flow | downstairs) live in flows.py and plug in through the same
interface, so the loop, the logging and the stop rules are one code path for all dynamics.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .network import DeepLinearNetwork, chain
from .optim import build_optimizer
from .tasks import Task


class Dynamics:
    """The interface the run loop drives."""

    step_based = True            # pauses for stop checks between logged steps
    gradient_evaluations = 0

    def __init__(self, lr: float):
        self.lr = lr

    def advance(self, steps: int) -> None:
        raise NotImplementedError

    def time(self, step: int) -> float:
        return self.lr * step

    def factors(self) -> list[Tensor]:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.factors())

    def energy(self) -> Tensor:
        raise NotImplementedError

    def observables(self) -> dict[str, Tensor]:
        """Observables particular to these dynamics (merged into metrics.observe's)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Counts particular to these dynamics, for the summary (besides gradient_evaluations)."""
        return {}

    def plan(self, pauses) -> None:
        """The steps at which the loop will pause (a flow integrates ahead through them)."""

    def freeze(self, diverged: Tensor) -> None:
        """Stop moving the replicas flagged in `diverged` (B,)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class StepDynamics(Dynamics):
    """One optimizer step per step; gradients in closed form (3(N−1) batched matmuls from ∇E) or
    by autograd (`run.gradient`). A diverged replica holds non-finite values, which every update
    rule here keeps non-finite and which never mix across replicas (all ops are per replica),
    so freezing it costs nothing per step: it is only excluded from aggregates and stop tests.

    The hot path (closed form, no autograd, no allocation per step in the product and the factor
    gradients — only what `task.gradient` allocates):

    - prefix products W_p ⋯ W_1 are computed once per step, into preallocated buffers, and serve
      both the product W (for ∇E) and the factor gradients;
    - `gd`, `sgd` and `langevin` update in place without torch.optim: p ← p − lr·g by
      `torch._foreach_add_` — exactly the call torch.optim.SGD makes (foreach on CUDA; on the CPU
      its per-tensor `add_` loop, the same kernel), so the update is bit-identical given the same
      gradient; weight decay, Langevin's decay and its noise draws follow the same order and ops
      as the optimizers. `momentum` and `adam` hand the closed-form gradients to torch.optim.
      The optimizer object is kept either way: its state_dict is the checkpoint's. The fused
      updates leave `p.grad` unset (nothing reads it; the gradients live in the workspace).
    - layout `planes` (chosen for small widths and many replicas, fused updates only): the
      dynamics keeps its own copy of the factors with the replica axis last, (d_p, d_{p−1}, B),
      and multiplies by d accumulated outer products (elementwise ops vectorised over B) instead
      of B tiny matmuls; the parameters are written back at the end of every `advance`, so the
      factors, energy, checkpoint and observables see the same state. Layout `batch` works on
      the parameters (B, d_p, d_{p−1}) directly with `bmm`. The choice is a fixed function of
      the shapes (never timed), so a run and its resumption take the same path.
    - `run.cuda_graphs` (off by default):
      on CUDA, plain `gd` replays `graph_steps` steps captured once as a CUDA graph (one launch
      instead of ~20 per step: tiny matrices are launch-bound); any other case, and the remainder
      of a chunk, runs eagerly — the same kernels, so the eager path is the fallback.
    """

    PLANES_MAX_WIDTH = 6        # planes: every width ≤ this …
    PLANES_MIN_REPLICAS = 512   # … and at least this many replicas (crossovers measured on a CPU)
    FUSED = ("gd", "sgd", "langevin")

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task, seed: int,
                 layout: str | None = None, cuda_graphs: bool | None = None, graph_steps: int = 16):
        super().__init__(cfg.optim.lr)
        self.net, self.task = net, task
        self.params = list(net.factors)
        self.generator = torch.Generator(device=net.factors[0].device).manual_seed(seed)
        self.optimizer = build_optimizer(cfg.optim, self.params, self.generator)
        self.closed_form = cfg.run.gradient != "autograd"
        self.name = cfg.optim.name
        self.batch_size = cfg.optim.batch_size if self.name == "sgd" else None
        # fibre noise is a matrix exponential per hidden layer: the optimizer's own step
        self.fused = self.closed_form and self.name in self.FUSED and cfg.optim.noise == "isotropic"
        if layout is None:
            small = max(net.widths) <= self.PLANES_MAX_WIDTH and net.replicas >= self.PLANES_MIN_REPLICAS
            layout = "planes" if self.fused and small else "batch"
        if layout not in ("batch", "planes") or (layout == "planes" and not self.fused):
            raise ValueError(f"layout={layout!r} is not allowed here: 'batch', or 'planes' with optim gd|sgd|langevin "
                             "and closed-form gradients.")
        self.layout = layout
        self.cuda_graphs = cfg.run.cuda_graphs if cuda_graphs is None else cuda_graphs
        self.graph_steps = graph_steps
        self._work: _Workspace | None = None
        self._graph: Any = None

    # -- the loop's interface ---------------------------------------------------------
    def advance(self, steps: int) -> None:
        if steps <= 0:
            return
        if not self.closed_form:
            for _ in range(steps):
                self.step()
            return
        with torch.no_grad():
            state = self._state_in()
            if not self.fused:
                for _ in range(steps):
                    for param, grad in zip(self.params, self._gradients(state, self._weights())):
                        param.grad = grad
                    self.optimizer.step()
            else:
                done = self._replay(state, steps) if self._graphs_apply() else 0
                self._fused_steps(state, steps - done)
            self.gradient_evaluations += steps
            self._state_out(state)

    def step(self) -> None:
        """One step (the reference path; `advance` is the fast one)."""
        if self.closed_form:
            self.advance(1)
            return
        weights = self._weights()
        self.optimizer.zero_grad(set_to_none=True)
        # the sum hands each replica exactly its own gradient: replicas do not interact
        self.task.energy(self.net.product(), weights).sum().backward()
        self.optimizer.step()
        self.gradient_evaluations += 1

    def factors(self) -> list[Tensor]:
        return [p.detach() for p in self.params]

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(chain(self.factors()))

    def state_dict(self) -> dict[str, Any]:
        return {"factors": [p.detach().cpu() for p in self.params],
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "gradient_evaluations": self.gradient_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.set_factors([f.to(self.params[0].device) for f in state["factors"]])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.gradient_evaluations = state["gradient_evaluations"]

    # -- the state the hot loop works on ------------------------------------------------
    def _state_in(self) -> list[Tensor]:
        """The factors in the working layout: the parameters themselves (batch), or the planes,
        refreshed from the parameters when anything changed them since the last write-back."""
        factors = [p.detach() for p in self.params]
        if self._work is None or self._work.stale(factors):
            self._work = _Workspace(factors, self.layout)
            self._graph = None
        work = self._work
        if self.layout == "batch":
            return factors
        if work.versions != [(f.data_ptr(), f._version) for f in factors]:
            for plane, f in zip(work.planes, factors):
                plane.copy_(f.permute(1, 2, 0))
        return work.planes

    def _state_out(self, state: list[Tensor]) -> None:
        factors = [p.detach() for p in self.params]
        if self.layout == "planes":
            for f, plane in zip(factors, state):
                f.permute(1, 2, 0).copy_(plane)
        self._work.versions = [(f.data_ptr(), f._version) for f in factors]

    def _weights(self) -> Tensor | None:
        return None if self.batch_size is None else \
            self.task.minibatch(self.net.replicas, self.batch_size, self.generator)

    # -- closed-form gradients ------------------------------------------------------------
    def _gradients(self, state: list[Tensor], weights: Tensor | None) -> list[Tensor]:
        """∂L/∂W_p for all p: prefix products W_p ⋯ W_1 (the last is W), ∇E(W) from the task,
        then from the output side down back_{p−1} = W_p^T back_p and grad_p = back_p prefix_{p−1}^T."""
        work = self._work
        mm, T = work.mm, work.T
        prefix = [state[0]]
        for p in range(1, len(state)):
            prefix.append(mm(state[p], prefix[-1], work.prefix[p]))
        if work.planes is None:
            back = self.task.gradient(prefix[-1], weights)
        else:   # the task sees (B, m, n) views; its output goes back to replica-last
            back = self.task.gradient(prefix[-1].permute(2, 0, 1), weights).permute(1, 2, 0)
        grads = work.grads
        for p in range(len(state) - 1, 0, -1):
            mm(back, T(prefix[p - 1]), grads[p])
            back = mm(T(state[p]), back, work.back[p - 1])
        grads[0] = back
        return grads

    def _fused_steps(self, state: list[Tensor], steps: int) -> None:
        group = self.optimizer.param_groups[0]
        lr, decay = group["lr"], group["weight_decay"]
        langevin = self.name == "langevin"
        if langevin:
            noise_scale = math.sqrt(2 * lr / group["beta"])
            noise = self._work.noise
        for _ in range(steps):
            grads = self._gradients(state, self._weights())
            if langevin:                 # optim.Langevin.step, parameter by parameter
                for p, g, xi in zip(state, grads, noise):
                    if decay:
                        p.mul_(1 - lr * decay)
                    p.add_(g, alpha=-lr)
                    torch.randn(xi.shape, generator=self.generator, out=xi)
                    p.add_(xi if self.layout == "batch" else xi.permute(1, 2, 0), alpha=noise_scale)
                continue
            if decay:                    # torch.optim.SGD: g + λp, then p − lr·g
                grads = torch._foreach_add(grads, state, alpha=decay)
            torch._foreach_add_(state, grads, alpha=-lr)

    # -- CUDA graphs --------------------------------------------------------------------
    def _graphs_apply(self) -> bool:
        return self.cuda_graphs and self.name == "gd" and self.params[0].device.type == "cuda"

    def _replay(self, state: list[Tensor], steps: int) -> int:
        """Replay the captured `graph_steps` steps as often as they fit; returns the steps done.
        If the capture fails, the graphs are switched off and everything runs eagerly."""
        K = self.graph_steps
        if steps < K:
            return 0
        group = self.optimizer.param_groups[0]
        key = (group["lr"], group["weight_decay"], K)
        if self._graph is None or self._graph[0] != key:
            self._graph = None
            snapshot = [s.clone() for s in state]
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):        # warm-up: allocator, library handles
                    self._fused_steps(state, K)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):          # records; runs nothing
                    self._fused_steps(state, K)
                self._graph = (key, graph)
            except Exception as error:  # noqa: BLE001 — any capture failure: the eager path
                import warnings
                warnings.warn(f"CUDA graph capture failed ({error}); running eagerly", RuntimeWarning)
                self.cuda_graphs = False
            finally:
                for s, saved in zip(state, snapshot):  # undo the warm-up
                    s.copy_(saved)
            if self._graph is None:
                return 0
        graph = self._graph[1]
        for _ in range(steps // K):
            graph.replay()
        return steps - steps % K


class _Workspace:
    """The buffers of the closed-form step, allocated once per shape, and the layout's matmul.

    batch:  tensors (B, d_out, d_in); mm = bmm into the buffer.
    planes: tensors (d_out, d_in, B), replica axis last and contiguous; C = A B as
            C = Σ_k A[:, k] ⊗ B[k, :], elementwise over B (d ops, each vectorised over d²B)."""

    def __init__(self, factors: list[Tensor], layout: str):
        f0 = factors[0]
        self.key = _key(factors)
        B, shapes = f0.shape[0], [tuple(f.shape[1:]) for f in factors]
        d0 = shapes[0][1]
        like = dict(dtype=f0.dtype, device=f0.device)
        if layout == "batch":
            new = lambda r, c: torch.empty(B, r, c, **like)  # noqa: E731
            self.mm, self.T, self.planes = _bmm, _batch_T, None
        else:
            new = lambda r, c: torch.empty(r, c, B, **like)  # noqa: E731
            self.mm, self.T = _planes_mm, _planes_T
            self.planes = [new(*s) for s in shapes]
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


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    return torch.bmm(a, b, out=out)


def _batch_T(x: Tensor) -> Tensor:
    return x.mT


def _planes_mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    torch.mul(a[:, 0:1], b[0:1], out=out)
    for k in range(1, a.shape[1]):
        out.addcmul_(a[:, k:k + 1], b[k:k + 1])
    return out


def _planes_T(x: Tensor) -> Tensor:
    return x.transpose(0, 1)


def build_dynamics(cfg: Any, net: DeepLinearNetwork, task: Task, seed: int) -> Dynamics:
    if cfg.optim.name in ("flow", "downstairs"):
        from .flows import build_flow_dynamics   # torchdiffeq is imported only when used
        return build_flow_dynamics(cfg, net, task)
    return StepDynamics(cfg, net, task, seed)
