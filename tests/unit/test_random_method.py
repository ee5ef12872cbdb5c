"""The random control arm, as pure decisions: exactly `moves` slots pruned and as many grown, within floor and caps,
the budget held (rank) or never exceeded (params), no slot given back to a module that lost one in the same event,
the same draws for the same seed and step, a per-event list of moves honoured, fewer moves only where no more are
possible; and its config refusals."""

from __future__ import annotations

import random

import pytest
import torch

from ds_dynrank.allocation import Plan, budget_used, random_plan
from ds_dynrank.config import from_ds_config
from ds_dynrank.errors import UserInputError
from ds_dynrank.methods.base import Bounds, Event, build_method


def _plan(live, moves, *, floor=1, cap_M=None, cost_M=None, unit="rank", seed=0) -> Plan:
    cap_M = cap_M or [2 * len(s) for s in live]
    cost_M = cost_M or [1] * len(live)
    g = torch.Generator().manual_seed(seed)
    return random_plan(live, moves=moves, generator=g, floor=floor, cap_M=cap_M, cost_M=cost_M, unit=unit)


def _pruned(plan: Plan, live) -> list[int]:
    return [len(s) - len(k) for s, k in zip(live, plan.keep)]


def _check_bounds(plan: Plan, live, floor, cap_M) -> None:
    for k, s, rank, cap in zip(plan.keep, live, plan.ranks, cap_M):
        assert set(k) <= set(s) and list(k) == sorted(k)  # survivors are live slots, in order
        assert floor <= rank <= max(cap, len(s))
    for pruned, grown in zip(_pruned(plan, live), plan.grow):
        assert not (pruned and grown), "a module got back a slot it lost in the same event"


def test_moves_exactly_the_asked_slots_and_holds_the_rank_budget():
    live = [list(range(4)) for _ in range(6)]
    plan = _plan(live, 5)
    assert sum(_pruned(plan, live)) == 5 and sum(plan.grow) == 5
    assert plan.slots_changed(live) == 10 and sum(plan.ranks) == 24
    _check_bounds(plan, live, 1, [8] * 6)


def test_random_cases_respect_floor_caps_budget_and_exclusion():
    rng, complete = random.Random(0), 0
    for case in range(300):
        n = rng.randint(1, 7)
        floor = rng.randint(0, 2)
        live = [sorted(rng.sample(range(12), rng.randint(floor, 6))) for _ in range(n)]
        cap_M = [max(len(s), rng.randint(1, 9)) for s in live]
        moves = rng.randint(1, 10)
        plan = _plan(live, moves, floor=floor, cap_M=cap_M, seed=case)
        _check_bounds(plan, live, floor, cap_M)
        pruned = sum(_pruned(plan, live))
        assert pruned <= moves and sum(plan.grow) == pruned, (case, live, cap_M, plan)
        assert sum(plan.ranks) == sum(len(s) for s in live)
        complete += pruned == moves
        if pruned < moves:  # it stopped short: no module left whose pruning the untouched ones could take back
            untouched_room = sum(c - len(s) for c, s, p in zip(cap_M, live, _pruned(plan, live)) if not p)
            for k, s, c in zip(plan.keep, live, cap_M):
                room = untouched_room - (0 if len(k) < len(s) else c - len(s))
                assert len(k) <= floor or room <= pruned, (case, live, cap_M, plan)
    assert 100 < complete < 300  # both kinds of case were drawn


def test_fewer_moves_only_where_no_more_are_possible():
    # only module 0 is above the floor (2 slots to give), and the others have room for 4: two moves
    live = [[0, 1, 2], [0], [0]]
    plan = _plan(live, 10, cap_M=[3, 3, 3])
    assert _pruned(plan, live) == [2, 0, 0] and sum(plan.grow) == 2 and plan.ranks[0] == 1
    # every module at the floor: nothing moves
    assert _plan([[0], [3]], 4).slots_changed([[0], [3]]) == 0
    # the only module with room is the only one to prune from: it may not take its slot back, so nothing moves
    live = [[0, 1, 2, 3], [0]]
    assert _plan(live, 3, cap_M=[8, 1]).slots_changed(live) == 0
    live = [[0, 1, 2, 3], [0, 1]]
    # module 1 can give one (floor 1) to module 0, whatever the seed; module 0 may not give (no one takes it back)
    for seed in range(10):
        plan = _plan(live, 3, cap_M=[8, 2], seed=seed)
        assert plan.keep[0] == (0, 1, 2, 3) and len(plan.keep[1]) == 1 and plan.grow == (1, 0), plan


def test_params_budget_is_held_with_equal_costs_and_never_grows_otherwise():
    live = [list(range(4)) for _ in range(5)]
    plan = _plan(live, 4, cost_M=[7] * 5, unit="params")
    assert sum(_pruned(plan, live)) == 4 and sum(plan.grow) == 4
    assert budget_used(plan.ranks, [7] * 5, "params") == 4 * 5 * 7
    rng = random.Random(1)
    for case in range(300):
        n = rng.randint(2, 6)
        live = [list(range(rng.randint(1, 5))) for _ in range(n)]
        cost_M = [rng.choice([48, 64, 96]) for _ in range(n)]
        cap_M = [2 * len(s) + rng.randint(0, 2) for s in live]
        moves = rng.randint(1, 6)
        plan = _plan(live, moves, cost_M=cost_M, cap_M=cap_M, unit="params", seed=case)
        _check_bounds(plan, live, 1, cap_M)
        pruned = _pruned(plan, live)
        assert sum(pruned) <= moves
        before, after = budget_used([len(s) for s in live], cost_M, "params"), budget_used(plan.ranks, cost_M, "params")
        assert after <= before, (case, plan)  # the budget never grows
        left = sum(p * c for p, c in zip(pruned, cost_M)) - sum(g * c for g, c in zip(plan.grow, cost_M))
        assert left == before - after
        untouched = [m for m, p in enumerate(pruned) if not p]
        # growth stopped only where what is left buys no rank of an untouched module with room
        assert all(plan.ranks[m] >= cap_M[m] or cost_M[m] > left for m in untouched), (case, plan)
    # a cheap rank freed buys no dear one: module 1 (4 parameters a rank) gives, module 0 (10) cannot be paid
    live, cost_M = [[0], [0, 1]], [10, 4]
    plan = _plan(live, 1, cap_M=[3, 2], cost_M=cost_M, unit="params")
    assert plan.keep[0] == (0,) and len(plan.keep[1]) == 1 and plan.grow == (0, 0)
    # a dear rank freed buys several cheap ones
    live, cost_M = [[0, 1], [0], [0]], [12, 4, 4]
    plan = _plan(live, 1, cap_M=[2, 4, 4], cost_M=cost_M, unit="params")
    assert len(plan.keep[0]) == 1 and plan.keep[1:] == ((0,), (0,)) and sum(plan.grow) == 3
    assert budget_used(plan.ranks, cost_M, "params") == budget_used([2, 1, 1], cost_M, "params")


def test_params_budget_over_many_events():
    """Events applied one after another (born slots take fresh indices): the budget never rises, and each event
    leaves unspent less than one rank of the dearest module."""
    live = [list(range(4)) for _ in range(6)]
    cost_M = [48, 48, 64, 64, 96, 96]
    spent = [budget_used([4] * 6, cost_M, "params")]
    for step in range(30):
        plan = _plan(live, 3, cost_M=cost_M, cap_M=[8] * 6, unit="params", seed=step)
        assert sum(_pruned(plan, live)) == 3
        live = [list(k) + list(range(100 + 10 * step, 100 + 10 * step + g)) for k, g in zip(plan.keep, plan.grow)]
        spent.append(budget_used([len(s) for s in live], cost_M, "params"))
        assert spent[-2] - max(cost_M) < spent[-1] <= spent[-2], spent


def _method(section: dict):
    return build_method(from_ds_config({"dynrank": {"method": "random", **section}}))


def _event(step: int, live, *, total: int = 100, cap: int = 8, unit: str = "rank", cost=None) -> Event:
    cost = cost or [1] * len(live)
    bounds = Bounds(floor=1, cap_M=[cap] * len(live), cost_M=cost, unit=unit)
    initial = budget_used([len(s) for s in live], cost, unit)
    return Event(step, total, live, [cap] * len(live), [True] * len(live), bounds, initial)


LIVE = [list(range(4)) for _ in range(10)]


def test_decisions_repeat_for_a_seed_and_step_and_differ_for_another():
    method = _method({"random": {"moves": 6, "seed": 3}})
    scores = torch.zeros(80)
    first = method.decide(scores, _event(5, LIVE))
    assert (
        first
        == method.decide(scores, _event(5, LIVE))
        == _method({"random": {"moves": 6, "seed": 3}}).decide(scores, _event(5, LIVE))
    )  # no state: a fresh (resumed) method draws the same
    assert _method({"random": {"moves": 6, "seed": 4}}).decide(scores, _event(5, LIVE)) != first
    assert method.decide(scores, _event(10, LIVE)) != first
    assert sum(_pruned(first, LIVE)) == 6 and first.slots_changed(LIVE) == 12
    assert method.state_dict() == {}


def test_a_list_of_moves_gives_each_event_its_own_count():
    method = _method({"schedule": {"start": 3, "interval": 3}, "random": {"moves": [2, 0, 5]}})
    assert method.schedule(10, None).events() == [3, 6, 9]
    counts = [sum(_pruned(method.decide(torch.zeros(80), _event(s, LIVE, total=10)), LIVE)) for s in (3, 6, 9)]
    assert counts == [2, 0, 5]
    with pytest.raises(UserInputError, match=r"dynrank\.random\.moves: 3 entries, but the schedule fires 4 events"):
        method.schedule(13, None)  # events at 3, 6, 9, 12


def test_default_moves_one_slot_per_module_and_scores_are_zeros():
    method = _method({})
    plan = method.decide(torch.zeros(80), _event(5, LIVE))
    assert sum(_pruned(plan, LIVE)) == len(LIVE) and sum(plan.grow) == len(LIVE)
    assert method.partial_scores is False and not method.needs_validation

    class Layer:
        capacity = 6

    scores = method.scores(None, [("a", Layer()), ("b", Layer())])
    assert torch.equal(scores, torch.zeros(12))


def test_the_shipped_config_and_defaults():
    cfg = from_ds_config({"dynrank": {"method": "random", "r": 4}})
    assert cfg.grows and cfg.slot_capacity(4) == 8 and cfg.budget.unit == "rank" and cfg.random.seed == 0
    assert from_ds_config({"dynrank": {"method": "random", "random": {"moves": [0, 3]}}}).random.moves == [0, 3]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"random": {"moves": 0}}, r"dynrank\.random\.moves: must be an integer >= 1, .*got 0"),
        ({"random": {"moves": -2}}, r"dynrank\.random\.moves: must be an integer >= 1"),
        ({"random": {"moves": []}}, r"dynrank\.random\.moves: .*non-empty list of integers >= 0.*got \[\]"),
        ({"random": {"moves": [1, -1]}}, r"dynrank\.random\.moves: .*got \[1, -1\]"),
        ({"random": {"moves": "3"}}, r"dynrank\.random\.moves: .*got '3'"),
        ({"random": {"moves": True}}, r"dynrank\.random\.moves: .*got True"),
        ({"random": {"seed": -1}}, r"dynrank\.random\.seed: Input should be greater than or equal to 0"),
        ({"random": {"rate": 2}}, r"dynrank\.random\.rate: unknown key"),
        ({"r": 4, "budget": {"cap": 9}}, r"budget\.cap \(9\) exceeds the masked backend's capacity \(8 slots\)"),
        ({"r": 4, "capacity": 4}, r"capacity \(4\) leaves no free slot to grow into"),
    ],
)
def test_bad_values_are_refused_naming_the_field(section, message):
    with pytest.raises(UserInputError, match=message) as info:
        from_ds_config({"dynrank": {"method": "random", **section}})
    assert "\n" not in str(info.value)
    from_ds_config({"dynrank": {"method": "random", "r": 4, "budget": {"cap": 9}, "reshape": {"backend": "physical"}}})
    with pytest.raises(UserInputError, match=r"random: only used by method random, but method is 'l1ra'"):
        from_ds_config({"dynrank": {"method": "l1ra", "random": {"moves": 2}}})
