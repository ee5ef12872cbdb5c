"""L1RA on the engine, 2 real processes under ZeRO 0-3: the gate group keeps its own constant learning rate under
DeepSpeed's scheduler, the proximal L1 step lands exactly on the fp32 master gates and the working copies, and a
scheduled event prunes zero gates and re-assigns their ranks with the rank budget held, identically on both ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_ds_config, tiny_llama

STAGES = (0, 1, 2, 3)
GATE_LR, LAMBDA = 0.05, 2.0  # a proximal shrink of 0.1 per step: gates reach 0 within a few steps


def ds_config(stage: int) -> dict:
    return tiny_ds_config(stage, scheduler_steps=20)


def _working_gate(layer) -> torch.Tensor:
    from deepspeed import zero

    with zero.GatheredParameters([layer.lora_gate]):
        return layer.lora_gate.detach().float().clone()


def _worker(rank: int, world: int, out_dir: Path) -> None:
    import ds_dynrank

    results = {}
    for stage in STAGES:
        section = {
            "method": "l1ra",
            "r": 4,
            "capacity": 6,
            "schedule": {"start": 4, "interval": 4},
            "l1ra": {"l1_lambda": LAMBDA, "gate_lr": GATE_LR},
        }
        dynrank = ds_dynrank.initialize(tiny_llama(seed=0), {**ds_config(stage), "dynrank": section}, total_steps=12)
        engine, adapters = dynrank.engine, dynrank.adapters  # the masked backend keeps the engine
        io, data = dynrank.io, torch.Generator().manual_seed(rank)
        lrs = []
        for _ in range(2 * 2):
            ids = torch.randint(0, 128, (2, 12), generator=data)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            dynrank.after_step()
            lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        assert all(group_lrs[1] == GATE_LR for group_lrs in lrs), lrs
        assert lrs[-1][0] == engine.get_lr()[0] != GATE_LR  # the scheduler still drives A and B

        from ds_dynrank.zero import read_full_fp32, read_full_fp32_flat

        gates = [layer.lora_gate for _, layer in adapters]  # one collective equals one per tensor
        assert torch.equal(read_full_fp32_flat(gates), torch.cat([read_full_fp32(g).flatten() for g in gates]))
        # the proximal map on masters and working copies, exactly
        name, layer = adapters[0]
        known = torch.tensor([0.05, 0.5, 1.3, -0.2, 0.0, 0.0])
        state = io.read(layer.lora_gate)
        state.value.copy_(known)
        io.write(layer.lora_gate, state)
        io.map_master(layer.lora_gate, lambda c: (c - 0.1).clamp_(0.0, 1.0))
        expected = torch.tensor([0.0, 0.4, 1.0, 0.0, 0.0, 0.0])
        assert torch.allclose(io.read(layer.lora_gate).value, expected, atol=1e-7), io.read(layer.lora_gate).value
        assert torch.allclose(_working_gate(layer), expected, atol=1e-7)

        for _ in range(8 * 2):  # events at applied steps 4 and 8
            ids = torch.randint(0, 128, (2, 12), generator=data)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            dynrank.after_step()
        history = dynrank.history
        assert [h["step"] for h in history] == [0, 4, 8]
        assert all(h["budget"] == history[0]["budget"] for h in history)  # the rank budget is held
        assert sum(h["slots_changed"] for h in history) > 0, "L1RA never moved a rank"
        gates = io.read(layer.lora_gate).value
        assert ((gates >= 0) & (gates <= 1)).all()
        results[stage] = [h["ranks"] for h in history]
        if stage == 0:  # a forced disagreement is caught by the checksum on every rank
            from ds_dynrank.controller import AllocationMismatchError

            mask = layer.rank_mask.clone()
            if rank == 1:
                layer.rank_mask[layer.live_slots()[0]] = 0
            with pytest.raises(AllocationMismatchError, match="ranks disagree on the allocation"):
                dynrank.check_consistent()
            layer.rank_mask.copy_(mask)
            dynrank.check_consistent()
        engine.destroy()
    torch.save(results, out_dir / f"l1ra_rank{rank}.pt")


@pytest.mark.deepspeed
def test_l1ra_gates_proximal_step_and_events_under_every_stage(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    mine, other = torch.load(tmp_path / "l1ra_rank0.pt"), torch.load(tmp_path / "l1ra_rank1.pt")
    assert mine == other
    for stage in STAGES:
        first, last = mine[stage][0], mine[stage][-1]
        assert first != last, f"ZeRO-{stage}: ranks never moved"
        assert sum(first.values()) == sum(last.values())
