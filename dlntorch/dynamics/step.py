"""Step-based dynamics: one update rule (a registered optimiser, dlntorch.optim) per step,
t = lr × step (t = Σ_k lr_k under a learning-rate schedule), with closed-form gradients on the
fast path; minibatches (with or without replacement) and label noise are drawn here, per step."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import compat
from ..budget import total_steps
from ..network import DeepLinearNetwork, factor_gradients, fast_chain
from ..optim import OPTIMISERS, build_optimizer, build_schedule, check_batch_size, fast_kernel, schedule_step
from ..tasks import Reshuffled, Task
from ..tiny import planes_pay
from . import compiled
from .base import Dynamics
from .graphs import CapturedSteps
from .layouts import Workspace


class StepDynamics(Dynamics):
    """One optimizer step per step; gradients in closed form (3(N−1) batched matmuls from ∇E) or
    by autograd (`run.gradient`). A diverged replica holds non-finite values, which every update
    rule here keeps non-finite and which never mix across replicas (all ops are per replica),
    so freezing it costs nothing per step: it is only excluded from aggregates and stop tests.

    The hot path (closed form, no autograd, no allocation per step in the product and the factor
    gradients — only what `task.gradient` allocates):

    - prefix products W_p ⋯ W_1 are computed once per step, into preallocated buffers, and serve
      both the product W (for ∇E) and the factor gradients;
    - `gd`, `sgd` and `langevin` update in place by the registered kernel of their rule
      (dlntorch.optim: the one the Optimizer's step runs, or torch.optim.SGD's own ops), so the
      update is bit-identical given the same gradient. `momentum` and `adam` (no kernel) hand the
      closed-form gradients to torch.optim.
      The optimizer object is kept either way: its state_dict is the checkpoint's. The fused
      updates leave `p.grad` unset (nothing reads it; the gradients live in the workspace).
    - layout `planes` (chosen for small widths and many replicas, fused updates only): the
      dynamics keeps its own copy of the factors with the replica axis last, (d_p, d_{p−1}, B),
      and multiplies by d accumulated outer products (elementwise ops vectorised over B) instead
      of B tiny matmuls; the parameters are written back at the end of every `advance`, so the
      factors, energy, checkpoint and observables see the same state. Layout `batch` works on
      the parameters (B, d_p, d_{p−1}) directly with `bmm`. The choice is a fixed function of
      the shapes (never timed), so a run and its resumption take the same path.
    - a learning-rate schedule (`optim.schedule`, a torch.optim.lr_scheduler) is stepped after
      every step on every path, so the fused kernels read the lr of step k from the param group
      just as optimizer.step() does: both paths give the same bits. The clock t = Σ_k lr_k adds
      the lr each step used (no closed form: exactly what the steps took); constant lr keeps
      t = lr × step and no scheduler at all.
    - minibatches (`optim.batch_size`; `optim.replacement=false`: epochs over a fresh permutation
      per replica) and label noise (`optim.label_noise`, fresh per step and replica) are drawn from
      the dynamics' generator in the same order on every path: weights, label noise, rule noise.
    - `run.cuda_graphs` (off by default):
      on CUDA, plain `gd` at constant lr replays `graph_steps` steps captured once as a CUDA graph (one launch
      instead of ~20 per step: tiny matrices are launch-bound); any other case, and the remainder
      of a chunk, runs eagerly — the same kernels, so the eager path is the fallback.
    - `run.compile` (auto | on | off; dynamics/compiled.py): the fused step's gradients and drift
      through torch.compile, out of place, written back into the layout's state; the draws
      (weights, label noise, rule noise) stay eager, in the same order. `auto` decides from the
      run's steps, replicas and widths (a fixed rule, like the layout); a compile that fails
      leaves the eager path with one warning. Compiled steps take precedence over CUDA graphs.
      Without draws, at a constant lr, on `planes`: the entries program instead, K steps per
      call on the state's scalar entries (one (P, B) buffer, `Workspace.entries`), its chunks
      cut the same way whatever the stretch (K-step calls, then single steps), so a resumed
      run takes the same bits.
    """

    def __init__(self, cfg: Any, net: DeepLinearNetwork, task: Task, seed: int,
                 layout: str | None = None, cuda_graphs: bool | None = None, graph_steps: int = 16):
        super().__init__(cfg.optim.lr)
        self.net, self.task = net, task
        self.params = list(net.factors)
        self.generator = torch.Generator(device=net.factors[0].device).manual_seed(seed)
        self.optimizer = build_optimizer(cfg.optim, self.params, self.generator)
        self.closed_form = cfg.run.gradient != "autograd"
        self.name = cfg.optim.name
        # a schedule spans the run's steps: run.steps, or what run.time needs (config.budget)
        self.scheduler = build_schedule(cfg.optim, self.optimizer, total_steps(cfg))
        self.steps_done, self.clock = 0, 0.0          # steps taken and t = Σ lr_k (with a schedule)
        self.batch_size = cfg.optim.get("batch_size")  # None: the full batch
        if self.batch_size is not None:                # a file task's units are known only now
            check_batch_size(self.batch_size, task.units, task.name)
        self.reshuffled = None if self.batch_size is None or cfg.optim.get("replacement", True) else \
            Reshuffled(task, net.replicas, self.batch_size)
        self.label_sigma = float(cfg.optim.get("label_noise", 0.0))
        # the rule's kernel where it runs on any layout (fibre noise, a matrix exponential per
        # hidden layer, does not: the optimizer's own step)
        self.kernel = fast_kernel(self.optimizer, self.name) if self.closed_form else None
        self.fused = self.kernel is not None
        self._draws = getattr(self.optimizer, "term", None) is not None   # the rule draws noise
        if layout is None:
            layout = "planes" if self.fused and planes_pay(net.widths, net.replicas) else "batch"
        if layout not in ("batch", "planes") or (layout == "planes" and not self.fused):
            raise ValueError(f"layout={layout!r} is not allowed here: 'batch', or 'planes' with an update rule that "
                             "has a kernel (gd, sgd, langevin with isotropic noise) and closed-form gradients.")
        self.layout = layout
        self.cuda_graphs = cfg.run.cuda_graphs if cuda_graphs is None else cuda_graphs
        self.graph_steps = graph_steps
        self._work: Workspace | None = None
        self._graph: CapturedSteps | None = None
        extra = OPTIMISERS[self.name].extra
        setting = cfg.run.get("compile", "off")
        self.compiles = self.fused and "drift" in extra and setting != "off" and compiled.decide(
            setting, total_steps(cfg) if setting == "auto" else 0, net.replicas, net.widths, layout)
        self._drift, self._noise = extra.get("drift"), extra.get("noise")
        self._compiled: compiled.CompiledStep | None = None   # built with the workspace it closes over
        # the entries program of K steps (gd without draws, constant lr): None until built, False
        # where it does not apply (dynamics/compiled.py)
        self._steps: compiled.CompiledSteps | None | bool = None

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
                    weights = self._weights()
                    for param, grad in zip(self.params, self._gradients(state, weights, self._label_noise())):
                        param.grad = grad
                    self.optimizer.step()
                    self._tick()
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
        self.task.energy(self.net.product(), weights, self._label_noise()).sum().backward()
        self.optimizer.step()
        self._tick()
        self.gradient_evaluations += 1

    def _tick(self) -> None:
        """After one step: with a schedule, t gains the lr the step used, then the lr moves on."""
        if self.scheduler is not None:
            self.clock += self.optimizer.param_groups[0]["lr"]
            self.steps_done += 1
            schedule_step(self.scheduler)

    def time(self, step: int) -> float:
        """t = lr × step, or with a schedule Σ_{k<step} lr_k, known at the step reached."""
        if self.scheduler is None:
            return super().time(step)
        if step != self.steps_done:
            raise ValueError(f"t under a schedule is known at the step reached ({self.steps_done}), not {step}")
        return self.clock

    def factors(self) -> list[Tensor]:
        return [p.detach() for p in self.params]

    def task_changed(self) -> None:
        # a captured CUDA graph holds the task's loss coefficient as a constant: capture anew
        self._graph = None
        self._compiled = self._steps = None

    @property
    def compile_seconds(self) -> float | None:
        """The wall time of the compiled programs' first calls (the compiles' cost); None if none ran."""
        seconds = [p.seconds for p in (self._compiled, self._steps) if p and p.seconds is not None]
        return sum(seconds) if seconds else None

    @property
    def beta(self) -> float | None:
        return self.optimizer.param_groups[0].get("beta")

    @property
    def stochastic(self) -> bool:
        return self.beta is not None       # Langevin: the only update rule with a temperature

    @torch.no_grad()
    def energy(self) -> Tensor:
        return self.task.energy(fast_chain(self.factors()))

    def counters(self) -> dict[str, int]:
        counts = {} if self.reshuffled is None else {"epochs": self.reshuffled.epochs}
        if (hits := self.observables().get("singular_hits")) is not None:
            counts["singular_hits"] = int(hits.sum())
        return counts

    def observables(self) -> dict[str, Tensor]:
        """singular_hits per replica where the noise term takes whole steps (balanced on d×d factors)."""
        if not getattr(getattr(self.optimizer, "term", None), "whole_step", False):
            return {}
        hits = self.optimizer.state[self.params[0]].get("singular_hits")
        return {"singular_hits": torch.zeros_like(self.params[0].detach()[:, 0, 0]) if hits is None else hits.clone()}

    def state_dict(self) -> dict[str, Any]:
        state = {"factors": [p.detach().cpu() for p in self.params],
                 "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(),
                 "gradient_evaluations": self.gradient_evaluations}
        if self.scheduler is not None:
            state["schedule"] = {"scheduler": self.scheduler.state_dict(), "steps": self.steps_done,
                                 "t": self.clock}
        if self.reshuffled is not None:
            state["epochs"] = self.reshuffled.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.set_factors([f.to(self.params[0].device) for f in state["factors"]])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.gradient_evaluations = state["gradient_evaluations"]
        if self.scheduler is not None:
            saved = state["schedule"]
            self.scheduler.load_state_dict(saved["scheduler"])
            self.steps_done, self.clock = saved["steps"], saved["t"]
        if self.reshuffled is not None:
            self.reshuffled.load_state_dict(state["epochs"])

    # -- the state the hot loop works on ------------------------------------------------
    def _state_in(self) -> list[Tensor]:
        """The factors in the working layout: the parameters themselves (batch), or the planes,
        refreshed from the parameters when anything changed them since the last write-back."""
        factors = [p.detach() for p in self.params]
        if self._work is None or self._work.stale(factors):
            self._work = Workspace(factors, self.layout)
            self._graph = self._compiled = self._steps = None
        work = self._work
        if self.layout == "batch":
            return factors
        if work.versions != [(f.data_ptr(), compat.tensor_version(f)) for f in factors]:
            for plane, f in zip(work.planes, factors):
                plane.copy_(f.permute(1, 2, 0))
        return work.planes

    def _state_out(self, state: list[Tensor]) -> None:
        factors = [p.detach() for p in self.params]
        if self.layout == "planes":
            for f, plane in zip(factors, state):
                f.permute(1, 2, 0).copy_(plane)
        self._work.versions = [(f.data_ptr(), compat.tensor_version(f)) for f in factors]

    def _weights(self) -> Tensor | None:
        if self.batch_size is None:
            return None
        if self.reshuffled is not None:
            return self.reshuffled.draw(self.generator)
        return self.task.minibatch(self.net.replicas, self.batch_size, self.generator)

    def _label_noise(self) -> Tensor | None:
        return self.task.label_noise(self.net.replicas, self.label_sigma, self.generator) if self.label_sigma else None

    # -- closed-form gradients ------------------------------------------------------------
    def _gradients(self, state: list[Tensor], weights: Tensor | None, noise: Tensor | None) -> list[Tensor]:
        """∂L/∂W_p for all p by the chain rule on the working layout, into the workspace."""
        return factor_gradients(state, lambda W: self._task_gradient(W, weights, noise), self._work.mm,
                                self._work.T, self._work)

    def _task_gradient(self, W: Tensor, weights: Tensor | None, noise: Tensor | None) -> Tensor:
        """∇E at the product W, both in the working layout."""
        work = self._work
        return work.from_task(self.task.gradient(work.to_task(W), weights, noise))

    def _fused_steps(self, state: list[Tensor], steps: int) -> None:
        work, kernel, optimizer = self._work, self.kernel, self.optimizer
        draws = work.noise if self._draws else None
        if self.compiles and self._entry_program():
            steps -= self._steps(work.entries, optimizer.param_groups[0]["lr"], steps)
            self.compiles = not self._steps.failed      # what is left runs eagerly after a failure
        if self.compiles and steps and self._compiled is None:
            self._compiled = compiled.CompiledStep(compiled.drift_step(self._task_gradient, work.mm, work.T,
                                                                       self._drift))
        for _ in range(steps):
            weights, noise = self._weights(), self._label_noise()   # drawn in this order on every path
            if not (self.compiles and self._compiled_step(state, weights, noise, draws)):
                kernel(optimizer, state, self._gradients(state, weights, noise), draws, work.view)
            self._tick()

    def _entry_program(self) -> bool:
        """Build the entries program of K steps where it applies: the planes layout, a rule
        without draws at a constant lr (no schedule), the full batch without label noise, a
        gradient that is affine to rounding at the current products, and shapes small enough."""
        if self._steps is None:
            self._steps = False
            if (self.layout == "planes" and not self._draws and self.scheduler is None and self.batch_size is None
                    and not self.label_sigma):
                gradient = compiled.AffineGradient.probe(self.task.gradient, fast_chain(self.factors()))
                K = 0 if gradient is None else compiled.steps_per_call(self.net.widths, gradient)
                if K:
                    shapes = [tuple(p.shape[:2]) for p in self._work.planes]
                    wd = self.optimizer.param_groups[0]["weight_decay"]
                    self._steps = compiled.CompiledSteps(
                        lambda k: compiled.entry_steps(shapes, gradient, self._drift, wd, k), K)
        return bool(self._steps)

    def _compiled_step(self, state: list[Tensor], weights: Tensor | None, noise: Tensor | None,
                       draws: list[Tensor] | None) -> bool:
        """One step by the compiled drift, then the rule's noise eagerly; False (nothing done)
        once compiling has failed, and from then on the dynamics stays eager."""
        group = self.optimizer.param_groups[0]
        if not self._compiled(state, weights, noise, group["lr"], group["weight_decay"]):
            self.compiles = False
            return False
        if self._noise is not None:
            self._noise(self.optimizer, state, draws, self._work.view)
        return True

    # -- CUDA graphs --------------------------------------------------------------------
    def _graphs_apply(self) -> bool:
        # a captured graph bakes in its lr: only at constant lr (no schedule) and without label noise
        return (self.cuda_graphs and self.name == "gd" and self.scheduler is None and not self.label_sigma
                and self.params[0].device.type == "cuda" and not self.compiles)

    def _replay(self, state: list[Tensor], steps: int) -> int:
        """Replay the captured `graph_steps` steps as often as they fit; returns the steps done.
        If the capture fails, the graphs are switched off and everything runs eagerly."""
        K = self.graph_steps
        if steps < K:
            return 0
        group = self.optimizer.param_groups[0]
        key = (group["lr"], group["weight_decay"], K)
        if self._graph is None or self._graph.key != key:
            self._graph = CapturedSteps.capture(key, state, lambda k: self._fused_steps(state, k), K)
            if self._graph is None:
                self.cuda_graphs = False
                return 0
        return self._graph.replay(steps)

