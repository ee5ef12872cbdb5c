"""What a method is to the engine hook, and the fixed-rank baseline that re-allocates nothing.

A method is a scorer (`after_boundary` accumulates, `local_scores` reads), a pure decision (`decide`, rank 0 only)
and a schedule. The hook does all communication of the decision and all state surgery; a method only touches
its own per-step state, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_dynrank.allocation import Plan, identity_plan
from ds_dynrank.config import DynRankConfig
from ds_dynrank.lora import LoRALinear, adapter_parameters
from ds_dynrank.schedule import Schedule, resolve_schedule
from ds_dynrank.zero import StateIO

Adapters = list[tuple[str, LoRALinear]]


@dataclass(frozen=True)
class Bounds:
    """What a decision must respect, per module (M) and overall."""

    floor: int
    cap_M: list[int]
    cost_M: list[int]
    unit: str
    initial_budget: int = 0  # the budget in use when training started


class Method:
    """Fixed-rank LoRA: one optimizer group, nothing per step, never re-allocates."""

    interval_ratio = 0.05  # default event spacing as a fraction of the run
    score_reduction = "mean"  # how local scores combine across ranks: "mean" or "sum" (work split over ranks)
    needs_validation = False  # scores need a fixed validation batch (DynRank(validation=...))
    uses_activity = False  # decides which modules train (Plan.active), not only their ranks

    def __init__(self, cfg: DynRankConfig) -> None:
        self.cfg = cfg
        self.validation: dict | None = None

    def prepare(self, adapters: Adapters) -> None:
        """Once, before deepspeed.initialize: set up the adapters (module allocation's initial active set)."""

    def optimizer_groups(self, adapters: Adapters) -> list[dict]:
        """The `model_parameters` for deepspeed.initialize (and for every engine rebuild)."""
        return [{"params": adapter_parameters(adapters)}]

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        s = self.cfg.schedule
        return resolve_schedule(s.start, s.interval, s.stop, total_steps=total_steps,
                                interval_ratio=self.interval_ratio, kind=s.kind)  # fmt: skip

    def on_attach(self, engine, adapters: Adapters) -> None:
        """Called after deepspeed.initialize and after every engine rebuild (new layers: re-register hooks)."""

    def after_boundary(self, engine, io: StateIO, adapters: Adapters, applied: bool) -> None:
        """Called at every gradient-accumulation boundary on every rank; `applied` is False for a skipped step."""

    def local_scores(self, engine, io: StateIO, adapters: Adapters) -> torch.Tensor:
        """This rank's scores (fp32, 1-D); combined over ranks by `score_reduction` before the decision."""
        return torch.zeros(sum(layer.capacity for _, layer in adapters))

    def decide(self, scores: torch.Tensor, adapters: Adapters, bounds: Bounds, step: int) -> Plan:
        """Pure: rank 0 runs it on the reduced scores."""
        return identity_plan([layer.live_slots() for _, layer in adapters])

    def after_apply(self, plan: Plan, live_before: list[list[int]], adapters: Adapters) -> None:
        """Called on every rank once the broadcast plan is applied: re-index per-slot state, count choices."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (called after the engine loaded its checkpoint)."""


class FixedRank(Method):
    """Vanilla LoRA: the baseline every dynamic method is measured against."""


def live_scores(scores_S: torch.Tensor, adapters: Adapters) -> list[torch.Tensor]:
    """Split a flat [S] slot-score vector into one [R] tensor per module."""
    return list(scores_S.split([layer.capacity for _, layer in adapters]))
