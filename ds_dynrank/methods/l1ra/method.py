"""L1RA (arXiv 2509.04884): a gate vector between A and B under L1, prune ranks whose gate reaches zero and hand the
freed rank budget to other adapters.

Unlike the reference code (a forked bitsandbytes Adam, whole-optimizer restarts, micro-batch step counts), the
gates are a plain optimizer group at their own constant learning rate, and the L1 term is a proximal step,
`c <- clamp(c - gate_lr * l1_lambda, 0, 1)`, applied to the fp32 master gates after every applied optimizer step
(each rank edits only its own fragment: no communication).
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan, l1ra_plan
from ds_dynrank.methods.base import Adapters, Event, Method, live_scores

GATE_GROUP = 1


class L1RA(Method):
    interval_ratio = 0.05  # the paper's rank_update_ratio

    def optimizer_groups(self, adapters: Adapters) -> list[dict]:
        low_rank = [p for _, layer in adapters for p in (layer.lora_A, layer.lora_B)]
        gates = [layer.lora_gate for _, layer in adapters]
        return [{"params": low_rank}, {"params": gates, "lr": self.cfg.l1ra.gate_lr, "weight_decay": 0.0}]

    def attach(self, ctx, adapters: Adapters) -> None:
        ctx.set_group_lr(GATE_GROUP, self.cfg.l1ra.gate_lr)

    def after_boundary(self, ctx, adapters: Adapters, applied: bool) -> None:
        if not applied:
            return
        ctx.set_group_lr(GATE_GROUP, self.cfg.l1ra.gate_lr)  # the LR scheduler set every group alike
        shrink = self.cfg.l1ra.gate_lr * self.cfg.l1ra.l1_lambda
        for _, layer in adapters:
            ctx.edit_master(layer.lora_gate, lambda c: (c - shrink).clamp_(0.0, 1.0))

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        return ctx.full_fp32([layer.lora_gate for _, layer in adapters])  # the gates themselves

    def decide(self, scores_S: torch.Tensor, event: Event) -> Plan:
        b = event.bounds
        return l1ra_plan(
            live_scores(scores_S, event.capacity_M),
            event.live,
            threshold=self.cfg.l1ra.prune_threshold,
            floor=b.floor,
            cap_M=b.cap_M,
            cost_M=b.cost_M,
            unit=b.unit,
            exclude_pruned=self.cfg.l1ra.exclude_pruned,
            carry=event.unspent(),
        )
