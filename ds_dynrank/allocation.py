"""Allocation decisions as pure functions: no process group, no DeepSpeed, no nn.Module.

Shapes legend: M = adapted modules (in `iter_lora` order), S = all current slots (sum of the modules' capacities).
A Plan says, per module, which of its current slots survive (`keep`), how many fresh slots it gains (`grow`) and,
for module allocation, whether the module trains until the next event (`active`).
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
    active: tuple[bool, ...] | None = None  # None: every module's activity stays as it is

    @property
    def ranks(self) -> list[int]:
        return [len(k) + g for k, g in zip(self.keep, self.grow)]

    def changes(self, live: list[list[int]], active: list[bool] | None = None) -> list[bool]:
        """Per module: does applying the plan alter it (its slots, or whether it trains)?"""
        moved = [tuple(k) != tuple(current) or g > 0 for k, current, g in zip(self.keep, live, self.grow)]
        if self.active is None or active is None:
            return moved
        return [m or a != b for m, a, b in zip(moved, self.active, active)]

    def slots_changed(self, live: list[list[int]]) -> int:
        """Slots killed plus slots born."""
        return sum(len(set(c) - set(k)) + g for k, c, g in zip(self.keep, live, self.grow))

    @staticmethod
    def wire_size(capacity_M: list[int]) -> int:
        """Entries of the encoded plan: a keep mask over the current slots [S], then grow [M] and active [M]."""
        return sum(capacity_M) + 2 * len(capacity_M)

    @staticmethod
    def receive_buffer(capacity_M: list[int]) -> torch.Tensor:
        """What the ranks that do not decide hand to the broadcast."""
        return torch.zeros(Plan.wire_size(capacity_M), dtype=torch.int64)

    def encode(self, capacity_M: list[int]) -> torch.Tensor:
        """Fixed-size int64 [S + 2M] tensor (keep mask over current slots, grow, active or -1): one broadcast."""
        keep_S = torch.zeros(sum(capacity_M), dtype=torch.int64)
        offsets = [0, *torch.tensor(capacity_M).cumsum(0).tolist()]
        for m, kept in enumerate(self.keep):
            keep_S[[offsets[m] + i for i in kept]] = 1
        active = [-1] * len(capacity_M) if self.active is None else [int(a) for a in self.active]
        return torch.cat([keep_S, torch.tensor(self.grow, dtype=torch.int64), torch.tensor(active)])

    @staticmethod
    def decode(flat: torch.Tensor, capacity_M: list[int]) -> Plan:
        S, M = sum(capacity_M), len(capacity_M)
        keep_S, grow_M, active_M = flat[:S], flat[S : S + M], flat[S + M : S + 2 * M].tolist()
        parts = keep_S.split(capacity_M)
        keep = tuple(tuple(torch.nonzero(p).flatten().tolist()) for p in parts)
        active = None if all(a == -1 for a in active_M) else tuple(bool(a) for a in active_M)
        return Plan(keep=keep, grow=tuple(grow_M.tolist()), active=active)

    def checksum(self) -> int:
        """A 63-bit digest compared across ranks after every event."""
        digest = hashlib.sha256(repr((self.keep, self.grow, self.active)).encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


def identity_plan(live: list[list[int]], active: list[bool] | None = None) -> Plan:
    """The plan that keeps everything as it is (with `active`: the allocation as it stands, for its checksum)."""
    return Plan(
        keep=tuple(tuple(x) for x in live),
        grow=tuple(0 for _ in live),
        active=None if active is None else tuple(active),
    )


def budget_used(ranks_M: list[int], cost_M: list[int], unit: str) -> int:
    """Total rank, or total adapter parameters (rank x cost of one rank) when the unit is params."""
    return sum(ranks_M) if unit == "rank" else sum(r * c for r, c in zip(ranks_M, cost_M))


def unspent(initial_budget: int, live: list[list[int]], cost_M: list[int], unit: str) -> int:
    """The parameter budget earlier events left unspent: under `unit="params"` a rank costs its module's
    in + out, so the freed parameters rarely buy ranks to the last one, and without handing the remainder on, the
    budget would fall a little at every event (1.2% over L1RA's 19 events at r1 on SmolLM2-135M). Rank budgets
    have nothing left over (0): their shrinking, where a method's paper has it, stays."""
    if unit == "rank":
        return 0
    return max(0, initial_budget - budget_used([len(s) for s in live], cost_M, unit))


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
    carry: int = 0,
) -> Plan:
    """L1RA (arXiv 2509.04884): prune live slots whose gate fell under `threshold` (each module keeps at least
    `floor`, its largest gates), then hand the freed budget back one rank at a time, round-robin over the modules
    that pruned nothing, ordered by their smallest gate, largest first (the reference code's order). With
    `unit="params"` a rank costs `cost_M[m]` parameters and a module takes one only while the freed parameters
    cover it (the cost-aware variant). If no module that pruned nothing has room, the others take the rest.
    `carry`: budget earlier events left unspent (see `unspent`), offered again with the freed budget.
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
    freed = carry + budget_used(pruned, cost_M, unit)
    order = sorted(range(len(live)), key=lambda m: (-min_gate[m], m))
    preferred = [m for m in order if not (exclude_pruned and pruned[m])]
    grow = round_robin(freed, (preferred, order), [len(k) for k in keep], cap_M=cap_M, cost_M=cost_M, unit=unit)
    return Plan(keep=tuple(keep), grow=tuple(grow))


def round_robin(
    freed: int, orders: tuple[list[int], ...], ranks_M: list[int], *, cap_M: list[int], cost_M: list[int], unit: str
) -> list[int]:
    """Hand `freed` budget back one rank at a time, cycling over each candidate order in turn (the next order
    only gets what the previous could not take): as even as possible, earlier modules first."""
    grow = [0] * len(ranks_M)
    for candidates in orders:
        while freed > 0:
            took = False
            for m in candidates:
                price = 1 if unit == "rank" else cost_M[m]
                if ranks_M[m] + grow[m] < cap_M[m] and price <= freed:
                    grow[m] += 1
                    freed -= price
                    took = True
            if not took:
                break
    return grow


def _prune_lowest(scores: list[torch.Tensor], live: list[list[int]], n: int, floor: int) -> list[list[int]]:
    """Remove the `n` live slots with the lowest score overall (ties: lower module, then slot index first),
    never taking a module below `floor`. Returns the survivors per module."""
    ranked = sorted((float(scores[m][i]), m, i) for m, slots in enumerate(live) for i in slots)
    keep = [list(slots) for slots in live]
    for _, m, i in ranked:
        if n == 0:
            break
        if len(keep[m]) > floor:
            keep[m].remove(i)
            n -= 1
    return keep


def alora_plan(
    importance: list[torch.Tensor],
    live: list[list[int]],
    *,
    n_prune: int,
    floor: int,
    cap_M: list[int],
    cost_M: list[int],
    unit: str = "rank",
    carry: int = 0,
) -> Plan:
    """ALoRA's round (arXiv 2403.16187, Algorithm 1): prune the `n_prune` live ranks of lowest AB-LoRA importance,
    then give the freed budget to the modules that lost none, as evenly as possible, modules of higher mean
    importance first (8 over 3 modules: 3/3/2). With no such module (or no room under the caps) the budget
    shrinks, as in the paper. `carry`: budget earlier events left unspent (see `unspent`), offered again."""
    keep = _prune_lowest(importance, live, n_prune, floor)
    pruned = [len(a) - len(k) for a, k in zip(live, keep)]
    freed = carry + budget_used(pruned, cost_M, unit)
    mean = [float(importance[m][slots].mean()) if slots else float("-inf") for m, slots in enumerate(live)]
    untouched = sorted((m for m in range(len(live)) if not pruned[m]), key=lambda m: (-mean[m], m))
    grow = round_robin(freed, (untouched,), [len(k) for k in keep], cap_M=cap_M, cost_M=cost_M, unit=unit)
    return Plan(keep=tuple(tuple(k) for k in keep), grow=tuple(grow))


def cubic_budget(step: int, *, initial: int, target: int, tinit: int, tfinal: int, total: int) -> int:
    """AdaLoRA's budget schedule (arXiv 2303.10512, PEFT's budget_schedule): the initial budget until `tinit`,
    then a cubic decay to `target`, reached `tfinal` steps before the end and held there."""
    if step <= tinit:
        return initial
    if step > total - tfinal:
        return target
    progress = 1 - (step - tinit) / max(1, total - tfinal - tinit)
    return int(target + (initial - target) * progress**3)


def top_budget_plan(scores: list[torch.Tensor], live: list[list[int]], *, budget: int, floor: int) -> Plan:
    """Keep the `budget` live slots of highest score overall (each module keeps at least `floor`): AdaLoRA's
    global threshold on triplet scores. Prune only: a plan never grows."""
    excess = max(0, sum(len(s) for s in live) - budget)
    keep = _prune_lowest(scores, live, excess, floor)
    return Plan(keep=tuple(tuple(k) for k in keep), grow=tuple(0 for _ in live))


def proportional_ranks(
    importance_M: torch.Tensor, *, budget: int, floor: int, cap_M: list[int], cost_M: list[int]
) -> list[int]:
    """GoRA's allocation (arXiv 2502.12171): each module's share of the budget follows its normalised importance,
    r_m ~ budget * I_m / sum(I) / cost_m, clamped to [floor, cap_m]. Unlike the paper's plain round-and-clamp, the
    budget is held: the scale is solved (bisection) so the clamped shares fill it, then ranks are floored and the
    rest handed out one rank at a time, largest shortfall first, while a rank still fits. The total never exceeds
    `budget`, and misses it by less than one rank of some module with room. Needs floor x sum(cost) <= budget."""
    share = importance_M.double().clamp_min(0)
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / len(share))
    cost = torch.tensor(cost_M, dtype=torch.float64)
    lo_M, hi_M = torch.full_like(cost, float(floor)), torch.tensor(cap_M, dtype=torch.float64)

    def ideal(scale: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(scale * share / cost, lo_M), hi_M)

    lo, hi = 0.0, float(budget)  # at scale = budget no module is below its share, unless capped
    for _ in range(64):  # capped modules leave their share to the others: raise the scale until it fills
        if float((ideal(hi) * cost).sum()) >= budget:
            break
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((ideal(mid) * cost).sum()) < budget else (lo, mid)
    x_M = ideal(hi).tolist()
    ranks = [max(floor, min(cap, int(x + 1e-9))) for x, cap in zip(x_M, cap_M)]
    left = budget - sum(r * c for r, c in zip(ranks, cost_M))
    while True:
        fits = [m for m in range(len(ranks)) if ranks[m] < cap_M[m] and cost_M[m] <= left]
        if not fits:
            return ranks
        m = max(fits, key=lambda m: (x_M[m] - ranks[m], -m))
        ranks[m] += 1
        left -= cost_M[m]


def plan_for_ranks(ranks_M: list[int], live: list[list[int]]) -> Plan:
    """The plan that takes every module to `ranks_M[m]`: a shrinking module keeps its first live slots, a growing
    one keeps them all and gains fresh ones."""
    keep = tuple(tuple(slots[: min(r, len(slots))]) for r, slots in zip(ranks_M, live))
    return Plan(keep=keep, grow=tuple(max(0, r - len(slots)) for r, slots in zip(ranks_M, live)))


def random_plan(
    live: list[list[int]],
    *,
    moves: int,
    generator: torch.Generator,
    floor: int,
    cap_M: list[int],
    cost_M: list[int],
    unit: str = "rank",
    carry: int = 0,
) -> Plan:
    """The random control arm: the move sizes of a dynamic method, the decisions drawn at random (`generator`).

    Prune up to `moves` live slots one draw at a time, each uniform over the live slots of the modules above
    `floor` (only those whose pruning leaves the untouched modules room enough to take back every slot pruned so
    far), then grow slots one draw at a time, each uniform over the modules that lost nothing in this event, have
    room under `cap_M` and whose rank fits in what the pruning freed and growth has not spent, until nothing fits.
    A rank budget is held exactly: as many slots born as pruned. With `unit="params"` a rank of module m costs
    `cost_M[m]`: the freed parameters buy as many ranks as they cover (L1RA's cost-aware rule), so the budget never
    rises, and what is left unspent buys no rank of any untouched module with room; `carry` (budget earlier events
    left unspent, see `unspent`) is offered again with it. Fewer moves only where no more are possible."""
    ranks = [len(slots) for slots in live]
    keep = [list(slots) for slots in live]
    room = [max(0, cap - r) for cap, r in zip(cap_M, ranks)]
    pruned = [0] * len(live)

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=generator).item())

    for n in range(moves):  # n slots pruned so far; the untouched modules must be able to take back n + 1
        free = sum(r for r, p in zip(room, pruned) if not p)
        candidates = [
            (m, i) for m, k in enumerate(keep) if len(k) > floor and free - (0 if pruned[m] else room[m]) > n for i in k
        ]
        if not candidates:
            break
        m, i = candidates[draw(len(candidates))]
        keep[m].remove(i)
        pruned[m] += 1
    price = [1 if unit == "rank" else c for c in cost_M]
    left = carry + budget_used(pruned, cost_M, unit)
    grow = [0] * len(live)
    while True:
        takers = [m for m in range(len(live)) if not pruned[m] and grow[m] < room[m] and price[m] <= left]
        if not takers:
            break
        m = takers[draw(len(takers))]
        grow[m] += 1
        left -= price[m]
    return Plan(keep=tuple(tuple(k) for k in keep), grow=tuple(grow))
