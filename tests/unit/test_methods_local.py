"""Every method driven in one process by a LocalContext (a plain module, no DeepSpeed): what it observes, the scores
it gives, the decision it takes and how its per-slot state follows a reshape, against hand-computed values. The
same classes run under ZeRO 0-3 in tests/zero with the engine's context."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from ds_dynrank.allocation import Plan, cubic_budget, l1ra_plan
from ds_dynrank.api import prepare
from ds_dynrank.backends.base import SlotMap
from ds_dynrank.config import from_ds_config
from ds_dynrank.context import LocalContext
from ds_dynrank.methods.base import Bounds, Event, live_scores
from ds_dynrank.scores import per_example_loss, sensitivity_ema


def _setup(section: dict, validation: dict | None = None):
    model = tiny_llama(seed=0)
    setup = prepare(model, from_ds_config({"dynrank": section}), validation=validation)
    return model, setup


def _event(adapters, step: int = 4, total: int = 20, floor: int = 1) -> Event:
    live = [layer.live_slots() for _, layer in adapters]
    capacity = [layer.capacity for _, layer in adapters]
    bounds = Bounds(floor=floor, cap_M=capacity, cost_M=[layer.rank_cost() for _, layer in adapters], unit="rank")
    return Event(
        step=step,
        total_steps=total,
        live=live,
        capacity_M=capacity,
        active=[layer.trainable for _, layer in adapters],
        bounds=bounds,
        initial_budget=sum(len(s) for s in live),
    )


def _batch(seed: int = 0, n: int = 2, length: int = 8) -> dict:
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_l1ra_gate_group_proximal_step_scores_and_decision():
    section = {"method": "l1ra", "r": 2, "capacity": 4, "l1ra": {"l1_lambda": 2.0, "gate_lr": 0.05}}
    model, setup = _setup(section)
    method, adapters = setup.method, setup.adapters
    groups = setup.optimizer_groups()
    assert len(groups) == 2 and groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert [id(p) for p in groups[1]["params"]] == [id(layer.lora_gate) for _, layer in adapters]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    ctx = LocalContext(model, optimizer)
    optimizer.param_groups[1]["lr"] = 0.9  # as a scheduler sets every group alike
    method.attach(ctx, adapters)
    assert optimizer.param_groups[1]["lr"] == 0.05
    _, layer = adapters[0]
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.05, 0.5, 0.0, 0.0]))
    method.after_boundary(ctx, adapters, applied=False)  # a skipped step: no proximal step
    assert torch.equal(layer.lora_gate.detach(), torch.tensor([0.05, 0.5, 0.0, 0.0]))
    method.after_boundary(ctx, adapters, applied=True)  # shrink by gate_lr x l1_lambda = 0.1, clamped at 0
    assert torch.allclose(layer.lora_gate.detach(), torch.tensor([0.0, 0.4, 0.0, 0.0]))
    scores = method.scores(ctx, adapters)
    assert torch.equal(scores, torch.cat([layer.lora_gate.detach().flatten() for _, layer in adapters]))
    event = _event(adapters)
    expected = l1ra_plan(
        live_scores(scores, event.capacity_M),
        event.live,
        threshold=0.1 + 1e-6,
        floor=1,
        cap_M=event.capacity_M,
        cost_M=event.bounds.cost_M,
    )
    plan = method.decide(scores, event)
    assert plan == expected and plan.keep[0] == (1,) and sum(plan.ranks) == event.initial_budget


def test_alora_scores_are_ablation_losses_and_shard_over_ranks():
    validation = _batch(seed=3, n=3)
    section = {
        "method": "alora",
        "r": 2,
        "capacity": 3,
        "target_modules": ["q_proj", "v_proj"],
        "alora": {"variants_per_forward": 3},
    }
    model, setup = _setup(section, validation)
    method, adapters = setup.method, setup.adapters
    for _, layer in adapters:  # non-zero B, so every rank matters
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    scores = method.scores(LocalContext(model), adapters)

    def loss_with(module: int, keep: list[int]) -> float:
        layer = adapters[module][1]
        mask = layer.rank_mask.clone()
        with torch.no_grad():
            layer.rank_mask.zero_()
            layer.rank_mask[keep] = 1
            model.eval()
            logits = model(input_ids=validation["input_ids"], attention_mask=validation["attention_mask"]).logits
            layer.rank_mask.copy_(mask)
        return float(per_example_loss(logits, validation["labels"]).mean())

    offset = 0
    for m, (_, layer) in enumerate(adapters):
        live = layer.live_slots()
        for s in range(layer.capacity):
            if s not in live:
                assert scores[offset + s] == 0
                continue
            without, alone = loss_with(m, [x for x in live if x != s]), loss_with(m, [s])
            assert scores[offset + s] == pytest.approx(without - alone, abs=1e-5)
        offset += layer.capacity
    shares = [method.scores(LocalContext(model, rank=r, world=2), adapters) for r in (0, 1)]
    assert torch.allclose(shares[0] + shares[1], scores, atol=1e-6)  # the controller sums partial scores
    assert method.partial_scores and not torch.equal(shares[0], scores)
    assert all(layer.ablation is None for _, layer in adapters)  # scoring leaves no ablation behind


@pytest.mark.parametrize("score", ["activation", "gradient"])
def test_modalloc_importance_folds_in_at_boundaries_and_top_k_follows_it(score):
    section = {"method": "modalloc", "r": 2, "modalloc": {"score": score, "strategy": "topk", "k": 3}}
    model, setup = _setup(section)
    method, adapters = setup.method, setup.adapters
    active = method.initial_activity(len(adapters))
    assert sum(active) == 3 and active == method.initial_activity(len(adapters))  # seeded, the same every call
    assert [layer.trainable for _, layer in adapters] == active  # prepare() applied it
    ctx = LocalContext(model)
    method.attach(ctx, adapters)
    for _, layer in adapters:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(len(adapters), dtype=torch.float64)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, i, o, m=m: outputs.__setitem__(m, o.detach()))
        for m, (_, layer) in enumerate(adapters)
    ]
    model.train()
    loss = model(**_batch(seed=4)).loss
    loss.backward()
    for h in hooks:
        h.remove()
    for m, (_, layer) in enumerate(adapters):
        if score == "activation":
            expected[m] = outputs[m].float().norm(dim=-1).sum()
        else:
            expected[m] = sum(p.grad.float().norm() for p in layer.adapter_tensors().values() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        model(**_batch(seed=5))  # evaluation forwards count for nothing
    method.after_boundary(ctx, adapters, applied=True)
    assert torch.allclose(method.importance, expected, rtol=1e-5)
    method.after_boundary(ctx, adapters, applied=True)  # nothing new since: the running total stays
    assert torch.allclose(method.importance, expected, rtol=1e-5)
    event = _event(adapters)
    plan = method.decide(method.scores(ctx, adapters), event)
    top = sorted(range(len(adapters)), key=lambda m: -float(expected[m]))[:3]
    assert plan.active == tuple(m in top for m in range(len(adapters))) and plan.keep == tuple(map(tuple, event.live))
    chosen = method.times_chosen.clone()
    method.after_event(plan, SlotMap.in_place(plan, event.capacity_M))
    assert torch.equal(method.times_chosen, chosen + torch.tensor(plan.active, dtype=torch.float64))


def test_adalora_sensitivity_budget_and_slots_following_a_reshape():
    section = {
        "method": "adalora",
        "r": 4,
        "target_modules": ["q_proj"],
        "adalora": {"target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 2, "beta1": 0.8, "beta2": 0.6},
    }
    model, setup = _setup(section)
    method, adapters = setup.method, setup.adapters
    ctx = LocalContext(model)
    method.attach(ctx, adapters)
    for _, layer in adapters:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    params = [p for _, layer in adapters for p in layer.adapter_tensors().values()]
    ipt = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    unc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for seed in (7, 8):  # two micro-batches: their gradients add up before the boundary
        model(**_batch(seed=seed)).loss.backward()
    for i, p in enumerate(params):
        sensitivity_ema(ipt[i], unc[i], p.detach().float(), p.grad.float(), beta1=0.8, beta2=0.6)
    method.after_boundary(ctx, adapters, applied=True)
    for mine, theirs in zip(method.ipt + method.unc, ipt + unc):
        assert torch.allclose(mine, theirs, atol=1e-7)
    scores = method.scores(ctx, adapters)
    event = _event(adapters, step=4, total=20)
    plan = method.decide(scores, event)
    budget = cubic_budget(4, initial=event.initial_budget, target=2 * len(adapters), tinit=2, tfinal=2, total=20)
    assert sum(plan.ranks) == budget < event.initial_budget and not any(plan.grow)
    before = [t.clone() for t in method.ipt]
    in_place = Plan(keep=tuple((0, 2) for _ in adapters), grow=(0,) * len(adapters))  # the masked layout
    method.after_event(in_place, SlotMap.in_place(in_place, event.capacity_M))
    kept, killed = torch.tensor([0, 2]), torch.tensor([1, 3])
    for i, (_, dim) in enumerate(method.layout):
        assert torch.equal(method.ipt[i].index_select(dim, kept), before[i].index_select(dim, kept))
        assert torch.count_nonzero(method.ipt[i].index_select(dim, killed)) == 0  # killed slots drop their EMAs
    method.ipt = [t.clone() for t in before]
    method.after_event(plan, SlotMap.compacted(plan))  # the physical layout: survivors first, in order
    for i, (m, dim) in enumerate(method.layout):
        assert torch.equal(method.ipt[i], before[i].index_select(dim, torch.tensor(plan.keep[m])))


def test_slot_maps_of_both_backends():
    plan = Plan(keep=((0, 2), (1,)), grow=(1, 2))
    assert SlotMap.compacted(plan).sources == ((0, 2, None), (1, None, None))
    assert SlotMap.in_place(plan, [4, 3]).sources == ((0, None, 2, None), (None, 1, None))
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(SlotMap.compacted(plan).carry(0, t, dim=1), torch.tensor([[1.0, 3.0, 0.0]]))
    assert torch.equal(SlotMap.in_place(plan, [4, 3]).carry(0, t, dim=1), torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
