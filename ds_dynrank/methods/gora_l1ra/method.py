"""GoRA then L1RA (ours; issue 23): GoRA sizes every module once from the base weights' gradients over the first
`gora.warmup_steps` steps; L1RA's gates, under their L1 pull from the first step, then prune and re-assign ranks at
every `schedule.interval` after that. GoRA answers where the rank should start from a signal no adapter has yet;
L1RA corrects it from what the adapters learned. Both keep the same initial parameter budget.

The two methods run unchanged side by side: which one decides is a matter of whether GoRA's event has happened
(its `done`, restored from the checkpoint with its own state).
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.methods.base import Adapters, Event
from ds_dynrank.methods.gora.method import GoRA
from ds_dynrank.methods.l1ra.method import L1RA
from ds_dynrank.schedule import Schedule


class GoRAThenL1RA(L1RA):
    def __init__(self, cfg, *, validation: dict | None = None) -> None:
        super().__init__(cfg, validation=validation)
        self.gora = GoRA(cfg, validation=validation)

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """GoRA's event at the end of warm-up, then L1RA's every interval (its default: 5% of the run)."""
        l1ra = super().schedule(total_steps, steps_per_epoch)
        return Schedule(start=self.cfg.gora.warmup_steps, interval=l1ra.interval, stop=l1ra.stop)

    def attach(self, ctx, adapters: Adapters) -> None:
        self.gora.attach(ctx, adapters)
        super().attach(ctx, adapters)

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        self.gora.after_boundary(ctx, adapters, applied)
        super().after_boundary(ctx, adapters, applied)

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        return super().scores(ctx, adapters) if self.gora.done else self.gora.scores(ctx, adapters)

    def decide(self, scores: torch.Tensor, event: Event) -> Plan:
        return super().decide(scores, event) if self.gora.done else self.gora.decide(scores, event)

    def after_event(self, plan: Plan, slots: SlotMap) -> None:
        if not self.gora.done:
            self.gora.after_event(plan, slots)

    def state_dict(self) -> dict:
        return {"one_shot": self.gora.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gora.load_state_dict(state["one_shot"])
