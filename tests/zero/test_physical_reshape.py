"""The physical backend under ZeRO 0-3, 2 real processes: shapes really change. Surviving slots carry their fp32
values and both Adam moments bit for bit into the rebuilt engine, born slots are seeded with B = 0, gate 1 and
zero moments, the function is preserved, the trainable parameter count is what the new ranks imply, the rebuild
does not send the frozen base model again, a replaced layer still held keeps no old engine alive, and ten rebuilds
leak no engine and no memory; the same event under ZeRO-Offload (ZeRO-2 and -3) carries the state into the new host
optimizer. (Identity events: test_identity_events.py.)"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_ranks_identical, build_dynrank, engines_alive, offloaded, train_steps
from test_masked_reshape import forced_plan

STAGES = (0, 1, 2, 3)
OFFLOAD_STAGES = (2, 3)  # ZeRO-Offload: optimizer state on the host, and the parameters too under ZeRO-3
LEAK_STAGE = 2  # ZeRO-3's physical rebuilds are the 30 of tests/zero/test_soak.py
SECTION = {
    "method": "l1ra",
    "r": 4,
    "reshape": {"backend": "physical"},
    "schedule": {"start": 1000},
    "l1ra": {"l1_lambda": 0.0},
}


def build(stage: int, offload: bool = False):
    return build_dynrank(stage, SECTION, offload=offload)


train = train_steps


def states(dynrank) -> dict:
    names = [f"{n}.{k}" for n, layer in dynrank.adapters for k in ("lora_A", "lora_B", "lora_gate")]
    tensors = [getattr(layer, k) for _, layer in dynrank.adapters for k in ("lora_A", "lora_B", "lora_gate")]
    return dict(zip(names, dynrank.io.read_many(tensors)))


def _adam_step(engine):
    steps = {repr(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    assert len(steps) == 1, steps  # every partition has stepped alike
    return next(iter(engine.optimizer.optimizer.state.values()))["step"]


def _event_worker(rank: int, world: int, out_dir: Path, stages=STAGES, offload: bool = False) -> None:
    from ds_dynrank import dist
    from ds_dynrank.backends.base import slot_generator
    from ds_dynrank.lora import adapter_parameters
    from ds_dynrank.zero import full_numel

    for stage in stages:
        dynrank = build(stage, offload)
        train(dynrank, 3, rank, seed=10)
        assert offloaded(dynrank.engine) == offload, stage
        step = _adam_step(dynrank.engine) if stage else None
        live = [layer.live_slots() for _, layer in dynrank.adapters]
        plan = forced_plan(live)
        for (_, layer), keep in zip(dynrank.adapters, plan.keep):  # pruned slots get gate 0: function preserved
            state = dynrank.io.read(layer.lora_gate)
            state.value[[i for i in layer.live_slots() if i not in keep]] = 0.0
            dynrank.io.write(layer.lora_gate, state)
        probe = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(99))
        dynrank.engine.eval()
        with torch.no_grad():
            before_logits = dynrank.engine(input_ids=probe).logits.clone()
        before, old_engine = states(dynrank), dynrank.engine
        held = dynrank.adapters[-1][1]  # a caller's reference to an old layer must not keep the old engine alive
        frozen_bytes = sum(
            full_numel(p) * p.element_size() for p in dynrank.engine.module.parameters() if not p.requires_grad
        )
        with dist.counting_bytes() as sent:
            dynrank.reallocate(plan)
        assert 0 < sent.bytes < frozen_bytes, (stage, sent.bytes, frozen_bytes)  # the base model is not re-sent
        assert dynrank.engine is not old_engine
        del old_engine
        gc.collect()
        assert engines_alive() == 1 and held is not dynrank.adapters[-1][1], stage
        if stage:  # the new optimizer holds the carried step, of the type its optimizer counts in
            assert offloaded(dynrank.engine) == offload and repr(_adam_step(dynrank.engine)) == repr(step), stage
        after = states(dynrank)
        dynrank.engine.eval()
        with torch.no_grad():
            after_logits = dynrank.engine(input_ids=probe).logits.clone()
        dynrank.engine.train()
        torch.testing.assert_close(after_logits, before_logits, rtol=0, atol=1e-6)
        for m, (name, layer) in enumerate(dynrank.adapters):
            keep, grow = list(plan.keep[m]), plan.grow[m]
            assert layer.rank == layer.capacity == len(keep) + grow
            for key, dim in (("lora_A", 0), ("lora_B", 1), ("lora_gate", 0)):
                b, a = before[f"{name}.{key}"], after[f"{name}.{key}"]
                survivors = torch.arange(len(keep))
                for field in ("value", "exp_avg", "exp_avg_sq"):
                    old = getattr(b, field).index_select(dim, torch.tensor(keep))
                    assert torch.equal(getattr(a, field).index_select(dim, survivors), old), (stage, name, key)
                    if field != "value" and grow:
                        born = torch.arange(len(keep), len(keep) + grow)
                        assert torch.count_nonzero(getattr(a, field).index_select(dim, born)) == 0
            if grow:
                rows = layer.init_rows(grow, slot_generator(0, dynrank.applied_steps, m))
                assert torch.equal(after[f"{name}.lora_A"].value[len(keep) :], rows)
                assert torch.count_nonzero(after[f"{name}.lora_B"].value[:, len(keep) :]) == 0
                assert torch.equal(after[f"{name}.lora_gate"].value[len(keep) :], torch.ones(grow))
        expected = sum(layer.rank * layer.rank_cost() for _, layer in dynrank.adapters)
        assert sum(full_numel(p) for p in adapter_parameters(dynrank.adapters)) == expected
        assert dynrank.engine.global_steps == 3 and dynrank.applied_steps == 3
        losses = train(dynrank, 3, rank, seed=20)
        assert dynrank.engine.global_steps == 6 and all(map(math.isfinite, losses)), (stage, losses)
        final = states(dynrank)
        torch.save(
            {k: (v.value, v.exp_avg, v.exp_avg_sq) for k, v in final.items()},
            out_dir / f"physical_stage{stage}_rank{rank}.pt",
        )
        dynrank.engine.destroy()


@pytest.mark.deepspeed
def test_physical_event_under_every_zero_stage(run_distributed, tmp_path):
    run_distributed(_event_worker, tmp_path)
    assert_ranks_identical(tmp_path, "physical", STAGES)


@pytest.mark.deepspeed
def test_physical_event_under_zero_offload(run_distributed, tmp_path):
    """The same rebuild with the fp32 masters and Adam moments on the host (offload_optimizer, ZeRO-2 and -3)
    and, under ZeRO-3, the parameter partitions too (offload_param): the new host optimizer holds the carried
    state."""
    run_distributed(_event_worker, tmp_path, OFFLOAD_STAGES, True)
    assert_ranks_identical(tmp_path, "physical", OFFLOAD_STAGES)


def _leak_worker(rank: int, world: int, out_dir: Path) -> None:
    import psutil

    from ds_dynrank.allocation import Plan

    dynrank = build(LEAK_STAGE)
    train(dynrank, 1, rank, seed=1)
    rss, alive = [], []
    for event in range(10):  # alternate shrinking and growing one module in three
        live = [layer.live_slots() for _, layer in dynrank.adapters]
        grow = tuple((1 if event % 2 else 0) if m % 3 == 0 else 0 for m in range(len(live)))
        keep = tuple(
            tuple(s[: len(s) - (0 if event % 2 else 1)]) if m % 3 == 0 else tuple(s) for m, s in enumerate(live)
        )
        dynrank.reallocate(Plan(keep=keep, grow=grow))
        # counted before any collection of ours: the rebuild itself must have freed the old engine
        alive.append(engines_alive())
        train(dynrank, 1, rank, seed=2 + event)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    report = {"rss": rss, "engines": engines_alive(), "alive_after_rebuild": alive}
    dynrank.engine.destroy()
    torch.save(report, out_dir / f"leak_rank{rank}.pt")


@pytest.mark.deepspeed
def test_ten_rebuilds_leak_no_engine_and_no_memory(run_distributed, tmp_path):
    run_distributed(_leak_worker, tmp_path)
    for rank in range(2):
        r = torch.load(tmp_path / f"leak_rank{rank}.pt")
        assert r["engines"] == 1, f"{r['engines']} engines alive after 10 rebuilds"
        assert r["alive_after_rebuild"] == [1] * 10, "old engines outlive their rebuild"
        growth = (r["rss"][-1] - r["rss"][1]) / 2**20
        assert growth < 25, f"RSS grew {growth:.1f} MiB over 9 rebuilds ({r['rss']})"
