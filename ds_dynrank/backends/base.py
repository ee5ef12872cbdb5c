"""What every backend shares, and what methods may know of a reshape: where each slot went (`SlotMap`).

Pure: no process group, no DeepSpeed, so methods can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_dynrank.allocation import Plan


def slot_generator(seed: int, step: int, module_index: int) -> torch.Generator:
    """The draws of a module's born slots at an event: the same on every rank, different for every (step, module)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + module_index)


@dataclass(frozen=True)
class SlotMap:
    """After an event, per module: `sources[m][j]` is the old slot whose state new slot j carries, or None (born,
    or dead). The number of entries is the module's new slot capacity."""

    sources: tuple[tuple[int | None, ...], ...]

    @staticmethod
    def in_place(plan: Plan, capacity_M: list[int]) -> SlotMap:
        """Masked backend: capacities stay; kept slots stay where they are, every other slot starts empty."""
        kept = [set(k) for k in plan.keep]
        return SlotMap(tuple(tuple(j if j in k else None for j in range(c)) for k, c in zip(kept, capacity_M)))

    @staticmethod
    def compacted(plan: Plan) -> SlotMap:
        """Physical backend: kept slots first, in order, then the born ones."""
        return SlotMap(tuple((*k, *([None] * g)) for k, g in zip(plan.keep, plan.grow)))

    def carry(self, m: int, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Module m's per-slot tensor `t` (slots along `dim`) moved to the new slots; empty slots hold zeros."""
        sources = self.sources[m]
        shape = list(t.shape)
        shape[dim] = len(sources)
        out = torch.zeros(shape, dtype=t.dtype)
        new = [j for j, s in enumerate(sources) if s is not None]
        if new:
            old = torch.tensor([sources[j] for j in new], dtype=torch.long)
            out.index_copy_(dim, torch.tensor(new, dtype=torch.long), t.index_select(dim, old))
        return out


@dataclass
class Attachment:
    """What a controller drives and an event may replace: the engine, its state accessor and the adapters (in
    `iter_lora` order). The physical backend swaps them here, and nowhere else; nothing else keeps the old ones."""

    engine: object
    io: object
    adapters: list


class Backend:
    """One apply per event. `swaps_engine`: does an event replace the DeepSpeed engine (callers that hold the engine
    themselves, such as HF Trainer, cannot follow that)."""

    name = ""
    swaps_engine = False

    def default_cap(self, layer) -> int:
        """The most rank a module may reach when budget.cap is unset."""
        raise NotImplementedError

    def prepare(self, adapters, active: list[bool]) -> None:
        """Before the first engine exists: which modules train."""
        raise NotImplementedError

    def resize_for_resume(self, model, adapters, ranks: dict[str, int], active: dict[str, bool]):
        """Before the engine exists on a resumed run: layers shaped as the checkpoint saved them. Returns the
        adapters."""
        raise NotImplementedError

    def apply(self, plan: Plan, attached: Attachment, *, step: int, groups) -> SlotMap:
        """Apply a broadcast plan on every rank, in module order, updating `attached` where it replaces something.
        `groups(adapters)` gives the optimizer groups an engine rebuild needs."""
        raise NotImplementedError
