"""A dynamic method whose first event is due while DynRank.after_step() was never called stops the run with a
message naming what was not called (or warns once, if the config asks), instead of training plain LoRA."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import build_dynrank

from ds_dynrank.controller import MissedAllocationError


def _undriven_steps(dynrank, steps: int) -> None:
    data = torch.Generator().manual_seed(0)
    for _ in range(steps * 2):  # 2 micro-batches per step; after_step() is never called
        ids = torch.randint(0, 128, (2, 12), generator=data)
        dynrank.engine.backward(dynrank.engine(input_ids=ids, labels=ids).loss)
        dynrank.engine.step()


def _worker(rank: int, world: int, out_dir: Path) -> None:
    section = {"method": "l1ra", "r": 4, "schedule": {"start": 2, "interval": 2}}
    dynrank = build_dynrank(2, section)
    with pytest.raises(MissedAllocationError, match=r"should have re-allocated at optimizer step 2.*after_step\(\)"):
        _undriven_steps(dynrank, 4)
    assert dynrank.engine.global_steps == 2  # stopped at the first forward after the missed event
    dynrank.engine.destroy()

    dynrank = build_dynrank(2, {**section, "on_missed_event": "warn"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _undriven_steps(dynrank, 4)
    assert sum("should have re-allocated" in str(w.message) for w in caught) == 1  # once, and training went on
    assert dynrank.engine.global_steps == 4
    dynrank.engine.destroy()

    driven = build_dynrank(2, section)  # the same run driven properly never trips
    from helpers import train_steps

    train_steps(driven, 4, rank, seed=0)
    assert [h["step"] for h in driven.history] == [0, 2, 4]
    driven.engine.destroy()
    (out_dir / f"ok{rank}").write_text("ok")


@pytest.mark.deepspeed
def test_undriven_dynamic_method_fails_loudly(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
