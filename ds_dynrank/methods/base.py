"""What a method is to the engine hook, and the fixed-rank baseline that re-allocates nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_dynrank.allocation import Plan, identity_plan
from ds_dynrank.config import DynRankConfig
from ds_dynrank.lora import LoRALinear, adapter_parameters
from ds_dynrank.zero import StateIO

Adapters = list[tuple[str, LoRALinear]]


@dataclass(frozen=True)
class Bounds:
    """What a decision must respect, per module (M) and overall."""

    floor: int
    cap_M: list[int]
    cost_M: list[int]
    unit: str


class Method:
    """Fixed-rank LoRA: one optimizer group, nothing per step, never re-allocates."""

    interval_ratio = 0.05  # default event spacing as a fraction of the run

    def __init__(self, cfg: DynRankConfig) -> None:
        self.cfg = cfg

    def optimizer_groups(self, adapters: Adapters) -> list[dict]:
        return [{"params": adapter_parameters(adapters)}]

    def on_attach(self, engine) -> None:
        """Called once after deepspeed.initialize."""

    def after_optimizer_step(self, engine, io: StateIO, adapters: Adapters) -> None:
        """Called after every applied optimizer step, on every rank."""

    def local_scores(self, io: StateIO, adapters: Adapters) -> torch.Tensor:
        """This rank's per-slot scores [S] (fp32, CPU); averaged over ranks before the decision."""
        return torch.zeros(sum(layer.capacity for _, layer in adapters))

    def decide(self, scores_S: torch.Tensor, adapters: Adapters, bounds: Bounds) -> Plan:
        """Pure: rank 0 runs it on the reduced scores."""
        return identity_plan([layer.live_slots() for _, layer in adapters])


class FixedRank(Method):
    """Vanilla LoRA: the baseline every dynamic method is measured against."""
