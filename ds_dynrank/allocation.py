"""Allocation decisions as pure functions: no process group, no DeepSpeed, no nn.Module.

Shapes legend: M = adapted modules (in `iter_lora` order), S = all current slots (sum of the modules' capacities).
A Plan says, per module, which of its current slots survive (`keep`) and how many fresh slots it gains (`grow`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One collective decision, identical on every rank (rank 0 takes it, everyone receives it)."""

    keep: tuple[tuple[int, ...], ...]
    grow: tuple[int, ...]

    @property
    def ranks(self) -> list[int]:
        return [len(k) + g for k, g in zip(self.keep, self.grow)]

    def changes(self, live: list[list[int]]) -> list[bool]:
        """Per module: does applying the plan alter it?"""
        return [tuple(k) != tuple(current) or g > 0 for k, current, g in zip(self.keep, live, self.grow)]

    def slots_changed(self, live: list[list[int]]) -> int:
        """Slots killed plus slots born."""
        return sum(len(set(c) - set(k)) + g for k, c, g in zip(self.keep, live, self.grow))

    def encode(self, capacity_M: list[int]) -> torch.Tensor:
        """Fixed-size int64 [S + M] tensor (keep mask over current slots, then grow): one broadcast."""
        keep_S = torch.zeros(sum(capacity_M), dtype=torch.int64)
        offsets = [0, *torch.tensor(capacity_M).cumsum(0).tolist()]
        for m, kept in enumerate(self.keep):
            keep_S[[offsets[m] + i for i in kept]] = 1
        return torch.cat([keep_S, torch.tensor(self.grow, dtype=torch.int64)])

    @staticmethod
    def decode(flat: torch.Tensor, capacity_M: list[int]) -> Plan:
        keep_S, grow_M = flat[: sum(capacity_M)], flat[sum(capacity_M) :]
        parts = keep_S.split(capacity_M)
        keep = tuple(tuple(torch.nonzero(p).flatten().tolist()) for p in parts)
        return Plan(keep=keep, grow=tuple(grow_M.tolist()))

    def checksum(self) -> int:
        """A 63-bit digest compared across ranks after every event."""
        digest = hashlib.sha256(repr((self.keep, self.grow)).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


def identity_plan(live: list[list[int]]) -> Plan:
    return Plan(keep=tuple(tuple(x) for x in live), grow=tuple(0 for _ in live))


def budget_used(ranks_M: list[int], cost_M: list[int], unit: str) -> int:
    """Total rank, or total adapter parameters (rank x cost of one rank) when the unit is params."""
    return sum(ranks_M) if unit == "rank" else sum(r * c for r, c in zip(ranks_M, cost_M))


def l1ra_plan(
    gates: list[torch.Tensor],
    live: list[list[int]],
    *,
    threshold: float,
    floor: int,
    cap_M: list[int],
    cost_M: list[int],
    unit: str = "rank",
    exclude_pruned: bool = True,
) -> Plan:
    """L1RA (arXiv 2509.04884): prune live slots whose gate fell under `threshold` (each module keeps at least
    `floor`, its largest gates), then hand the freed budget back one rank at a time, round-robin over the modules
    that pruned nothing, ordered by their smallest gate, largest first (the reference code's order). With
    `unit="params"` a rank costs `cost_M[m]` parameters and a module takes one only while the freed parameters
    cover it (the cost-aware variant). If no module that pruned nothing has room, the others take the rest.
    """
    keep, pruned, min_gate = [], [], []
    for g, slots in zip(gates, live):
        alive = sorted(slots, key=lambda i: (-float(g[i]), i))  # largest gate first, stable by index
        survivors = [i for i in alive if float(g[i]) >= threshold]
        if len(survivors) < floor:
            survivors = alive[:floor]
        keep.append(tuple(sorted(survivors)))
        pruned.append(len(slots) - len(survivors))
        min_gate.append(min((float(g[i]) for i in survivors), default=0.0))
    freed = sum(p * (1 if unit == "rank" else c) for p, c in zip(pruned, cost_M))
    ranks = [len(k) for k in keep]
    grow = [0] * len(live)
    order = sorted(range(len(live)), key=lambda m: (-min_gate[m], m))
    preferred = [m for m in order if not (exclude_pruned and pruned[m])]
    for candidates in (preferred, order):
        while freed > 0:
            took = False
            for m in candidates:
                price = 1 if unit == "rank" else cost_M[m]
                if ranks[m] + grow[m] < cap_M[m] and price <= freed:
                    grow[m] += 1
                    freed -= price
                    took = True
            if not took:
                break
    return Plan(keep=tuple(keep), grow=tuple(grow))
