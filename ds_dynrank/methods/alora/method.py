"""ALoRA (arXiv 2403.16187): AB-LoRA importance of every live rank from ablation forwards on a fixed validation
batch, then prune the lowest and grow the modules that lost none.

Scoring is split across data-parallel ranks: the 2 x S variants (rank r removed; rank r kept alone in its module)
are cut into equal contiguous chunks (`ctx.shard`), each rank evaluates its own and the controller sums the partial
score vectors.
Each forward evaluates `variants_per_forward` variants at once: the validation batch is repeated and every
adapter scales each example's slots by that example's variant (`LoRALinear.ablation`). Every rank runs the same
number of forwards (padded), because under ZeRO-3 a forward is a collective.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan, alora_plan
from ds_dynrank.methods.base import Adapters, Event, Method, live_scores
from ds_dynrank.schedule import Schedule, resolve_schedule
from ds_dynrank.scores import ablation_importance, per_example_loss

WITHOUT, ALONE = 0, 1  # variant kinds: M\r and M_r


def variants(adapters: Adapters) -> list[tuple[int, int, int]]:
    """(module, slot, kind) for every live slot, both kinds: the ablations one scoring round evaluates."""
    return [
        (m, s, kind) for m, (_, layer) in enumerate(adapters) for s in layer.live_slots() for kind in (WITHOUT, ALONE)
    ]


def ablation_factors(layer_capacity: int, group: list[tuple[int, int, int]], module: int) -> torch.Tensor | None:
    """[V, R] slot factors of one module for a group of variants: 1 everywhere, except the variant's own row when
    it targets this module (0 at the slot for WITHOUT; 1 only at the slot for ALONE). None: untouched."""
    if not any(m == module for m, _, _ in group):
        return None
    factors = torch.ones(len(group), layer_capacity)
    for v, (m, slot, kind) in enumerate(group):
        if m != module:
            continue
        if kind == WITHOUT:
            factors[v, slot] = 0.0
        else:
            factors[v].zero_()
            factors[v, slot] = 1.0
    return factors


class ALoRA(Method):
    partial_scores = True  # each rank scores its share of the ablations
    needs_validation = True

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """K1 then N_A rounds every K2, the paper's epochs converted to steps (or schedule.start/interval)."""
        s, a = self.cfg.schedule, self.cfg.alora
        epoch = steps_per_epoch or total_steps
        interval = s.interval or max(1, round(a.k2_epochs * epoch))
        start = s.start or max(1, round(a.k1_epochs * epoch))
        stop = s.stop if s.stop is not None else start + (a.rounds - 1) * interval
        return resolve_schedule(start, interval, stop, total_steps=total_steps, interval_ratio=0.0, kind=s.kind)

    def scores(self, ctx, adapters: Adapters) -> torch.Tensor:
        """This rank's share of IS(r) - S(M) = loss(M\\r) - loss(M_r), at each slot's offset (zeros elsewhere)."""
        offsets = [0]
        for _, layer in adapters:
            offsets.append(offsets[-1] + layer.capacity)
        mine, per_rank = ctx.shard(variants(adapters))
        per_forward = self.cfg.alora.variants_per_forward
        without, alone = torch.zeros(offsets[-1]), torch.zeros(offsets[-1])
        try:
            for start in range(0, per_rank, per_forward):
                group = mine[start : start + per_forward]
                for (m, slot, kind), loss in zip(group, self._losses(ctx, adapters, group)):
                    (without if kind == WITHOUT else alone)[offsets[m] + slot] += loss
        finally:
            for _, layer in adapters:
                layer.ablation = None
        return ablation_importance(without, alone)

    def _losses(self, ctx, adapters: Adapters, group: list[tuple[int, int, int]]) -> list[float]:
        """Mean validation loss of each variant in `group`, in one forward (a plain one when `group` is empty:
        this rank has run out of variants but ZeRO-3 needs it in the collective)."""
        batch = self.validation
        n = batch["input_ids"].shape[0]
        copies = max(1, len(group))
        for m, (_, layer) in enumerate(adapters):
            factors = ablation_factors(layer.capacity, group, m)
            layer.ablation = None if factors is None else factors.repeat_interleave(n, 0).to(ctx.device)
        inputs = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        labels = inputs.pop("labels")
        logits = ctx.forward(inputs)
        per_example = per_example_loss(logits, labels.to(logits.device)).float().cpu().view(copies, n).mean(dim=1)
        return per_example.tolist()[: len(group)]

    def decide(self, scores_S: torch.Tensor, event: Event) -> Plan:
        b = event.bounds
        return alora_plan(
            live_scores(scores_S, event.capacity_M),
            event.live,
            n_prune=self.cfg.alora.prune_per_round or len(event.live),
            floor=b.floor,
            cap_M=b.cap_M,
            cost_M=b.cost_M,
            unit=b.unit,
            carry=event.unspent(),
        )
