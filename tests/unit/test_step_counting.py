"""The engine hook counts optimizer steps that DeepSpeed really applied: never a micro-batch, never a step skipped
on fp16 overflow. A stand-in engine exposes exactly the three counters the hook reads (an overflow cannot be
forced in fp32 on the CPU); everything else is the real DynRank."""

from __future__ import annotations

from helpers import SteppingEngine, tiny_llama

from ds_dynrank.api import prepare
from ds_dynrank.config import from_ds_config
from ds_dynrank.controller import DynRank


def test_only_applied_boundary_steps_count_and_trigger_events(monkeypatch):
    cfg = from_ds_config({"dynrank": {"method": "l1ra", "r": 2, "schedule": {"start": 2, "interval": 2}}})
    model = tiny_llama()
    setup = prepare(model, cfg)
    engine = SteppingEngine(model)
    monkeypatch.setattr("ds_dynrank.methods.l1ra.method.L1RA.attach", lambda self, ctx, a: None)
    boundaries = []
    monkeypatch.setattr(
        "ds_dynrank.methods.l1ra.method.L1RA.after_boundary", lambda self, ctx, a, applied: boundaries.append(applied)
    )
    dynrank = DynRank(engine, setup, total_steps=20)
    events = []
    monkeypatch.setattr(dynrank, "reallocate", lambda plan=None: events.append(dynrank.applied_steps) or {})
    # micro-batches of 4-step accumulation: global_steps moves every 4th call; the 3rd boundary overflows
    for micro in range(1, 25):
        if micro % 4 == 0:
            engine.global_steps += 1
            engine.applied = engine.global_steps != 3
        dynrank.after_step()
    assert engine.global_steps == 6
    assert dynrank.applied_steps == 5  # 6 boundaries, one skipped
    assert boundaries == [True, True, False, True, True, True]  # the method sees every boundary, flagged
    assert events == [2, 4]  # applied steps 2 and 4, never mid-accumulation, never on the skipped step
