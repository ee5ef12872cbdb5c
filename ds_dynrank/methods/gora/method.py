"""GoRA (arXiv 2502.12171, the rank allocation): the gradient G of every adapted module's frozen weight W, summed
over the micro-batches of the first `gora.warmup_steps` optimizer steps and over the ranks, gives each module an
importance (mean |W * G|, or ||G||_F); one event then sizes every module's rank in proportion to it under the
initial parameter budget, and training goes on as plain LoRA (the paper's gradient-based initialisation of the
adapters is not done: they keep theirs).

W never requires grad: G = sum over tokens of delta_out^T x_in is built from hooks on the adapted layer, the input
kept by a forward hook and the output's gradient taken by a tensor hook in backward. A forward replayed by
activation checkpointing inside backward registers nothing (`counts_forward`), so each micro-batch counts once.
Each rank sums its own micro-batches in fp32 (unscaled by an fp16 loss scale, micro-batches that overflowed left
out); at the event one sum per module over the ranks gives every rank the same G, and W is read whole (ZeRO-3
gathers its partitions). The buffers cost one fp32 copy of every adapted weight per rank, during warm-up only.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan, identity_plan, plan_for_ranks, proportional_ranks
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.lora import Conv1D
from ds_dynrank.methods.base import Adapters, Event, Method
from ds_dynrank.recompute import counts_forward
from ds_dynrank.schedule import Schedule
from ds_dynrank.scores import gradient_importance


def weight_gradient(x: torch.Tensor, grad_out: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """The gradient of a linear layer's weight from its input [..., I] and output gradient [..., O], fp32: [O, I]
    as nn.Linear stores it, [I, O] for a transformers Conv1D."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
    return g.T if conv1d else g


class GoRA(Method):
    def __init__(self, cfg, *, validation: dict | None = None) -> None:
        super().__init__(cfg, validation=validation)
        self.seen = 0  # applied warm-up steps whose micro-batches are in the sums
        self.done = False  # the event ran
        self.importance: torch.Tensor | None = None  # [M] normalised, the same on every rank once scored
        self._grads: list[torch.Tensor] | None = None  # per module: this rank's sum of G, full weight shape, fp32
        self._handles: list = []
        self._loss_scale = lambda: 1.0

    @property
    def warming_up(self) -> bool:
        return not self.done and self.importance is None and self.seen < self.cfg.gora.warmup_steps

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        n = self.cfg.gora.warmup_steps
        return Schedule(start=n, interval=1, stop=n)

    def attach(self, ctx, adapters: Adapters) -> None:
        self._release()
        if not self.warming_up:
            return
        self._loss_scale = ctx.loss_scale
        if self._grads is None:
            shapes = [ctx.full_shape(layer.base.weight) for _, layer in adapters]
            self._grads = [torch.zeros(s, dtype=torch.float32, device=ctx.device) for s in shapes]
        for m, (_, layer) in enumerate(adapters):
            self._handles.append(layer.register_forward_hook(self._forward_hook(m, isinstance(layer.base, Conv1D))))

    def _forward_hook(self, m: int, conv1d: bool):
        def hook(module, inputs, output) -> None:
            if not (self.warming_up and output.requires_grad and counts_forward(module)):
                return  # evaluation, no-grad scoring, or checkpointing's replay in backward
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._add(m, x, grad, conv1d))

        return hook

    def _add(self, m: int, x: torch.Tensor, grad: torch.Tensor, conv1d: bool) -> None:
        g = weight_gradient(x, grad.detach(), conv1d)
        scale = self._loss_scale()
        if scale != 1.0:  # fp16: unscale, and leave out a micro-batch whose gradient overflowed
            g = g / scale
            if not bool(torch.isfinite(g).all()):
                return
        self._grads[m] += g.to(self._grads[m].device)

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        if applied and self.warming_up:
            self.seen += 1

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        """Collective: per module, the sum of G over ranks (and W's full values for `sensitivity`), one module at a
        time; returns the importances normalised to sum 1, [M], the same on every rank. The sums are freed."""
        if self.importance is None:
            kind = self.cfg.gora.importance
            raw = []
            for (_, layer), local in zip(adapters, self._grads):
                grad = ctx.sum(local)
                weight = ctx.full_fp32([layer.base.weight]).view(grad.shape) if kind == "sensitivity" else None
                raw.append(gradient_importance(grad, weight, kind))
            total = torch.tensor(raw, dtype=torch.float64)
            self.importance = (total / total.sum() if total.sum() > 0 else total).float()
            self._grads = None
            self._release()
        return self.importance

    def decide(self, scores: torch.Tensor, event: Event) -> Plan:
        """Ranks in proportion to importance under the initial budget (params: a rank of module m costs its
        in + out features), each within [budget.floor, its cap]; nothing measured, nothing moves."""
        if not float(scores.sum()) > 0:
            return identity_plan(event.live)
        b = event.bounds
        cost_M = b.cost_M if b.unit == "params" else [1] * len(event.live)
        ranks = proportional_ranks(scores, budget=event.initial_budget, floor=b.floor, cap_M=b.cap_M, cost_M=cost_M)
        return plan_for_ranks(ranks, event.live)

    def after_event(self, plan: Plan, slots: SlotMap) -> None:
        self.done = True
        self._grads = None
        self._release()

    def state_dict(self) -> dict:
        """The per-rank gradient sums are not saved (one fp32 copy of every adapted weight): a run resumed
        during warm-up sums the steps after the resumed one only."""
        return {"seen": self.seen, "done": self.done, "importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.done, self.importance = state["seen"], state["done"], state["importance"]
        self._grads = None  # attach() starts the sums again while warm-up lasts
