"""Pure allocation: L1RA's prune-and-reassign conserves the budget within floors and caps, follows the reference
order, is deterministic; plans survive the broadcast encoding; the schedule fires where it should."""

from __future__ import annotations

import random

import pytest
import torch

from ds_dynrank.allocation import Plan, alora_plan, budget_used, identity_plan, l1ra_plan, random_plan, unspent
from ds_dynrank.schedule import Schedule, resolve_schedule


def _gates(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(r) for r in rows]


def test_prunes_zero_gates_and_round_robins_over_modules_that_pruned_nothing():
    gates = _gates([0.0, 0.9, 0.0, 0.5], [0.7, 0.8, 0, 0], [0.2, 0.3, 0, 0], [0.6, 0.0, 0, 0])
    live = [[0, 1, 2, 3], [0, 1], [0, 1], [0, 1]]
    plan = l1ra_plan(gates, live, threshold=1e-3, floor=1, cap_M=[4] * 4, cost_M=[1] * 4)
    assert plan.keep == ((1, 3), (0, 1), (0, 1), (0,))
    # 3 freed; candidates that pruned nothing, by smallest gate (largest first): module 1 (0.7), module 2 (0.2)
    assert plan.grow == (0, 2, 1, 0)
    assert sum(plan.ranks) == sum(len(x) for x in live)


def test_floor_keeps_the_largest_gates_and_caps_push_the_rest_elsewhere():
    gates = _gates([0.0, 0.0, 0.0, 0.0], [0.5, 0.6, 0, 0], [0.4, 0.3, 0.2, 0.1])
    live = [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]
    plan = l1ra_plan(gates, live, threshold=1e-3, floor=2, cap_M=[4, 3, 4], cost_M=[1, 1, 1])
    assert plan.keep[0] == (0, 1)  # floor 2: ties broken by slot index
    # 2 freed: module 1 reaches its cap (3), module 2 is at its cap (4), so the pruning module takes one back
    assert plan.ranks == [3, 3, 4]
    assert plan.grow == (1, 1, 0)
    plan = l1ra_plan(gates, live, threshold=1e-3, floor=2, cap_M=[4, 3, 5], cost_M=[1, 1, 1])
    assert plan.ranks == [2, 3, 5]


def test_params_budget_is_cost_aware():
    gates = _gates([0.0, 0.9], [0.5, 0.5], [0.4, 0.4])
    live = [[0, 1], [0, 1], [0, 1]]
    cost = [100, 60, 30]
    plan = l1ra_plan(gates, live, threshold=1e-3, floor=1, cap_M=[8] * 3, cost_M=cost, unit="params")
    # 100 params freed: module 1 (60) then module 2 (30), then 10 left: nothing costs that little
    assert plan.grow == (0, 1, 1)
    assert budget_used(plan.ranks, cost, "params") <= budget_used([2, 2, 2], cost, "params")


@pytest.mark.parametrize("seed", range(20))
def test_random_cases_hold_every_invariant(seed):
    rng = random.Random(seed)
    m = rng.randint(2, 12)
    capacity = [rng.randint(2, 8) for _ in range(m)]
    live = [sorted(rng.sample(range(c), rng.randint(1, c))) for c in capacity]
    gates = [torch.tensor([rng.choice([0.0, rng.random()]) for _ in range(c)]) for c in capacity]
    cost = [rng.randint(1, 50) for _ in range(m)]
    floor = rng.randint(0, 1)
    for unit in ("rank", "params"):
        plan = l1ra_plan(gates, live, threshold=0.05, floor=floor, cap_M=capacity, cost_M=cost, unit=unit)
        before, after = [len(x) for x in live], plan.ranks
        assert all(set(k) <= set(x) for k, x in zip(plan.keep, live))  # keeps only live slots
        assert all(floor <= r or r == b for r, b in zip(after, before))
        assert all(r <= c or g == 0 for r, c, g in zip(after, capacity, plan.grow))
        assert budget_used(after, cost, unit) <= budget_used(before, cost, unit)
        if unit == "rank" and sum(capacity) >= sum(before):
            room = sum(c - len(k) for c, k in zip(capacity, plan.keep))
            assert sum(after) == sum(before) or sum(plan.grow) == room  # conserved unless every module is full
        again = l1ra_plan(gates, live, threshold=0.05, floor=floor, cap_M=capacity, cost_M=cost, unit=unit)
        assert again == plan


def test_plan_encoding_round_trip_and_checksum():
    plan = Plan(keep=((0, 2), (), (1,)), grow=(1, 2, 0))
    capacity = [3, 2, 4]
    assert Plan.decode(plan.encode(capacity), capacity) == plan
    assert plan.ranks == [3, 2, 1]
    other = Plan(keep=((0, 2), (), (2,)), grow=(1, 2, 0))
    assert plan.checksum() != other.checksum()
    live = [[0, 1, 2], [0, 1], [1]]
    assert plan.slots_changed(live) == 1 + 1 + 2 + 2
    assert identity_plan(live).changes(live) == [False, False, False]


def test_schedule():
    s = Schedule(start=5, interval=5, stop=20)
    assert [t for t in range(30) if s.due(t)] == [5, 10, 15, 20] == s.events()
    auto = resolve_schedule(None, None, None, total_steps=100, interval_ratio=0.05)
    assert auto == Schedule(start=5, interval=5, stop=99)
    assert resolve_schedule(2, 3, 4, total_steps=100, interval_ratio=0.05).events() == [2]


COSTS = [5, 7, 11, 13] * 3  # a rank's parameters per module: no freed sum buys ranks to the last parameter


def _events(plan_of, carried: bool, events: int = 20) -> list[int]:
    """The parameters in use after each of `events` prune-and-regrow events from rank 2 everywhere."""
    g = torch.Generator().manual_seed(0)
    live, initial, used = [[0, 1] for _ in COSTS], budget_used([2] * len(COSTS), COSTS, "params"), []
    for _ in range(events):
        carry = unspent(initial, live, COSTS, "params") if carried else 0
        plan = plan_of([torch.rand(4, generator=g) for _ in COSTS], live, g, carry)
        live = [list(range(len(k) + n)) for k, n in zip(plan.keep, plan.grow)]
        used.append(budget_used([len(s) for s in live], COSTS, "params"))
    return used


PARAMS = {"cap_M": [4] * len(COSTS), "cost_M": COSTS, "unit": "params", "floor": 0}
PLANS = {
    "l1ra": lambda gates, live, g, carry: l1ra_plan(gates, live, threshold=0.3, carry=carry, **PARAMS),
    "alora": lambda imp, live, g, carry: alora_plan(imp, live, n_prune=3, carry=carry, **PARAMS),
    "random": lambda _, live, g, carry: random_plan(live, moves=3, generator=g, carry=carry, **PARAMS),
}


@pytest.mark.parametrize("method", sorted(PLANS))
def test_a_parameter_budget_is_held_over_many_events_not_worn_down_by_remainders(method):
    initial = budget_used([2] * len(COSTS), COSTS, "params")
    held = _events(PLANS[method], carried=True)
    assert all(initial - max(COSTS) < used <= initial for used in held), held  # within one rank, every event
    assert min(_events(PLANS[method], carried=False)) < initial - max(COSTS)  # what the remainders cost without


def test_only_a_parameter_budget_carries_what_events_left_unspent():
    live = [[0, 1], [0]]
    assert unspent(3 * 2 + 5 * 2, live, [3, 5], "params") == 5  # one rank of the second module not spent
    assert unspent(4, live, [3, 5], "rank") == 0  # a rank budget's shrinking (ALoRA's paper) stays
    assert unspent(1, live, [3, 5], "params") == 0  # never negative
