"""An identity event (no rank changes) leaves training exactly as if it never happened, for both backends under
ZeRO 0-3, also when the backend is forced to do its full work: the masked backend rewrites every tensor's full
state, the physical one rebuilds the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_dynrank, train_steps

from ds_dynrank.allocation import identity_plan

STAGES = (0, 1, 2, 3)


def _section(backend: str) -> dict:
    section = {
        "method": "l1ra",
        "r": 4,
        "reshape": {"backend": backend},
        "schedule": {"start": 1000},
        "l1ra": {"l1_lambda": 0.0},
    }
    return {**section, "capacity": 8} if backend == "masked" else section


def _worker(rank: int, world: int, out_dir: Path) -> None:
    curves = {}
    for backend in ("masked", "physical"):
        for stage in STAGES:
            for mode in ("uninterrupted", "event"):
                dynrank = build_dynrank(stage, _section(backend))
                losses = train_steps(dynrank, 3, rank, seed=30)
                if mode == "event":
                    plan = identity_plan([layer.live_slots() for _, layer in dynrank.adapters])
                    dynrank.reallocate(plan)  # skips the reshape: nothing moves
                    if backend == "physical":
                        dynrank.apply(plan)  # force the full gather / teardown / re-initialize / restore
                    else:  # force a full read/write round trip of every tensor's state
                        tensors = [
                            t for _, layer in dynrank.adapters for t in (layer.lora_A, layer.lora_B, layer.lora_gate)
                        ]
                        for t, state in zip(tensors, dynrank.io.read_many(tensors)):
                            dynrank.io.write(t, state)
                losses += train_steps(dynrank, 4, rank, seed=40)
                curves[(backend, stage, mode)] = losses + [dynrank.engine.get_lr()[0], dynrank.engine.global_steps]
                dynrank.engine.destroy()
    torch.save(curves, out_dir / f"identity_rank{rank}.pt")


@pytest.mark.deepspeed
def test_identity_event_leaves_the_loss_curve_unchanged(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    for rank in range(2):
        curves = torch.load(tmp_path / f"identity_rank{rank}.pt")
        for backend in ("masked", "physical"):
            for stage in STAGES:
                event, plain = curves[(backend, stage, "event")], curves[(backend, stage, "uninterrupted")]
                assert event == plain, f"{backend} backend, ZeRO-{stage}"
