"""Apply a broadcast Plan to the adapters: parameters, fp32 masters and Adam moments, identically on every rank.

Masked backend: each module keeps a fixed capacity of slots. Killed slots get A row, B column, gate and both
moments set to exactly 0 and are masked, so Adam leaves them at 0. Born slots get fresh A rows from a generator
seeded by (seed, step, module index) (the same draws on every rank), B = 0 (function-preserving), gate 1 and
zero moments. Surviving slots are written back with the values they were read with: bit for bit unchanged.
"""

from __future__ import annotations

import torch

from ds_dynrank.allocation import Plan
from ds_dynrank.lora import LoRALinear
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
    tensors = [(layer, key, dim) for _, layer, *_ in work for key, dim in _TENSORS if getattr(layer, key) is not None]
    states = iter(io.read_many([getattr(layer, key) for layer, key, _ in tensors]))
    for m, layer, keep, killed, born in work:
        touched = killed + born
        rows = layer.init_rows(len(born), slot_generator(seed, step, m))
        fills = {"lora_A": dict(zip(born, rows)), "lora_B": {}, "lora_gate": {s: torch.tensor(1.0) for s in born}}
        for key, dim in _TENSORS:
            if getattr(layer, key) is not None:
                io.write(getattr(layer, key), _edit(next(states), dim, touched, fills[key]))
        mask = torch.zeros(layer.capacity, dtype=layer.rank_mask.dtype)
        mask[list(keep) + born] = 1
        with torch.no_grad():
            layer.rank_mask.copy_(mask.to(layer.rank_mask.device))
    return len(work)


_TENSORS = (("lora_A", 0), ("lora_B", 1), ("lora_gate", 0))  # each tensor and its slot dimension


def apply_plan(plan: Plan, adapters: list[tuple[str, LoRALinear]], io: StateIO, *, backend: str, seed: int,
               step: int) -> int:  # fmt: skip
    """The one entry point for every backend."""
    if backend == "masked":
        return apply_masked(plan, adapters, io, seed=seed, step=step)
    raise ValueError(f"reshape.backend {backend!r} is not available")
