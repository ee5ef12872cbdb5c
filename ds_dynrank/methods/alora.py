"""ALoRA (arXiv 2403.16187): AB-LoRA importance of every live rank from ablation forwards on a fixed validation
batch, then prune the lowest and grow the modules that lost none.

Scoring is split across data-parallel ranks: the 2 x S variants (rank r removed; rank r kept alone in its module)
are cut into equal contiguous chunks, each rank evaluates its own and the hook sums the partial score vectors.
Each forward evaluates `variants_per_forward` variants at once: the validation batch is repeated and every
adapter scales each example's slots by that example's variant (`LoRALinear.ablation`). Every rank runs the same
number of forwards (padded), because under ZeRO-3 a forward is a collective.
"""

from __future__ import annotations

import math

import torch

from ds_dynrank import dist
from ds_dynrank.allocation import Plan, alora_plan
from ds_dynrank.methods.base import Adapters, Bounds, Method, live_scores
from ds_dynrank.schedule import Schedule, resolve_schedule
from ds_dynrank.scores import per_example_loss
from ds_dynrank.zero import StateIO

WITHOUT, ALONE = 0, 1  # variant kinds: M\r and M_r


def variants(adapters: Adapters) -> list[tuple[int, int, int]]:
    """(module, slot, kind) for every live slot, both kinds: the ablations one scoring round evaluates."""
    return [
        (m, s, kind) for m, (_, layer) in enumerate(adapters) for s in layer.live_slots() for kind in (WITHOUT, ALONE)
    ]


def shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous chunk and the chunk length every rank pads to."""
    per_rank = math.ceil(len(items) / world)
    return items[rank * per_rank : (rank + 1) * per_rank], per_rank


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
    score_reduction = "sum"
    needs_validation = True

    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """K1 then N_A rounds every K2, the paper's epochs converted to steps (or schedule.start/interval)."""
        s, a = self.cfg.schedule, self.cfg.alora
        epoch = steps_per_epoch or total_steps
        interval = s.interval or max(1, round(a.k2_epochs * epoch))
        start = s.start or max(1, round(a.k1_epochs * epoch))
        stop = s.stop if s.stop is not None else start + (a.rounds - 1) * interval
        return resolve_schedule(start, interval, stop, total_steps=total_steps, interval_ratio=0.0, kind=s.kind)

    def local_scores(self, engine, io: StateIO, adapters: Adapters) -> torch.Tensor:
        """This rank's share of IS(r) - S(M) = loss(M\\r) - loss(M_r), at each slot's offset (zeros elsewhere)."""
        if self.validation is None:
            raise RuntimeError("ALoRA needs a validation batch: DynRank(..., validation=batch)")
        offsets = [0]
        for _, layer in adapters:
            offsets.append(offsets[-1] + layer.capacity)
        mine, per_rank = shard(variants(adapters), dist.rank(), dist.world_size())
        per_forward = self.cfg.alora.variants_per_forward
        scores = torch.zeros(offsets[-1])
        was_training = engine.module.training
        engine.module.eval()
        try:
            for start in range(0, per_rank, per_forward):
                group = mine[start : start + per_forward]
                losses = self._losses(engine, adapters, group)
                for (m, slot, kind), loss in zip(group, losses):
                    scores[offsets[m] + slot] += loss if kind == WITHOUT else -loss
        finally:
            for _, layer in adapters:
                layer.ablation = None
            engine.module.train(was_training)
        return scores

    @torch.no_grad()
    def _losses(self, engine, adapters: Adapters, group: list[tuple[int, int, int]]) -> list[float]:
        """Mean validation loss of each variant in `group`, in one forward (a plain one when `group` is empty:
        this rank has run out of variants but ZeRO-3 needs it in the collective)."""
        batch = self.validation
        n = batch["input_ids"].shape[0]
        copies = max(1, len(group))
        for m, (_, layer) in enumerate(adapters):
            factors = ablation_factors(layer.capacity, group, m)
            layer.ablation = None if factors is None else factors.repeat_interleave(n, 0).to(engine.device)
        inputs = {k: v.repeat(copies, *([1] * (v.dim() - 1))).to(engine.device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        logits = engine(**inputs).logits
        per_example = per_example_loss(logits, labels).float().cpu().view(copies, n).mean(dim=1)
        return per_example.tolist()[: len(group)]

    def decide(self, scores_S: torch.Tensor, adapters: Adapters, bounds: Bounds, step: int) -> Plan:
        return alora_plan(
            live_scores(scores_S, adapters),
            [layer.live_slots() for _, layer in adapters],
            n_prune=self.cfg.alora.prune_per_round or len(adapters),
            floor=bounds.floor,
            cap_M=bounds.cap_M,
            cost_M=bounds.cost_M,
            unit=bounds.unit,
        )
