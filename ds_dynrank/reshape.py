"""Apply a broadcast Plan to the adapters: parameters, fp32 masters and Adam moments, identically on every rank.

Masked backend: each module keeps a fixed capacity of slots. Killed slots get A row, B column, gate and both
moments set to exactly 0 and are masked, so Adam leaves them at 0. Born slots get fresh A rows from a generator
seeded by (seed, step, module index) (the same draws on every rank), B = 0 (function-preserving), gate 1 and
zero moments. Surviving slots are written back with the values they were read with: bit for bit unchanged.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.lora import SLOT_DIM, LoRALinear, iter_lora
from ds_dynrank.zero import FullState, StateIO


def slot_generator(seed: int, step: int, module_index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + module_index)


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
    leaving = [p for (_, layer), on in zip(adapters, active) if layer.trainable and not on
               for p in layer.adapter_tensors().values()]  # fmt: skip
    for p, state in zip(leaving, io.read_many(leaving)):
        state.exp_avg.zero_()
        state.exp_avg_sq.zero_()
        io.write(p, state)
    for (_, layer), on in zip(adapters, active):
        layer.set_trainable(on)


def physical_layers(plan: Plan, adapters: list[tuple[str, LoRALinear]], states: list[FullState], *, seed: int,
                    step: int) -> list[tuple[LoRALinear, list[FullState]]]:  # fmt: skip
    """New layers whose shapes are the plan's ranks: surviving slots first (values and moments carried bit for
    bit), then born slots (seeded A rows, B = 0, gate 1, zero moments). `states` holds every adapter tensor's
    full state in iteration order (A, B, gate per module)."""
    out, states_iter = [], iter(states)
    for m, ((_, layer), keep, grow) in enumerate(zip(adapters, plan.keep, plan.grow)):
        new = layer.resized(len(keep) + grow)
        rows = layer.init_rows(grow, slot_generator(seed, step, m))
        carried = []
        for key, target in new.adapter_tensors().items():
            dim, old = SLOT_DIM[key], next(states_iter)
            index = torch.tensor(keep, dtype=torch.long)
            born_shape = list(old.value.shape)
            born_shape[dim] = grow
            fresh = {"lora_A": rows, "lora_B": torch.zeros(born_shape), "lora_gate": torch.ones(grow)}[key]
            zeros = torch.zeros(born_shape)
            state = FullState(
                torch.cat([old.value.index_select(dim, index), fresh], dim),
                torch.cat([old.exp_avg.index_select(dim, index), zeros], dim),
                torch.cat([old.exp_avg_sq.index_select(dim, index), zeros], dim),
            )
            with torch.no_grad():
                target.copy_(state.value.to(target.dtype))
            carried.append(state)
        out.append((new, carried))
    return out


def swap_layers(model, adapters: list[tuple[str, LoRALinear]], layers: list[LoRALinear]) -> None:
    """Put the new layers where the old ones were (same names, so the iteration order is unchanged)."""
    for (name, _), layer in zip(adapters, layers):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)


def resize_to(model, adapters: list[tuple[str, LoRALinear]], ranks: dict[str, int]) -> list[tuple[str, LoRALinear]]:
    """Physical backend, before the engine exists: layers at the given ranks (values come from a checkpoint)."""
    swap_layers(model, adapters, [layer.resized(ranks[name]) for name, layer in adapters])
    return iter_lora(model)
