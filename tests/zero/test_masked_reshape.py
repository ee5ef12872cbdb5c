"""The masked backend under ZeRO 0, 1, 2 and 3, 2 real processes: an event that prunes and grows keeps the
surviving slots' fp32 values and both Adam moments bit for bit, gives born slots B = 0, gate 1, zero moments and A
rows from the shared seed, preserves the model's function when only zero-gate ranks are pruned, keeps killed
slots exactly zero through further steps, and leaves every rank with identical adapters; also under ZeRO-Offload
(ZeRO-2 and -3), with the masters and moments on the host. (Identity events: test_identity_events.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_ranks_identical, build_dynrank, offloaded, train_steps

from ds_dynrank.allocation import Plan

STAGES = (0, 1, 2, 3)
OFFLOAD_STAGES = (2, 3)  # ZeRO-Offload: optimizer state on the host, and the parameters too under ZeRO-3
CFG = {"method": "l1ra", "r": 4, "capacity": 8, "schedule": {"start": 1000}, "l1ra": {"l1_lambda": 0.0}}


def forced_plan(live: list[list[int]]) -> Plan:
    """Module m%3==0 loses its first two live slots, m%3==1 grows by 2, m%3==2 trades one slot for a new one."""
    keep, grow = [], []
    for m, slots in enumerate(live):
        keep.append(tuple(slots[2:]) if m % 3 == 0 else tuple(slots) if m % 3 == 1 else tuple(slots[1:]))
        grow.append(0 if m % 3 == 0 else 2 if m % 3 == 1 else 1)
    return Plan(keep=tuple(keep), grow=tuple(grow))


def _states(io, adapters) -> dict:
    return {f"{n}.{k}": io.read(getattr(layer, k)) for n, layer in adapters for k in ("lora_A", "lora_B", "lora_gate")}


def _build(stage: int, offload: bool = False):
    dynrank = build_dynrank(stage, CFG, scheduler_steps=None, offload=offload)
    return dynrank.engine, dynrank, dynrank.adapters


def _event_worker(rank: int, world: int, out_dir: Path, stages=STAGES, offload: bool = False) -> None:
    from ds_dynrank.backends.base import slot_generator
    from ds_dynrank.backends.masked import split_slots

    for stage in stages:
        engine, dynrank, adapters = _build(stage, offload)
        io = dynrank.io
        train_steps(dynrank, 3, rank, seed=10)
        assert offloaded(engine) == offload, stage
        live = [layer.live_slots() for _, layer in adapters]
        plan = forced_plan(live)
        # make the pruned slots' gates exactly 0, so the event must preserve the function
        for (_, layer), keep in zip(adapters, plan.keep):
            state = io.read(layer.lora_gate)
            state.value[[i for i in layer.live_slots() if i not in keep]] = 0.0
            io.write(layer.lora_gate, state)
        probe = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(99))
        engine.eval()
        with torch.no_grad():
            before_logits = engine(input_ids=probe).logits.clone()
        before = _states(io, adapters)
        splits = [split_slots(layer, keep, grow) for (_, layer), keep, grow in zip(adapters, plan.keep, plan.grow)]
        event = dynrank.reallocate(plan)
        after = _states(io, adapters)
        with torch.no_grad():
            after_logits = engine(input_ids=probe).logits.clone()
        engine.train()
        assert event["ranks"] == dict(zip([n for n, _ in adapters], plan.ranks))
        for m, ((name, layer), (killed, born)) in enumerate(zip(adapters, splits)):
            keep = list(plan.keep[m])
            for key, dim in (("lora_A", 0), ("lora_B", 1), ("lora_gate", 0)):
                b, a = before[f"{name}.{key}"], after[f"{name}.{key}"]
                for field in ("value", "exp_avg", "exp_avg_sq"):
                    old, new = getattr(b, field), getattr(a, field)
                    assert torch.equal(
                        old.index_select(dim, torch.tensor(keep)), new.index_select(dim, torch.tensor(keep))
                    ), (stage, name, key, field)
                    if killed + born:
                        touched = new.index_select(dim, torch.tensor(killed + born))
                        if field != "value":
                            assert torch.count_nonzero(touched) == 0, (stage, name, key, field)
            if born:
                rows = layer.init_rows(len(born), slot_generator(0, dynrank.applied_steps, m))
                assert torch.equal(after[f"{name}.lora_A"].value[born], rows)
                assert torch.count_nonzero(after[f"{name}.lora_B"].value[:, born]) == 0
                assert torch.equal(after[f"{name}.lora_gate"].value[born], torch.ones(len(born)))
            assert layer.live_slots() == sorted(keep + born)
        torch.testing.assert_close(after_logits, before_logits, rtol=0, atol=1e-6)
        losses = train_steps(dynrank, 3, rank, seed=20)
        assert all(map(math.isfinite, losses)), (stage, losses)
        final = _states(io, adapters)
        for name, layer in adapters:
            dead = [i for i in range(layer.capacity) if i not in layer.live_slots()]
            for key, dim in (("lora_A", 0), ("lora_B", 1), ("lora_gate", 0)):
                s = final[f"{name}.{key}"]
                for field in ("value", "exp_avg", "exp_avg_sq"):
                    assert torch.count_nonzero(getattr(s, field).index_select(dim, torch.tensor(dead))) == 0
        assert dynrank.applied_steps == 6
        torch.save(
            {k: (v.value, v.exp_avg, v.exp_avg_sq) for k, v in final.items()},
            out_dir / f"masked_stage{stage}_rank{rank}.pt",
        )
        engine.destroy()


@pytest.mark.deepspeed
def test_masked_event_under_every_zero_stage(run_distributed, tmp_path):
    run_distributed(_event_worker, tmp_path)
    assert_ranks_identical(tmp_path, "masked", STAGES)


@pytest.mark.deepspeed
def test_masked_event_under_zero_offload(run_distributed, tmp_path):
    """The same event with the fp32 masters and Adam moments on the host (offload_optimizer, ZeRO-2 and -3) and,
    under ZeRO-3, the parameter partitions too (offload_param)."""
    run_distributed(_event_worker, tmp_path, OFFLOAD_STAGES, True)
    assert_ranks_identical(tmp_path, "masked", OFFLOAD_STAGES)
