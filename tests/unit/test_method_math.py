"""The pure parts of ALoRA, module allocation and the AdaLoRA-style scorer against hand-computed values: scores,
ALoRA's prune-and-grow round, the cubic budget, the module-selection strategies (budget and bounds respected,
deterministic for a seed), and batched ablations equal to one forward per ablation."""

from __future__ import annotations

import pytest
import torch

from ds_dynrank.allocation import Plan, alora_plan, cubic_budget, top_budget_plan
from ds_dynrank.context import shard
from ds_dynrank.lora import LoRALinear
from ds_dynrank.methods.alora.method import ALONE, WITHOUT, ablation_factors
from ds_dynrank.methods.modalloc import strategies
from ds_dynrank.scores import (
    ablation_importance,
    element_score,
    per_example_loss,
    sensitivity_ema,
    triplet_scores,
)


def test_ablation_importance_is_the_papers_formula_up_to_a_constant():
    # IS(r) = S(M) - S(M\r) + S(M_r), S = -loss: with loss(M) = 1.0, loss(M\r) = 1.5, loss(M_r) = 1.2
    # IS = -1.0 + 1.5 - 1.2 = -0.7; ours drops the constant S(M) = -1.0: 1.5 - 1.2 = 0.3
    out = ablation_importance(torch.tensor([1.5, 2.0]), torch.tensor([1.2, 2.5]))
    assert torch.allclose(out, torch.tensor([0.3, -0.5]))


def test_sensitivity_ema_matches_hand_computation():
    ipt, unc = torch.tensor([0.2, 0.0]), torch.tensor([0.1, 0.0])
    w, g = torch.tensor([2.0, -1.0]), torch.tensor([-0.5, 3.0])
    sensitivity_ema(ipt, unc, w, g, beta1=0.85, beta2=0.5)
    # I = |w g| = [1.0, 3.0]; Ī = .85 Ī + .15 I = [0.32, 0.45]; Ū = .5 Ū + .5 |I - Ī| = [0.39, 1.275]
    assert torch.allclose(ipt, torch.tensor([0.32, 0.45]))
    assert torch.allclose(unc, torch.tensor([0.39, 1.275]))
    assert torch.allclose(element_score(ipt, unc), torch.tensor([0.32 * 0.39, 0.45 * 1.275]))


def test_triplet_scores_sum_gate_and_row_and_column_means():
    s_A = torch.tensor([[1.0, 3.0], [0.0, 2.0]])  # [R=2, I=2]
    s_B = torch.tensor([[4.0, 0.0], [2.0, 6.0], [0.0, 0.0]])  # [O=3, R=2]
    gate = torch.tensor([0.5, 0.25])
    assert torch.allclose(triplet_scores(s_A, s_B, gate), torch.tensor([0.5 + 2.0 + 2.0, 0.25 + 1.0 + 2.0]))
    assert torch.allclose(triplet_scores(s_A, s_B, None), torch.tensor([4.0, 3.0]))


def test_per_example_loss_equals_hf_loss_per_sequence():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 4, 5, -100], [-100, 1, 2, 3, 4], [-100, -100, -100, 7, -100]])
    ours = per_example_loss(logits, labels)
    for i in range(3):
        ref = torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100)
        assert torch.allclose(ours[i], ref)


def test_alora_round_prunes_lowest_and_spreads_to_untouched_modules_by_mean_importance():
    imp = [torch.tensor([0.1, 5.0, 4.0]), torch.tensor([3.0, 0.2]), torch.tensor([2.0, 2.0]), torch.tensor([9.0, 1.0])]
    live = [[0, 1, 2], [0, 1], [0, 1], [0, 1]]
    plan = alora_plan(imp, live, n_prune=2, floor=1, cap_M=[6] * 4, cost_M=[1] * 4)
    assert plan.keep == ((1, 2), (0,), (0, 1), (0, 1))  # 0.1 and 0.2 pruned
    # untouched: module 3 (mean 5.0) then module 2 (mean 2.0): one each
    assert plan.grow == (0, 0, 1, 1)
    assert sum(plan.ranks) == 9
    # 3 freed over 2 untouched modules: the higher mean importance takes the odd one (the paper's 3/3/2 rule)
    imp = [
        torch.tensor([0.1, 5.0]),
        torch.tensor([0.2, 5.0]),
        torch.tensor([0.3, 5.0]),
        torch.tensor([4.0, 4.0]),
        torch.tensor([6.0, 6.0]),
    ]
    plan = alora_plan(imp, [[0, 1]] * 5, n_prune=3, floor=1, cap_M=[6] * 5, cost_M=[1] * 5)
    assert plan.grow == (0, 0, 0, 1, 2) and sum(plan.ranks) == 10


def test_alora_round_respects_floor_and_caps_and_may_shrink():
    imp = [torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0])]
    live = [[0, 1], [0, 1]]
    plan = alora_plan(imp, live, n_prune=3, floor=1, cap_M=[4, 3], cost_M=[1, 1])
    assert plan.keep == ((1,), (1,))  # module 0 stops at the floor, then module 1's lowest goes
    assert plan.grow == (0, 0)  # no module lost nothing: the budget shrinks, as in the paper
    plan = alora_plan(imp, live, n_prune=1, floor=1, cap_M=[4, 3], cost_M=[1, 1])
    assert plan.keep == ((1,), (0, 1)) and plan.grow == (0, 1)
    plan = alora_plan(imp, live, n_prune=1, floor=1, cap_M=[4, 2], cost_M=[1, 1])
    assert plan.grow == (0, 0)  # the only untouched module is at its cap


def test_cubic_budget_schedule_matches_peft():
    kw = dict(initial=120, target=80, tinit=10, tfinal=20, total=100)
    assert cubic_budget(5, **kw) == 120 and cubic_budget(10, **kw) == 120
    assert cubic_budget(45, **kw) == int(80 + 40 * (1 - 35 / 70) ** 3) == 85
    assert cubic_budget(80, **kw) == 80 and cubic_budget(95, **kw) == 80
    values = [cubic_budget(t, **kw) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_top_budget_plan_keeps_highest_scores_with_floor():
    scores = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.05, 0.01]), torch.tensor([0.3, 0.8])]
    live = [[0, 1, 2], [0, 1], [0, 1]]
    plan = top_budget_plan(scores, live, budget=4, floor=1)
    assert plan.keep == ((1, 2), (0,), (1,))
    assert plan.grow == (0, 0, 0) and sum(plan.ranks) == 4
    assert top_budget_plan(scores, live, budget=10, floor=1).keep == tuple(tuple(x) for x in live)


def test_plan_with_activity_round_trips_and_changes_the_checksum():
    capacity = [3, 2]
    plan = Plan(keep=((0, 2), (1,)), grow=(1, 0), active=(True, False))
    decoded = Plan.decode(plan.encode(capacity), capacity)
    assert decoded == plan
    plain = Plan(keep=plan.keep, grow=plan.grow)
    assert Plan.decode(plain.encode(capacity), capacity).active is None
    assert plain.checksum() != plan.checksum()
    assert plan.changes([[0, 2], [1]], [True, True]) == [True, True]
    assert Plan(keep=((0, 2), (1,)), grow=(0, 0), active=(True, False)).changes([[0, 2], [1]], [True, False]) == [
        False,
        False,
    ]


IMPORTANCE = torch.tensor([5.0, 1.0, 3.0, 0.0, 8.0, 2.0])


def test_topk_and_threshold():
    assert strategies.topk(IMPORTANCE, 3) == [True, False, True, False, True, False]
    # shares: 8/19, 5/19, 3/19, ...: 13/19 = .684 < .7 -> needs the third (16/19 = .842)
    assert strategies.threshold(IMPORTANCE, 0.7) == [True, False, True, False, True, False]
    assert strategies.threshold(IMPORTANCE, 0.6) == [True, False, False, False, True, False]
    assert sum(strategies.threshold(IMPORTANCE, 1.0)) == 5  # the zero-importance module is never needed
    assert sum(strategies.threshold(torch.zeros(4), 0.5)) == 2  # nothing measured yet: uniform shares


@pytest.mark.parametrize("name", ["multinomial", "discounted", "uniform"])
def test_random_strategies_pick_k_distinct_and_are_deterministic_per_seed(name):
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0, 5.0, 1.0])
    picks = []
    for seed in (1, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        picks.append(strategies.select(name, IMPORTANCE, k=3, p=0.9, times_chosen_M=counts, generator=gen))
    assert all(sum(p) == 3 for p in picks)
    assert picks[0] == picks[1]
    draws = {
        tuple(
            strategies.select(
                name, IMPORTANCE, k=3, p=0.9, times_chosen_M=counts, generator=torch.Generator().manual_seed(s)
            )
        )
        for s in range(30)
    }
    assert len(draws) > 1  # really random across seeds


def test_multinomial_never_picks_zero_importance_and_discounting_favours_rarely_chosen():
    for seed in range(20):
        pick = strategies.multinomial(IMPORTANCE, 5, torch.Generator().manual_seed(seed))
        assert pick[3] is False
    importance = torch.ones(4)
    counts = torch.tensor([10.0, 10.0, 10.0, 0.0])
    hits = sum(strategies.discounted(importance, counts, 1, torch.Generator().manual_seed(s))[3] for s in range(50))
    assert hits >= 45  # weight 1/0.01 against 1/10: module 3 almost always


def test_alora_shard_pads_every_rank_to_the_same_length():
    items = list(range(7))
    (a, n), (b, m) = shard(items, 0, 2), shard(items, 1, 2)
    assert a + b == items and n == m == 4


def test_batched_ablations_equal_one_forward_per_ablation():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), rank=3, capacity=4, gate=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 6)  # a batch of 2 examples
    group = [(0, 1, WITHOUT), (0, 2, ALONE), (1, 0, WITHOUT)]  # the last variant targets another module
    factors = ablation_factors(layer.capacity, group, 0)
    layer.ablation = factors.repeat_interleave(2, 0)
    batched = layer(x.repeat(3, 1, 1)).view(3, 2, 7, 5)
    layer.ablation = None
    for v, mask in enumerate([[1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 1, 0]]):
        saved = layer.rank_mask.clone()
        layer.rank_mask.copy_(torch.tensor(mask, dtype=torch.float32))
        assert torch.allclose(batched[v], layer(x), atol=1e-6), v
        layer.rank_mask.copy_(saved)
    assert ablation_factors(layer.capacity, group, 2) is None
