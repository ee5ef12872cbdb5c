"""GoRA in one process (LocalContext, no DeepSpeed): the hooks' sum of each frozen weight's gradient is autograd's
own (W made to require grad in a reference copy) over several micro-batches, with activation checkpointing as
without, and nothing after the warm-up; the importance and allocation math (budget held, proportional, the bounds);
the state a checkpoint keeps; bad config values refused. The 2-process runs under ZeRO-2/3 are
tests/zero/test_gora_engine.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama

from ds_dynrank.allocation import budget_used, plan_for_ranks, proportional_ranks
from ds_dynrank.api import prepare
from ds_dynrank.config import from_ds_config
from ds_dynrank.context import LocalContext
from ds_dynrank.errors import UserInputError
from ds_dynrank.methods.base import Bounds, Event
from ds_dynrank.recompute import enable_activation_checkpointing
from ds_dynrank.scores import gradient_importance

SECTION = {"method": "gora", "r": 4, "lora_dropout": 0.1, "gora": {"warmup_steps": 2}}


def _batch(seed: int) -> dict:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _setup(checkpointing: bool = False, section: dict = SECTION):
    model = tiny_llama(seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    setup = prepare(model, from_ds_config({"dynrank": section}))
    for _, layer in setup.adapters:  # non-zero B, so the adapters shape the gradient reaching W too
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    ctx = LocalContext(model)
    setup.method.attach(ctx, setup.adapters)
    return model, setup, ctx


def _reference_grads(model, adapters, seeds: list[int]) -> list[torch.Tensor]:
    """Autograd's gradient of every adapted frozen weight, summed over the micro-batches, on a copy whose base
    weights require grad (dropout draws as in the original: same seeds)."""
    ref = copy.deepcopy(model)
    layers = dict(ref.named_modules())
    for name, _ in adapters:
        layers[name]._forward_hooks.clear()  # the copy's hooks would feed the method's sums
    weights = [layers[name].base.weight for name, _ in adapters]
    for w in weights:
        w.requires_grad_(True)
    for seed in seeds:
        torch.manual_seed(seed)
        ref(**_batch(seed)).loss.backward()
    return [w.grad.clone() for w in weights]


def _micro_batches(model, seeds: list[int]) -> None:
    for seed in seeds:
        torch.manual_seed(seed)  # dropout
        model(**_batch(seed)).loss.backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_hooks_sum_autograds_weight_gradient_over_micro_batches(checkpointing):
    model, setup, ctx = _setup(checkpointing)
    method, adapters = setup.method, setup.adapters
    expected = _reference_grads(model, adapters, [11, 12, 13])
    forwards = []
    early = dict(adapters)["model.layers.0.self_attn.q_proj"]  # a replay may stop early, before the last layers
    probe = early.register_forward_hook(lambda *_: forwards.append(1))
    _micro_batches(model, [11, 12])
    probe.remove()
    assert len(forwards) == (4 if checkpointing else 2)  # the checkpointed layers replay their forward
    method.after_boundary(ctx, adapters, applied=True)
    model.eval()
    with torch.no_grad():
        model(**_batch(5))  # evaluation forwards count for nothing
    model.train()
    _micro_batches(model, [13])
    for (name, _), mine, theirs in zip(adapters, method._grads, expected):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name  # once per micro-batch, replay or not
    assert method.warming_up and method.seen == 1
    method.after_boundary(ctx, adapters, applied=False)  # a skipped step does not count
    assert method.seen == 1
    method.after_boundary(ctx, adapters, applied=True)
    assert method.seen == 2 and not method.warming_up
    before = [g.clone() for g in method._grads]
    _micro_batches(model, [14])  # past the warm-up: nothing is added
    assert all(torch.equal(a, b) for a, b in zip(before, method._grads))

    scores = method.scores(ctx, adapters)  # the event: importance, buffers freed, hooks gone
    raw = torch.tensor(
        [gradient_importance(g, layer.base.weight, "sensitivity") for g, (_, layer) in zip(expected, adapters)]
    )
    assert torch.allclose(scores, raw / raw.sum(), rtol=1e-4) and scores.sum() == pytest.approx(1.0)
    assert method._grads is None and not method._handles


def test_grad_norm_importance_needs_no_weight():
    section = {**SECTION, "gora": {"warmup_steps": 1, "importance": "grad_norm"}}
    model, setup, ctx = _setup(section=section)
    method, adapters = setup.method, setup.adapters
    expected = _reference_grads(model, adapters, [31, 32])
    _micro_batches(model, [31, 32])
    method.after_boundary(ctx, adapters, applied=True)
    norms = torch.stack([g.norm() for g in expected])
    assert torch.allclose(method.scores(ctx, adapters), norms / norms.sum(), rtol=1e-4)


def _event(adapters, cost_M, unit="params") -> Event:
    live = [layer.live_slots() for _, layer in adapters]
    capacity = [layer.capacity for _, layer in adapters]
    ranks = [len(s) for s in live]
    bounds = Bounds(floor=1, cap_M=capacity, cost_M=cost_M, unit=unit)
    return Event(
        step=2,
        total_steps=10,
        live=live,
        capacity_M=capacity,
        active=[True] * len(live),
        bounds=bounds,
        initial_budget=budget_used(ranks, cost_M, unit),
    )


def test_decision_holds_the_parameter_budget_in_proportion_to_importance():
    model, setup, ctx = _setup()
    adapters = setup.adapters
    cost_M = [layer.rank_cost() for _, layer in adapters]
    assert len(set(cost_M)) > 1  # attention and MLP projections cost differently
    scores = torch.linspace(1, 3, len(adapters))
    event = _event(adapters, cost_M)
    plan = setup.method.decide(scores, event)
    ranks = plan.ranks
    used = budget_used(ranks, cost_M, "params")
    assert used <= event.initial_budget and event.initial_budget - used < max(cost_M)
    assert all(1 <= r <= 8 for r in ranks) and len(set(ranks)) > 1  # capacity 2 x r: room to grow
    for m, (kept, slots) in enumerate(zip(plan.keep, event.live)):  # first live slots kept, the rest born
        assert kept == tuple(slots[: ranks[m]]) and plan.grow[m] == max(0, ranks[m] - len(slots))
    assert setup.method.decide(torch.zeros(len(adapters)), event).ranks == [len(s) for s in event.live]


def test_proportional_ranks_math():
    cost = [64, 96, 96, 64]
    budget = 8 * sum(cost)
    ranks = proportional_ranks(torch.tensor([1.0, 2.0, 3.0, 4.0]), budget=budget, floor=1, cap_M=[16] * 4, cost_M=cost)
    assert ranks == [4, 5, 8, 16]  # ~ budget x share / cost, the largest capped and its excess shared out
    assert budget - sum(r * c for r, c in zip(ranks, cost)) < min(cost)
    capped = proportional_ranks(torch.tensor([100.0, 1, 1, 0]), budget=budget, floor=2, cap_M=[12] * 4, cost_M=cost)
    assert capped[0] == 12 and capped[3] >= 2 and all(2 <= r <= 12 for r in capped)  # the bounds hold
    assert sum(r * c for r, c in zip(capped, cost)) <= budget
    equal = proportional_ranks(torch.ones(3), budget=30, floor=1, cap_M=[30] * 3, cost_M=[1, 1, 1])
    assert equal == [10, 10, 10]  # rank unit: the total rank is held exactly
    shrink = plan_for_ranks([2, 5], [[0, 1, 3], [0, 1]])
    assert shrink.keep == ((0, 1), (0, 1)) and shrink.grow == (0, 3) and shrink.ranks == [2, 5]


def test_state_round_trips_and_a_resume_in_warm_up_sums_the_later_steps_only():
    model, setup, ctx = _setup()
    method, adapters = setup.method, setup.adapters
    _micro_batches(model, [21])
    method.after_boundary(ctx, adapters, applied=True)
    state = copy.deepcopy(method.state_dict())
    assert state == {"seen": 1, "done": False, "importance": None}  # the sums are not saved

    def resumed() -> list[torch.Tensor]:
        fresh = prepare(model, from_ds_config({"dynrank": SECTION})).method
        fresh.load_state_dict(copy.deepcopy(state))
        fresh.attach(ctx, adapters)
        _micro_batches(model, [22])
        fresh.after_boundary(ctx, adapters, applied=True)
        assert not fresh.warming_up and fresh.seen == 2
        sums = fresh._grads
        fresh._release()
        return sums

    method._release()
    first, second = resumed(), resumed()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # deterministic
    expected = _reference_grads(model, adapters, [22])  # the steps after the resumed one, only
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(first, expected))

    done = prepare(model, from_ds_config({"dynrank": SECTION})).method
    done.load_state_dict({"seen": 2, "done": True, "importance": torch.ones(len(adapters)) / len(adapters)})
    done.attach(ctx, adapters)
    assert done._grads is None and not done._handles  # after the event: plain LoRA, no hooks, no buffers


def test_schedule_is_one_event_after_warm_up_and_budget_counts_params():
    cfg = from_ds_config({"dynrank": {"method": "gora", "gora": {"warmup_steps": 5}}})
    assert cfg.budget.unit == "params" and cfg.slot_capacity(8) == 16  # the paper's budget; room to grow
    assert from_ds_config({"dynrank": {"method": "gora", "budget": {"floor": 2}}}).budget.unit == "params"
    assert from_ds_config({"dynrank": {"method": "gora", "budget": {"unit": "rank"}}}).budget.unit == "rank"
    schedule = prepare(tiny_llama(), cfg).method.schedule(100, None)
    assert schedule.events() == [5]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"gora": {"warmup_steps": 0}}, r"dynrank\.gora\.warmup_steps: Input should be greater than or equal to 1"),
        ({"gora": {"importance": "fisher"}}, r"dynrank\.gora\.importance: Input should be 'sensitivity' or"),
        ({"gora": {"r_max": 4}}, r"dynrank\.gora\.r_max: unknown key"),
        ({"schedule": {"start": 3}}, r"schedule: method gora allocates once, right after gora\.warmup_steps"),
        ({"r": 4, "budget": {"cap": 9}}, r"budget\.cap \(9\) exceeds the masked backend's capacity \(8 slots\)"),
    ],
)
def test_bad_values_are_refused_naming_the_field(section, message):
    with pytest.raises(UserInputError, match=message):
        from_ds_config({"dynrank": {"method": "gora", **section}})
    from_ds_config({"dynrank": {"method": "gora", "r": 4, "budget": {"cap": 9}, "reshape": {"backend": "physical"}}})
    with pytest.raises(UserInputError, match=r"gora: only used by method gora, but method is 'l1ra'"):
        from_ds_config({"dynrank": {"method": "l1ra", "gora": {"warmup_steps": 2}}})
