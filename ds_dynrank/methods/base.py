"""What a method is to the controller: optimizer groups, what it observes while training, per-slot scores, a pure
decision, and its own state.

A method is math plus a context. It receives a `Context` (ds_dynrank/context.py) for the few impure things it needs,
a sum over ranks, full fp32 values, an in-place master edit, reduced gradients, a forward, its share of the work,
and it never imports `dist` or `zero`, nor asks which backend runs: after an event it is told where each slot went
(`SlotMap`). The controller owns the event; the backend owns the reshape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_dynrank.allocation import Plan, identity_plan, unspent
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.lora import LoRALinear, adapter_parameters
from ds_dynrank.schedule import Schedule, resolve_schedule

Adapters = list[tuple[str, LoRALinear]]


@dataclass(frozen=True)
class Bounds:
    """What a decision must respect, per module (M) and overall."""

    floor: int
    cap_M: list[int]
    cost_M: list[int]
    unit: str


@dataclass(frozen=True)
class Event:
    """What a decision sees besides the scores: where every module stands and what it must respect."""

    step: int  # applied optimizer steps so far
    total_steps: int
    live: list[list[int]]  # live slots per module
    capacity_M: list[int]
    active: list[bool]
    bounds: Bounds
    initial_budget: int  # the budget in use when training started

    def unspent(self) -> int:
        """What earlier events left of the starting budget (allocation.unspent), for the plan to offer again."""
        return unspent(self.initial_budget, self.live, self.bounds.cost_M, self.bounds.unit)


class Method:
    """The protocol, with the defaults of a method that never re-allocates (fixed-rank LoRA is exactly this)."""

    interval_ratio = 0.05  # default event spacing as a fraction of the run
    partial_scores = False  # True: each rank scored its share of the work, and the controller sums the shares
    needs_validation = False  # scores need a fixed validation batch (initialize(..., validation=batch))
    uses_activity = False  # decides which modules train (Plan.active), not only their ranks

    def __init__(self, cfg, *, validation: dict | None = None) -> None:
        self.cfg = cfg
        self.validation = validation

    def initial_activity(self, n_modules: int) -> list[bool] | None:
        """Which modules train from the first step (None: all). Applied before DeepSpeed sees the parameters."""
        return None

    def optimizer_groups(self, adapters: Adapters) -> list[dict]:
        """The `model_parameters` for deepspeed.initialize (and for every engine rebuild)."""
        return [{"params": adapter_parameters(adapters)}]

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        s = self.cfg.schedule
        return resolve_schedule(
            s.start, s.interval, s.stop, total_steps=total_steps, interval_ratio=self.interval_ratio, kind=s.kind
        )

    def attach(self, ctx, adapters: Adapters) -> None:
        """After deepspeed.initialize and after every engine rebuild (new layers: register hooks again)."""

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        """At every gradient-accumulation boundary, on every rank; `applied` is False for a skipped step."""

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        """Per-slot scores [S] (fp32, 1-D, the modules' capacities back to back), the same on every rank unless
        `partial_scores`, in which case the controller sums the ranks' shares."""
        return torch.zeros(sum(layer.capacity for _, layer in adapters))

    def decide(self, scores_S: torch.Tensor, event: Event) -> Plan:
        """Pure: rank 0 runs it on the reduced scores, and the plan is broadcast."""
        return identity_plan(event.live)

    def after_event(self, plan: Plan, slots: SlotMap) -> None:
        """On every rank, once the plan is applied: re-index per-slot state along `slots`, count choices."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (called after the engine loaded its checkpoint)."""


def live_scores(scores_S: torch.Tensor, capacity_M: list[int]) -> list[torch.Tensor]:
    """Split a flat [S] slot-score vector into one [R] tensor per module."""
    return list(scores_S.split(capacity_M))


def build_method(cfg, *, validation: dict | None = None) -> Method:
    """The configured method, built from its registry entry (imports its torch code)."""
    return cfg.spec.load()(cfg, validation=validation)
