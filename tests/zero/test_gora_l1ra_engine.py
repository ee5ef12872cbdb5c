"""GoRA then L1RA on the engine, 2 real processes, ZeRO-2 masked and ZeRO-3 physical: GoRA's one allocation right
after the warm-up (ranks proportional to the importance both ranks agreed on), then L1RA's gated events every
interval, which move ranks again; the parameter budget is held throughout, and both ranks end with the same
allocation and bit-identical adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_dynrank, load_agreeing_ranks

from ds_dynrank.allocation import proportional_ranks

RUNS = [(2, "masked"), (3, "physical")]
WARMUP, INTERVAL, STEPS = 2, 2, 10
SECTION = {
    "method": "gora_l1ra",
    "r": 4,
    "gora": {"warmup_steps": WARMUP},
    "schedule": {"interval": INTERVAL},
    "l1ra": {"l1_lambda": 2.0, "gate_lr": 0.1},  # gates that lose 0.1-0.3 a step reach zero in a few
}


def _worker(rank: int, world: int, out_dir: Path) -> None:
    from ds_dynrank.export import gather_full

    results = {}
    data = torch.Generator().manual_seed(100 + rank)
    for stage, backend in RUNS:
        dynrank = build_dynrank(stage, {**SECTION, "reshape": {"backend": backend}}, total_steps=STEPS)
        for _ in range(STEPS):
            for _ in range(2):
                ids = torch.randint(0, 128, (2, 12), generator=data)
                engine = dynrank.engine
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
                dynrank.after_step()
        results[(stage, backend)] = {
            "history": [{k: h[k] for k in ("step", "ranks", "budget")} for h in dynrank.history],
            "importance": dynrank.method.gora.importance.clone(),
            "cost": [layer.rank_cost() for _, layer in dynrank.adapters],
            "caps": list(dynrank.bounds.cap_M),
            "floor": dynrank.bounds.floor,
            "hooks": len(dynrank.method.gora._handles),
            "state": gather_full(dynrank.adapters),
        }
        dynrank.engine.destroy()
    torch.save(results, out_dir / f"gora_l1ra_rank{rank}.pt")


@pytest.mark.deepspeed
def test_gora_allocates_once_then_l1ra_refines_within_the_budget(run_distributed, tmp_path):
    run_distributed(_worker, tmp_path)
    mine, _ = load_agreeing_ranks(tmp_path, "gora_l1ra")
    for key, result in mine.items():
        history = result["history"]
        assert [h["step"] for h in history] == [0, 2, 4, 6, 8], key  # GoRA at the warm-up's end, then L1RA's
        budget = history[0]["budget"]
        expected = proportional_ranks(
            result["importance"], budget=budget, floor=result["floor"], cap_M=result["caps"], cost_M=result["cost"]
        )
        assert list(history[1]["ranks"].values()) == expected, f"{key}: the first event is not GoRA's"
        assert any(later["ranks"] != history[1]["ranks"] for later in history[2:]), f"{key}: L1RA moved nothing"
        for h in history[1:]:
            assert budget - max(result["cost"]) < h["budget"] <= budget, (key, h)
        assert result["hooks"] == 0, key  # GoRA's hooks are gone after its event
