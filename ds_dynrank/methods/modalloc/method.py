"""Dynamic low-rank module allocation (DynaLoRA, `m-krastev/dynalora`): every adapter keeps its rank, but only a
chosen subset of modules trains until the next event.

Importance is cumulative over the run (as DynaLoRA): the per-token L2 norm of each module's output, or the L2 norm
of its adapter gradients, summed over micro-batches on each rank and over ranks at every accumulation boundary
into a running total that is identical on every rank (and so checkpointed exactly). The initial active set is
drawn uniformly from the configured seed, the same on every rank without communication.

Inactive modules stay in the forward; how they stop training is the backend's business (masked: an exactly zero
gradient and zeroed moments; physical: their tensors become buffers with no optimizer state).
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.methods.base import Adapters, Event, Method
from ds_dynrank.methods.modalloc import strategies
from ds_dynrank.recompute import counts_forward


def default_k(n_modules: int) -> int:
    """Two thirds of the modules: DynaLoRA's headline setting (16 of 24)."""
    return max(1, round(2 * n_modules / 3))


def decision_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class ModAlloc(Method):
    interval_ratio = 0.1
    uses_activity = True

    def __init__(self, cfg, *, validation: dict | None = None) -> None:
        super().__init__(cfg, validation=validation)
        self.importance: torch.Tensor | None = None  # [M] fp64 running total, identical on every rank
        self.times_chosen: torch.Tensor | None = None  # [M] events (and the start) at which each module trained
        self._local: torch.Tensor | None = None  # [M] this rank's accumulation since the last boundary
        self._handles: list = []

    def sizes(self, n_modules: int) -> tuple[int, float]:
        c = self.cfg.modalloc
        return min(n_modules, c.k or default_k(n_modules)), c.threshold or 0.9

    def initial_activity(self, n_modules: int) -> list[bool]:
        """Drawn uniformly from the seed, the same on every rank without communication, before DeepSpeed exists
        (so inactive adapters can stay out of the optimizer from the first step)."""
        k, p = self.sizes(n_modules)
        size = strategies.initial_size(self.cfg.modalloc.strategy, n_modules, k=k, p=p)
        return strategies.uniform(n_modules, size, decision_generator(self.cfg.seed, 0))

    def attach(self, ctx, adapters: Adapters) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        n = len(adapters)
        if self.importance is None:
            self.importance = torch.zeros(n, dtype=torch.float64)
        if self.times_chosen is None:
            self.times_chosen = torch.tensor([layer.trainable for _, layer in adapters], dtype=torch.float64)
        self._local = torch.zeros(n, dtype=torch.float32, device=ctx.device)
        for m, (_, layer) in enumerate(adapters):
            if self.cfg.modalloc.score == "activation":
                self._handles.append(layer.register_forward_hook(self._activation_hook(m)))
            else:
                for p in layer.adapter_tensors().values():
                    if p.requires_grad:
                        self._handles.append(p.register_hook(self._gradient_hook(m)))

    def _activation_hook(self, m: int):
        def hook(module, inputs, output) -> None:
            if counts_forward(module):  # once per micro-batch: not eval, not scoring, not checkpointing's replay
                self._local[m] += output.detach().float().norm(dim=-1).sum().to(self._local.device)

        return hook

    def _gradient_hook(self, m: int):
        def hook(grad: torch.Tensor) -> None:
            self._local[m] += grad.detach().float().norm().to(self._local.device)

        return hook

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        """Fold this boundary's local importance into the shared running total (one sum of M floats over ranks)."""
        self.importance += ctx.sum(self._local.clone()).double()
        self._local.zero_()

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        return self.importance.float()  # per module, identical on every rank

    def decide(self, scores: torch.Tensor, event: Event) -> Plan:
        k, p = self.sizes(len(event.live))
        active = strategies.select(
            self.cfg.modalloc.strategy,
            scores,
            k=k,
            p=p,
            times_chosen_M=self.times_chosen,
            generator=decision_generator(self.cfg.seed, event.step),
        )
        return Plan(keep=tuple(tuple(s) for s in event.live), grow=tuple(0 for _ in event.live), active=tuple(active))

    def after_event(self, plan: Plan, slots: SlotMap) -> None:
        if plan.active is not None:
            self.times_chosen += torch.tensor(plan.active, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"importance": self.importance.clone(), "times_chosen": self.times_chosen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.importance = state["importance"].clone()
        self.times_chosen = state["times_chosen"].clone()
