"""The masked backend: each module keeps a fixed capacity of slots, and a broadcast Plan edits parameters, fp32
masters and Adam moments in place, identically on every rank.
 Killed slots get A row, B column, gate and both
moments set to exactly 0 and are masked, so Adam leaves them at 0. Born slots get fresh A rows from a generator
seeded by (seed, step, module index) (the same draws on every rank), B = 0 (function-preserving), gate 1 and
zero moments. Surviving slots are written back with the values they were read with: bit for bit unchanged.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.backends.base import Attachment, Backend, SlotMap, slot_generator
from ds_dynrank.lora import SLOT_DIM, LoRALinear
from ds_dynrank.zero import FullState, StateIO


def _edit(state: FullState, dim: int, zero: list[int], fill: dict[int, torch.Tensor] | None = None) -> FullState:
    """Zero `zero` slots (value and moments) along `dim`, then write `fill` values into their slots."""
    for t in (state.value, state.exp_avg, state.exp_avg_sq):
        t.index_fill_(dim, torch.tensor(zero, dtype=torch.long), 0.0)
    for slot, value in (fill or {}).items():
        state.value.select(dim, slot).copy_(value)
    return state


def split_slots(layer: LoRALinear, keep: tuple[int, ...], grow: int) -> tuple[list[int], list[int]]:
    """(killed, born) slot indices. Born slots reuse long-dead slots first, then slots killed just now."""
    live, kept = layer.live_slots(), set(keep)
    free = [i for i in range(layer.capacity) if i not in kept and i not in live]
    free += [i for i in live if i not in kept]
    if grow > len(free):
        raise ValueError(f"plan grows a module by {grow} but only {len(free)} slots are free (capacity)")
    born = free[:grow]
    killed = [i for i in live if i not in kept and i not in born]
    return killed, born


def apply_masked(plan: Plan, adapters: list[tuple[str, LoRALinear]], io: StateIO, *, seed: int, step: int) -> int:
    """Kill and revive slots in place. Returns the number of modules changed. Collective: every rank reads the
    changed modules' states together (three collectives in all) and writes back only what it holds."""
    work = []
    for m, ((_, layer), keep, grow) in enumerate(zip(adapters, plan.keep, plan.grow)):
        killed, born = split_slots(layer, keep, grow)
        if killed or born:
            work.append((m, layer, keep, killed, born))
    states = iter(io.read_many([p for _, layer, *_ in work for p in layer.adapter_tensors().values()]))
    for m, layer, keep, killed, born in work:
        touched = killed + born
        rows = layer.init_rows(len(born), slot_generator(seed, step, m))
        fills = {"lora_A": dict(zip(born, rows)), "lora_B": {}, "lora_gate": {s: torch.tensor(1.0) for s in born}}
        for key, tensor in layer.adapter_tensors().items():
            io.write(tensor, _edit(next(states), SLOT_DIM[key], touched, fills[key]))
        mask = torch.zeros(layer.capacity, dtype=layer.rank_mask.dtype)
        mask[list(keep) + born] = 1
        with torch.no_grad():
            layer.rank_mask.copy_(mask.to(layer.rank_mask.device))
    return len(work)


def apply_activity(active: tuple[bool, ...], adapters: list[tuple[str, LoRALinear]], io: StateIO) -> None:
    """Masked backend, module allocation: modules going inactive keep their values but lose their Adam moments
    (held at zero from now on, so Adam moves nothing while no gradient arrives); modules coming back start from
    zero moments. Collective: every rank reads the deactivated modules together."""
    leaving = [
        p
        for (_, layer), on in zip(adapters, active)
        if layer.trainable and not on
        for p in layer.adapter_tensors().values()
    ]
    for p, state in zip(leaving, io.read_many(leaving)):
        state.exp_avg.zero_()
        state.exp_avg_sq.zero_()
        io.write(p, state)
    for (_, layer), on in zip(adapters, active):
        layer.set_trainable(on)


class MaskedBackend(Backend):
    """Fixed capacity per module, slots killed and revived in place: the engine is never rebuilt."""

    name = "masked"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def default_cap(self, layer: LoRALinear) -> int:
        return layer.capacity

    def prepare(self, adapters, active: list[bool]) -> None:
        for (_, layer), on in zip(adapters, active):
            layer.set_trainable(on)

    def resize_for_resume(self, model, adapters, ranks: dict[str, int], active: dict[str, bool]):
        return adapters  # the rank masks are buffers DeepSpeed's checkpoint restores; activity comes with the state

    def apply(self, plan: Plan, attached: Attachment, *, step: int, groups) -> SlotMap:
        apply_masked(plan, attached.adapters, attached.io, seed=self.seed, step=step)
        if plan.active is not None:
            apply_activity(plan.active, attached.adapters, attached.io)
        return SlotMap.in_place(plan, [layer.capacity for _, layer in attached.adapters])
